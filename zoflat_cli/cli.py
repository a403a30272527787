"""The `zoflat` command line: subcommands merge recipe + flags and hand off to the trainers."""

import contextlib
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

import zoflat_cli
from zoflat_cli.errors import ZoflatError

app = typer.Typer(
    help="zoflat: experiments on zeroth-order optimization and flat minima.",
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=False,
)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def user_errors():
    """Input and environment problems end in one line on stderr, never a traceback."""
    try:
        yield
    except ZoflatError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_USER_ERROR)


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


# Options shared by the experiment subcommands (declared once, reused in each signature).
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Recipe YAML; flags override it.")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Iterations per run.")]
LrOpt = Annotated[Optional[List[str]], typer.Option(
    "--lr", help="Step size: 0.01, a sweep 0.01,0.001, or per optimizer gd=0.01 (repeatable).")]
LambdaOpt = Annotated[Optional[List[str]], typer.Option(
    "--lambda", help="Smoothing radius λ for ZO: 0.1, a sweep 0.1,0.05,0.01, or zo=0.1 (repeatable).")]
RhoOpt = Annotated[Optional[List[str]], typer.Option(
    "--rho", help="SAM's ascent radius ρ: 0.05, a sweep, or sam=0.05 (repeatable).")]
OptimizerOpt = Annotated[Optional[List[str]], typer.Option(
    "--optimizer", "-o", help="Optimizers (repeatable or comma-separated): gd, zo, dd, sam, zest.")]
SeedsOpt = Annotated[Optional[str], typer.Option(
    "--seeds", help="A count n (seeds 0..n-1) or a list 13,21,42 (one seed: 13,).")]
SamplesOpt = Annotated[Optional[List[str]], typer.Option(
    "--samples", help="Directions averaged per ZO/DD step (n independent estimates).")]
LogEveryOpt = Annotated[Optional[int], typer.Option("--log-every", help="Log metrics every N steps.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="float64 or float32.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Parent folder of run folders.")]
NameOpt = Annotated[Optional[str], typer.Option("--name", help="Suffix of the run folder's name.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the run folder.")]
TiltOpt = Annotated[Optional[List[str]], typer.Option(
    "--tilt", help="ZEST's tilt t >= 0 (0: plain smoothed loss; large: toward SAM), or a sweep 0.1,1,10.")]
PairsOpt = Annotated[Optional[int], typer.Option("--pairs", help="ZEST's antithetic pairs n per step.")]


def _flags(pairs: Optional[int] = None, **given) -> dict:
    """Flags as config values; options not given (None or empty) are left to the recipe.
    --pairs n is ZEST's sample count: samples {zest: n}."""
    from zoflat_cli.config import PER_OPTIMIZER, parse_flag

    flags = {}
    for key, value in given.items():
        if value is None or value == []:
            continue
        flags[key] = parse_flag(key, value) if key in PER_OPTIMIZER else value
    if pairs is not None:
        samples = flags.get("samples", {})
        flags["samples"] = {**(samples if isinstance(samples, dict) else {"zo": samples, "dd": samples}),
                            "zest": pairs}
    return flags


def _finish(path: Path, status: str, quiet: bool):
    typer.echo(str(path) if quiet else f"{status}: {path}")
    if status == "diverged" and not quiet:
        typer.echo("note: some runs diverged (NaN/Inf); see summary.json", err=True)
    if status == "interrupted":
        typer.echo("interrupted: the run folder keeps everything logged so far", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)


@app.command()
def toy(
    config: ConfigOpt = None,
    dim: Annotated[Optional[int], typer.Option("--dim", help="d: y, z in R^d.")] = None,
    steps: StepsOpt = None,
    lr: LrOpt = None,
    lam: LambdaOpt = None,
    rho: RhoOpt = None,
    tilt: TiltOpt = None,
    pairs: PairsOpt = None,
    optimizer: OptimizerOpt = None,
    seeds: SeedsOpt = None,
    samples: SamplesOpt = None,
    log_every: LogEveryOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    out: OutOpt = None,
    name: NameOpt = None,
    quiet: QuietOpt = False,
):
    """Example 2.1: f(y, z) = (yᵀz - 1)²/2. ZO drifts to the flat minimum (Hessian trace 2)."""
    from zoflat_cli.config import resolve
    from zoflat_cli.experiment import run_experiment
    from zoflat_cli.problems.toy import DEFAULTS, ToyProblem

    with user_errors():
        flags = _flags(dim=dim, steps=steps, lr=lr, rho=rho, tilt=tilt, pairs=pairs, optimizer=optimizer, seeds=seeds,
                       samples=samples, log_every=log_every, device=device, dtype=dtype,
                       out=str(out) if out else None, name=name, **{"lambda": lam})
        cfg = resolve(DEFAULTS, config, flags)
        path, status = run_experiment(cfg, lambda device, dtype: ToyProblem(cfg["dim"]), quiet)
    _finish(path, status, quiet)


@app.command()
def convex(
    config: ConfigOpt = None,
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
    steps: StepsOpt = None,
    lr: LrOpt = None,
    lam: LambdaOpt = None,
    rho: RhoOpt = None,
    tilt: TiltOpt = None,
    pairs: PairsOpt = None,
    optimizer: OptimizerOpt = None,
    seeds: SeedsOpt = None,
    samples: SamplesOpt = None,
    log_every: LogEveryOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    out: OutOpt = None,
    name: NameOpt = None,
    quiet: QuietOpt = False,
):
    """SVM / logistic regression on random features of LIBSVM data (paper Figures 2 and 5)."""
    from zoflat_cli import datasets
    from zoflat_cli.config import load_recipe, resolve
    from zoflat_cli.experiment import run_experiment
    from zoflat_cli.problems import convex as problem

    with user_errors():
        flags = _flags(dataset=dataset, data_file=str(data_file) if data_file else None,
                       test_file=str(test_file) if test_file else None, train_size=train_size,
                       split_seed=split_seed, model=model, features=features, dense=dense, eig_every=eig_every,
                       steps=steps,
                       lr=lr, rho=rho, tilt=tilt, pairs=pairs, optimizer=optimizer, seeds=seeds, samples=samples,
                       log_every=log_every, device=device, dtype=dtype,
                       out=str(out) if out else None, name=name, **{"lambda": lam})
        chosen = {**(load_recipe(config) if config else {}), **flags}
        cfg = resolve(problem.defaults(chosen), config, flags)
        train, test, description = datasets.load_splits(cfg)

        def make_problem(device, dtype):
            return problem.ConvexProblem(train, test, cfg["model"], cfg["features"], cfg["dense"],
                                         dtype, device, description, cfg["eig_every"])

        path, status = run_experiment(cfg, make_problem, quiet)
    _finish(path, status, quiet)


@app.command()
def finetune(
    config: ConfigOpt = None,
    task: Annotated[Optional[str], typer.Option("--task", help="sst2, sst5 or trec.")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Training examples per label (K-shot).")] = None,
    split_seed: Annotated[Optional[int], typer.Option(
        "--split-seed", help="LM-BFF split seed (13, 21, 42, 87, 100 are the published ones).")] = None,
    test_mode: Annotated[Optional[str], typer.Option(
        "--test-mode", help="1k (LM-BFF k-shot-1k-test: at most 1,000 test rows) or full.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", help="LM-BFF data/original layout (default: the bundled files).")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Hub id (roberta-large), a local model folder, or minilm (offline).")] = None,
    head: Annotated[Optional[str], typer.Option("--head", help="auto, prompt (MLM + label words) or linear.")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Tokens per example.")] = None,
    micro_batch: Annotated[Optional[int], typer.Option(
        "--micro-batch", help="Examples per forward pass (memory; the loss is the same).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Examples per step; 0 = the whole K-shot train set.")] = None,
    steps: StepsOpt = None,
    lr: LrOpt = None,
    lam: LambdaOpt = None,
    rho: RhoOpt = None,
    tilt: TiltOpt = None,
    pairs: PairsOpt = None,
    optimizer: Annotated[Optional[List[str]], typer.Option(
        "--optimizer", "-o", help="gd (backprop SGD), sam, zo (in-place two-point ZO), zest (in-place).")] = None,
    seeds: SeedsOpt = None,
    samples: SamplesOpt = None,
    log_every: LogEveryOpt = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Test accuracy every N steps.")] = None,
    trace: Annotated[Optional[str], typer.Option("--trace", help="hutchinson, fd or none.")] = None,
    trace_every: Annotated[Optional[int], typer.Option("--trace-every", help="Hessian trace every N steps.")] = None,
    trace_probes: Annotated[Optional[int], typer.Option("--trace-probes", help="Probes per trace estimate.")] = None,
    trace_delta: Annotated[Optional[float], typer.Option("--trace-delta", help="δ of the fd estimator.")] = None,
    eig_every: Annotated[Optional[int], typer.Option(
        "--eig-every", help="λ_max by power iteration every N steps (0: never).")] = None,
    eig_iters: Annotated[Optional[int], typer.Option("--eig-iters", help="Power-iteration steps.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        "--checkpoint-every", help="Save parameters every N steps (0: only when a GD run stops).")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="Continue the unfinished runs of this run folder (--steps may extend it).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    out: OutOpt = None,
    name: NameOpt = None,
    quiet: QuietOpt = False,
):
    """Few-shot LM fine-tuning with GD or memory-efficient ZO, tracking the Hessian trace (Figures 3, 6)."""
    from zoflat_cli.config import resolve
    from zoflat_cli.finetune import run_finetune
    from zoflat_cli.problems import lm

    with user_errors():
        flags = _flags(task=task, k=k, split_seed=split_seed, test_mode=test_mode,
                       data_dir=str(data_dir) if data_dir else None, model=model, head=head,
                       max_length=max_length, micro_batch=micro_batch, batch_size=batch_size, steps=steps,
                       lr=lr, rho=rho, tilt=tilt, pairs=pairs, optimizer=optimizer, seeds=seeds, samples=samples,
                       log_every=log_every, eval_every=eval_every, trace=trace, trace_every=trace_every,
                       trace_probes=trace_probes, trace_delta=trace_delta, eig_every=eig_every, eig_iters=eig_iters,
                       checkpoint_every=checkpoint_every, device=device, dtype=dtype,
                       out=str(out) if out else None, name=name, **{"lambda": lam})
        if resume is not None:
            others = sorted(set(flags) - {"steps", "device"}) + (["--config"] if config else [])
            if others:
                raise ZoflatError(f"--resume continues the saved config; only --steps and --device may "
                                  f"change it (got {', '.join(others)})")
            if not (resume / "config.yaml").is_file():
                raise ZoflatError(f"--resume {resume}: not a run folder (no config.yaml)")
            config = resume / "config.yaml"
        cfg = resolve(lm.DEFAULTS, config, flags, check=lm.validate)
        path, status = run_finetune(cfg, quiet, resume)
    _finish(path, status, quiet)


data_app = typer.Typer(help="Data sets: LIBSVM files (bundled, cached, imported) and LM-BFF K-shot splits.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("list")
def data_list():
    """The registry of LIBSVM binary sets and where each file is (bundled, cached, or missing)."""
    from rich.console import Console
    from rich.table import Table

    from zoflat_cli import datasets

    table = Table(title=f"LIBSVM binary data sets (cache: {datasets.cache_dir()})")
    for col in ("name", "features", "train rows", "test rows", "train file", "test file"):
        table.add_column(col)
    for spec in datasets.REGISTRY.values():
        table.add_row(spec.name, str(spec.n_features), f"{spec.n_train:,}", f"{spec.n_test:,}",
                      datasets.availability(spec.name, "train"), datasets.availability(spec.name, "test"))
    Console().print(table)


@data_app.command("import")
def data_import(
    path: Annotated[Path, typer.Argument(help="An svmlight file (plain or .xz).")],
    name: Annotated[str, typer.Option("--name", help="Its data set name, e.g. a5a.")],
    split: Annotated[str, typer.Option("--split", help="train or test.")] = "train",
):
    """Copy a downloaded LIBSVM file into the cache (checked against the registry's sizes)."""
    from zoflat_cli import datasets

    with user_errors():
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
    from zoflat_cli.text_tasks import SPLIT_SEEDS, get_task, write_kshot

    with user_errors():
        spec = get_task(task)
        for s in seed or SPLIT_SEEDS:
            typer.echo(str(write_kshot(spec, k, s, out, data_dir, test_mode)))


@app.command()
def plot(
    paths: Annotated[List[Path], typer.Argument(help="Run folders, or folders holding run folders.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Write figures here instead.")] = None,
):
    """Paper-style figures (PNG and PDF) of one or more run folders."""
    from zoflat_cli.plot import plot_paths

    with user_errors():
        for written in plot_paths(paths, out):
            typer.echo(str(written))


def main():
    app()


if __name__ == "__main__":
    sys.exit(main())
