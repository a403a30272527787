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
    "--optimizer", "-o", help="Optimizers (repeatable or comma-separated): gd, zo, dd, sam.")]
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


def _flags(**given) -> dict:
    """Flags as config values; options not given (None or empty) are left to the recipe."""
    from zoflat_cli.config import PER_OPTIMIZER, parse_flag

    flags = {}
    for key, value in given.items():
        if value is None or value == []:
            continue
        flags[key] = parse_flag(key, value) if key in PER_OPTIMIZER else value
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
        flags = _flags(dim=dim, steps=steps, lr=lr, rho=rho, optimizer=optimizer, seeds=seeds,
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
    steps: StepsOpt = None,
    lr: LrOpt = None,
    lam: LambdaOpt = None,
    rho: RhoOpt = None,
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
                       split_seed=split_seed, model=model, features=features, dense=dense, steps=steps,
                       lr=lr, rho=rho, optimizer=optimizer, seeds=seeds, samples=samples,
                       log_every=log_every, device=device, dtype=dtype,
                       out=str(out) if out else None, name=name, **{"lambda": lam})
        chosen = {**(load_recipe(config) if config else {}), **flags}
        cfg = resolve(problem.defaults(chosen), config, flags)
        train, test, description = datasets.load_splits(cfg)

        def make_problem(device, dtype):
            return problem.ConvexProblem(train, test, cfg["model"], cfg["features"], cfg["dense"],
                                         dtype, device, description)

        path, status = run_experiment(cfg, make_problem, quiet)
    _finish(path, status, quiet)


data_app = typer.Typer(help="LIBSVM data sets: what is bundled or cached, and importing files.",
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
