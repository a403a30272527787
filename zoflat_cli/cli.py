"""The `zoflat` command line: subcommands merge recipe + flags and hand off to the trainers."""

import contextlib
import contextvars
import functools
import inspect
import keyword
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup
from typing_extensions import Annotated

import zoflat_cli
from zoflat_cli.errors import RunFailed, ZoflatError, one_line
from zoflat_cli.optim.directions import LAWS
from zoflat_cli.optim.presets import FLAG_GROUPS, HYPERPARAMETERS, PRESETS, SAMPLES
from zoflat_cli.optim.updates import UPDATES

try:  # Typer vendors click from 0.2x on
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

EXIT_INTERRUPTED = 130


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
        except typer.Abort:
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
    add_completion=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"zoflat {zoflat_cli.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Show the version and exit.")] = None,
):
    pass


def _param(name: str) -> str:
    """A flag's Python parameter name (`lambda` is a keyword)."""
    return name + "_" if keyword.iskeyword(name) else name


# Options shared by the experiment subcommands, declared once: @experiment adds them to a command.
SHARED_OPTIONS = {
    "config": Annotated[Optional[Path], typer.Option("--config", "-c", help="Recipe YAML; flags override it.")],
    "optimizer": Annotated[Optional[List[str]], typer.Option(
        "--optimizer", "-o", help="Optimizers (repeatable or comma-separated), from: " + ", ".join(PRESETS) + ".")],
    "steps": Annotated[Optional[int], typer.Option("--steps", help="Iterations per run.")],
    "lr": Annotated[Optional[List[str]], typer.Option(
        "--lr", help="Step size: 0.01, a sweep 0.01,0.001, or per optimizer gd=0.01 (repeatable).")],
    "pairs": Annotated[Optional[int], typer.Option("--pairs", help="ZEST's antithetic pairs n per step.")],
    "samples": Annotated[Optional[List[str]], typer.Option(
        "--samples", help="Directions averaged per step by ZO-type optimizers (n independent estimates).")],
    "directions": Annotated[Optional[List[str]], typer.Option(
        "--directions", help="Direction law: " + ", ".join(LAWS) + " (a sweep, or zo=sphere).")],
    "update": Annotated[Optional[List[str]], typer.Option(
        "--update", help="Update rule instead of the optimizer's own: " + ", ".join(UPDATES) + " (or zo=adam).")],
    # one sweepable flag per hyperparameter of the optimizer table, and its flag groups (--betas)
    **{_param(name): Annotated[Optional[List[str]], typer.Option("--" + name.replace("_", "-"), help=hyper.help)]
       for name, hyper in HYPERPARAMETERS.items()},
    **{_param(flag): Annotated[Optional[List[str]], typer.Option("--" + flag.replace("_", "-"), help=text)]
       for flag, (_, text) in FLAG_GROUPS.items()},
    "seeds": Annotated[Optional[str], typer.Option(
        "--seeds", help="A count n (seeds 0..n-1) or a list 13,21,42 (one seed: 13,).")],
    "log_every": Annotated[Optional[int], typer.Option("--log-every", help="Log metrics every N steps.")],
    "checkpoint_every": Annotated[Optional[int], typer.Option(
        "--checkpoint-every", help="Save a checkpoint every N steps (0: only when a run stops or ends).")],
    "resume": Annotated[Optional[Path], typer.Option(
        "--resume", help="Continue the unfinished runs of this run folder (--steps may extend it).")],
    "device": Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda.")],
    "dtype": Annotated[Optional[str], typer.Option(
        "--dtype", help="float32 or float64; finetune also bfloat16, float16.")],
    "out": Annotated[Optional[Path], typer.Option("--out", help="Parent folder of run folders.")],
    "name": Annotated[Optional[str], typer.Option("--name", help="Suffix of the run folder's name.")],
    "logger": Annotated[Optional[str], typer.Option(
        "--logger", help="Also stream metrics.csv's rows to wandb (offline unless WANDB_MODE), tensorboard or "
                         "mlflow (files in the run folder).")],
    "quiet": Annotated[bool, typer.Option("--quiet", "-q", help="Print only the run folder.")],
}
RESUMABLE_CHANGES = {"steps", "device"}  # what --resume may change in the saved config


def experiment(fn):
    """Registers fn(**options) as a subcommand with its own options plus SHARED_OPTIONS."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                default=False if name == "quiet" else None)
              for name, annotation in SHARED_OPTIONS.items()]

    @functools.wraps(fn)
    def command(**options):
        return fn(**options)

    command.__signature__ = inspect.Signature(own + shared)
    command.__annotations__ = {p.name: p.annotation for p in own + shared}
    del command.__wrapped__  # typer reads the signature above, not fn's
    return app.command(fn.__name__)(command)


def config_flags(options: dict) -> dict:
    """Options as config values: those not given (None or empty) are left to the recipe;
    --pairs n is ZEST's sample count; a flag group (--betas b1,b2) sets each of its hyperparameters."""
    from zoflat_cli.config import PER_OPTIMIZER, parse_flag

    given = {k.rstrip("_"): (str(v) if isinstance(v, Path) else v) for k, v in options.items()
             if k not in ("config", "resume", "quiet", "pairs", *FLAG_GROUPS) and v is not None and v != []}
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
    from zoflat_cli.config import parse_flag

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


def resolve_command(defaults: dict, options: dict, settings: dict, check=None):
    """The resolved config of an experiment command, and the folder to resume (or None)."""
    from zoflat_cli.config import resolve

    flags, config, resume = config_flags(options), options["config"], options["resume"]
    if resume is not None:
        others = sorted(set(flags) - RESUMABLE_CHANGES) + (["--config"] if config else [])
        if others:
            raise ZoflatError(f"--resume continues the saved config; only --steps and --device may "
                              f"change it (got {', '.join(others)})")
        if not (resume / "config.yaml").is_file():
            raise ZoflatError(f"--resume {resume}: not a run folder (no config.yaml)")
        config = resume / "config.yaml"
    resolved = resolve(defaults(config, flags) if callable(defaults) else defaults, config, flags, settings, check)
    if PLANNING.get():  # zoflat sweep wants the config, not the run
        raise Planned(resolved)
    return resolved, resume


PLANNING = contextvars.ContextVar("planning", default=False)


class Planned(Exception):
    """Raised by resolve_command while planning: carries the resolved config out of the command."""

    def __init__(self, config: dict):
        super().__init__("planned")
        self.config = config


def planned_config(command: str, args: list) -> dict:
    """The config an experiment command would resolve from these arguments, without running it."""
    click_command = typer.main.get_command(app).commands[command]
    token = PLANNING.set(True)
    try:
        with click_command.make_context(command, list(args)) as ctx:
            click_command.invoke(ctx)
    except Planned as planned:
        return planned.config
    finally:
        PLANNING.reset(token)
    raise ZoflatError(f"internal: {command} resolved no config")


def _finish(path: Path, status: str, quiet: bool):
    from zoflat_cli.engine.live import say

    if path is not None:  # None: a data-parallel rank other than 0, which says nothing
        say(str(path) if quiet else f"{status}: {path}")
        if status == "diverged" and not quiet:
            say("note: some runs diverged (NaN/Inf); see summary.json", err=True)
        if status == "interrupted":
            say("interrupted: the run folder keeps everything logged so far", err=True)
    if status == "interrupted":
        raise typer.Exit(EXIT_INTERRUPTED)


@experiment
def toy(dim: Annotated[Optional[int], typer.Option("--dim", help="d: y, z in R^d.")] = None, **options):
    """Example 2.1: f(y, z) = (yᵀz - 1)²/2. ZO drifts to the flat minimum (Hessian trace 2)."""
    from zoflat_cli.engine.batched import run_batched
    from zoflat_cli.problems.toy import DEFAULTS, SETTINGS, ToyProblem

    cfg, resume = resolve_command(DEFAULTS, {**options, "dim": dim}, SETTINGS)
    path, status = run_batched(cfg, lambda device, dtype: ToyProblem(cfg["dim"]), options["quiet"], resume)
    _finish(path, status, options["quiet"])


@experiment
def convex(
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="A LIBSVM binary set by name (zoflat data list), e.g. w5a, a8a.")] = None,
    data_file: Annotated[Optional[Path], typer.Option("--data-file", help="Any svmlight training file.")] = None,
    test_file: Annotated[Optional[Path], typer.Option("--test-file", help="Its test file.")] = None,
    train_size: Annotated[Optional[int], typer.Option(
        "--train-size", help="Re-split the training file: this many rows train, the rest test.")] = None,
    split_seed: Annotated[Optional[int], typer.Option("--split-seed", help="Seed of that re-split.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="svm (squared hinge) or logreg.")] = None,
    features: Annotated[Optional[int], typer.Option("--features", help="D, the random features.")] = None,
    dense: Annotated[Optional[bool], typer.Option(
        "--dense/--factored", help="Materialise the N x D features (reference path).")] = None,
    eig_every: Annotated[Optional[int], typer.Option(
        "--eig-every", help="Top Hessian eigenvalue every N steps (a multiple of --log-every; 0: never).")] = None,
    **options,
):
    """SVM / logistic regression on random features of LIBSVM data (paper Figures 2 and 5)."""
    from zoflat_cli import datasets
    from zoflat_cli.config import load_recipe
    from zoflat_cli.engine.batched import run_batched
    from zoflat_cli.problems import convex as problem

    own = dict(dataset=dataset, data_file=data_file, test_file=test_file, train_size=train_size,
               split_seed=split_seed, model=model, features=features, dense=dense, eig_every=eig_every)
    def defaults(recipe, flags):  # the model and data chosen decide some defaults
        return problem.defaults({**(load_recipe(recipe) if recipe else {}), **flags})

    cfg, resume = resolve_command(defaults, {**options, **own}, problem.SETTINGS, problem.check)
    train, test, description = datasets.load_splits(cfg)

    def make_problem(device, dtype):
        return problem.ConvexProblem(train, test, cfg["model"], cfg["features"], cfg["dense"],
                                     dtype, device, description, cfg["eig_every"])

    path, status = run_batched(cfg, make_problem, options["quiet"], resume)
    _finish(path, status, options["quiet"])


@experiment
def finetune(
    task: Annotated[Optional[str], typer.Option(
        "--task", help="Encoders: sst2, sst5, trec. Decoder LMs: sst2, rte, cb, boolq, wsc, wic, multirc, copa, "
                       "record, piqa, arc-easy, arc-challenge, openbookqa, squad, drop.")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Encoder tasks: training examples per label (K-shot).")] = None,
    split_seed: Annotated[Optional[int], typer.Option(
        "--split-seed", help="Encoder tasks: LM-BFF split seed (13, 21, 42, 87, 100 are the published ones).")] = None,
    test_mode: Annotated[Optional[str], typer.Option(
        "--test-mode", help="Encoder tasks: 1k (LM-BFF k-shot-1k-test: at most 1,000 test rows) or full.")] = None,
    num_train: Annotated[Optional[int], typer.Option(
        "--num-train", help="Decoder tasks: training examples sampled (MeZO: 1000).")] = None,
    num_dev: Annotated[Optional[int], typer.Option(
        "--num-dev", help="Decoder tasks: dev examples, the last of the training draw (MeZO: 500; CB, COPA 100).")] = None,
    num_eval: Annotated[Optional[int], typer.Option(
        "--num-eval", help="Decoder tasks: evaluation examples from the validation pool (MeZO: 1000).")] = None,
    train_set_seed: Annotated[Optional[int], typer.Option(
        "--train-set-seed", help="Decoder tasks: MeZO's sampling seed.")] = None,
    train_pool: Annotated[Optional[str], typer.Option(
        "--train-pool", help="train (MeZO), or eval: train+dev drawn from the validation pool, disjoint from the "
                             "eval sample (offline runs of tasks whose train split is not bundled).")] = None,
    demos: Annotated[Optional[int], typer.Option(
        "--demos", help="In-context demonstrations from the training sample (with --steps 0).")] = None,
    scoring: Annotated[Optional[str], typer.Option(
        "--scoring", help="Option score: sum of its tokens' log-probabilities, or mean (length-normalised).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        "--max-new-tokens", help="Generation tasks: greedy decoding length limit (MeZO: 50).")] = None,
    objective: Annotated[Optional[str], typer.Option(
        "--objective", help="What ZO minimises: loss, accuracy or f1 (1 - the metric; ZO optimizers only).")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", help="Local copies: LM-BFF data/original layout, or the official files as `zoflat data "
                           "list` names them (default: bundled, then the hub).")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Hub id (roberta-large, facebook/opt-13b), a local model folder, minilm, or tiny-gpt2 / "
                        "tiny-opt / tiny-llama (random, offline).")] = None,
    head: Annotated[Optional[str], typer.Option(
        "--head", help="Encoders: auto, prompt (MLM + label words) or linear.")] = None,
    max_length: Annotated[Optional[int], typer.Option(
        "--max-length", help="Tokens per example (encoders 128; decoders: the model's, at most 2048).")] = None,
    micro_batch: Annotated[Optional[int], typer.Option(
        "--micro-batch", help="Examples per forward pass (memory; the loss is the same).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Examples per step; 0 = the whole training set.")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Test metrics every N steps.")] = None,
    trace: Annotated[Optional[str], typer.Option("--trace", help="hutchinson, fd or none.")] = None,
    trace_every: Annotated[Optional[int], typer.Option("--trace-every", help="Hessian trace every N steps.")] = None,
    trace_probes: Annotated[Optional[int], typer.Option("--trace-probes", help="Probes per trace estimate.")] = None,
    trace_delta: Annotated[Optional[float], typer.Option("--trace-delta", help="δ of the fd estimator.")] = None,
    eig_every: Annotated[Optional[int], typer.Option(
        "--eig-every", help="λ_max by power iteration every N steps (0: never).")] = None,
    eig_iters: Annotated[Optional[int], typer.Option("--eig-iters", help="Power-iteration steps.")] = None,
    trainable: Annotated[Optional[str], typer.Option(
        "--trainable", help="What is trained: all, lora, prefix (decoders), bias (BitFit) or head (peft).")] = None,
    lora_rank: Annotated[Optional[int], typer.Option("--lora-rank", help="LoRA rank r (MeZO: 8).")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha", help="LoRA α (MeZO: 16).")] = None,
    prefix_tokens: Annotated[Optional[int], typer.Option(
        "--prefix-tokens", help="Prefix tuning's virtual tokens (MeZO: 5).")] = None,
    device_map: Annotated[Optional[str], typer.Option(
        "--device-map", help="auto, balanced or sequential: the model's layers across the visible GPUs "
                             "(accelerate).")] = None,
    **options,
):
    """LM fine-tuning (encoders: LM-BFF few-shot; decoders: MeZO's tasks), tracking the Hessian trace."""
    from zoflat_cli import finetune as finetune_command

    own = dict(task=task, k=k, split_seed=split_seed, test_mode=test_mode, num_train=num_train, num_dev=num_dev,
               num_eval=num_eval, train_set_seed=train_set_seed, train_pool=train_pool, demos=demos,
               scoring=scoring, max_new_tokens=max_new_tokens, objective=objective, data_dir=data_dir,
               model=model, head=head, max_length=max_length, micro_batch=micro_batch, batch_size=batch_size,
               eval_every=eval_every, trace=trace, trace_every=trace_every, trace_probes=trace_probes,
               trace_delta=trace_delta, eig_every=eig_every, eig_iters=eig_iters, trainable=trainable,
               lora_rank=lora_rank, lora_alpha=lora_alpha, prefix_tokens=prefix_tokens, device_map=device_map)
    cfg, resume = resolve_command(finetune_command.DEFAULTS, {**options, **own}, finetune_command.SETTINGS,
                                  finetune_command.check)
    path, status = finetune_command.run_finetune(cfg, options["quiet"], resume)
    _finish(path, status, options["quiet"])


data_app = typer.Typer(help="Data sets: LIBSVM files (bundled, cached, imported), LM-BFF K-shot splits, and "
                            "MeZO's decoder-LM task samples.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("list")
def data_list():
    """The LIBSVM sets and the decoder-LM tasks, and where each file is (bundled, cached, hub, missing)."""
    from rich.console import Console
    from rich.table import Table

    from zoflat_cli import datasets

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


def _llm_task_table():
    from rich.table import Table

    from zoflat_cli import llm_tasks

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
    from zoflat_cli import datasets

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
):
    """Write LM-BFF K-shot splits (train, dev, test) byte for byte as LM-BFF's generator does."""
    from zoflat_cli.finetune import SETTINGS
    from zoflat_cli.text_tasks import SPLIT_SEEDS, get_task, write_kshot

    spec = get_task(task)
    for s in seed or SPLIT_SEEDS:  # the bounds of finetune's --split-seed and --k
        SETTINGS["split_seed"].check("--seed", s)
    SETTINGS["k"].check("--k", k)
    for s in seed or SPLIT_SEEDS:
        typer.echo(str(write_kshot(spec, k, s, out, data_dir, test_mode)))


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
):
    """Write MeZO's sample of a task (in sampled order, each row with its source_index) for inspection."""
    from zoflat_cli import llm_tasks
    from zoflat_cli.finetune import SETTINGS

    spec = llm_tasks.get_task(task)
    config = {"num_train": num_train, "num_dev": num_dev, "num_eval": num_eval, "train_set_seed": seed,
              "train_pool": train_pool, "data_dir": data_dir}
    for key, value in config.items():  # the bounds of finetune's settings
        flag = "--seed" if key == "train_set_seed" else "--" + key.replace("_", "-")
        SETTINGS[key].check(flag, value)
    typer.echo(str(llm_tasks.write_sample(spec, config, out)))


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
    from zoflat_cli import sweep as sweeps
    from zoflat_cli.config import load_recipe
    from zoflat_cli.engine.live import say

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
        if command not in ("toy", "convex", "finetune"):
            raise ZoflatError(f"{recipe}: a sweep recipe needs `command: toy|convex|finetune`, got {command!r}")
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
        "--metric", help="Columns, comma-separated (default: loss, test accuracy or F1, Hessian trace).")] = None,
    at: Annotated[str, typer.Option("--at", help="final, best, or a step number.")] = "final",
    by: Annotated[Optional[str], typer.Option(
        "--by", help="Group by these columns or config keys (default: optimizer,lambda,lr).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="markdown, csv or latex.")] = "markdown",
):
    """The results table: mean ± std (n) over seeds per group, the best cell of each column marked."""
    from zoflat_cli.table import make_table

    split = (lambda text: [t.strip() for t in text.split(",") if t.strip()] if text else None)
    typer.echo(make_table(paths, split(metric), at, split(by), fmt), nl=False)


@app.command()
def plot(
    paths: Annotated[List[Path], typer.Argument(help="Run folders, or folders holding run folders.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Write figures here instead.")] = None,
):
    """Paper-style figures (PNG and PDF) of one or more run folders."""
    from zoflat_cli.plot import plot_paths

    for written in plot_paths(paths, out):
        typer.echo(str(written))


def main():
    app()


if __name__ == "__main__":
    sys.exit(main())
