"""`zoflat convex`: SVM / logistic regression on random features of LIBSVM data (problems/convex.py),
the paper's Figures 2 and 5."""

from zoflat_cli.errors import ZoflatError
from zoflat_cli.experiments.experiment import Experiment, table
from zoflat_cli.experiments.settings import MAX_SEED, MAX_STEPS, Setting
from zoflat_cli.optim.presets import default_lrs
from zoflat_cli.problems.names import CONVEX_MODELS

SETTINGS = table(
    {
        "dataset": Setting("text", optional=True, default="w8a",
                           help="A LIBSVM binary set by name (zoflat data list), e.g. w5a, a8a."),
        "data_file": Setting("path", optional=True, help="Any svmlight training file."),
        "test_file": Setting("path", optional=True, help="Its test file."),
        "train_size": Setting("int", 1, 10**9, optional=True, default=9_888,  # w5a's sizes: 9,888 / 39,861 of 49,749
                              help="Re-split the training file: this many rows train, the rest test."),
        "split_seed": Setting("int", 0, MAX_SEED, default=0, help="Seed of that re-split."),
        "model": Setting("text", choices=CONVEX_MODELS, default="svm", help="svm (squared hinge) or logreg."),
        "features": Setting("int", 1, 10**8, default=10_000, help="D, the random features."),  # memory: checked apart
        "dense": Setting("flag", default=False, help="Materialise the N x D features (reference path).",
                         flags=("--dense/--factored",)),
        "eig_every": Setting("int", 0, MAX_STEPS, default=1000,
                             help="Top Hessian eigenvalue every N steps (a multiple of --log-every; 0: never)."),
    },
    name="convex", dtype="float64", steps=10_000, log_every=10, seeds=[29], optimizer=["gd", "zo"],
)

# The paper's Figure 2 setting. Step sizes: ZO as in the paper's public scripts (SVM 1e-4, logistic
# 0.01); GD/SAM step sizes are ones that converge on both data sets (measured: see README; logistic
# 0.1, used before, keeps GD in a period-2 cycle: λ_max reaches 2/lr); DD uses ZO's.
MODEL_DEFAULTS = {
    "svm": {"lambda": 0.005, "lr": default_lrs(gradient=1e-3, zo=1e-4, per_coordinate=1e-3)},
    "logreg": {"lambda": 0.01, "lr": default_lrs(gradient=0.01, zo=0.01, per_coordinate=1e-3)},
}


def defaults_for(chosen: dict) -> dict:
    """The defaults that depend on what the recipe and flags chose: the model sets λ and the step
    sizes; the w5a-like re-split of the bundled w8a applies only when no data set is chosen."""
    model = chosen.get("model", "svm")
    if not isinstance(model, str) or model not in CONVEX_MODELS:
        raise ZoflatError(f"unknown model {model!r}; choose from {', '.join(CONVEX_MODELS)}")
    data_chosen = "dataset" in chosen or "data_file" in chosen
    return {"model": model, **MODEL_DEFAULTS[model],
            **({"dataset": None} if "data_file" in chosen else {}), **({"train_size": None} if data_chosen else {})}


def check(config: dict) -> dict:
    """What depends on several settings."""
    if config["test_file"] is not None and config["data_file"] is None:
        raise ZoflatError("--test-file needs --data-file (the training file it tests)")
    if config["eig_every"] and config["eig_every"] % config["log_every"]:
        raise ZoflatError(f"eig_every ({config['eig_every']}) must be a multiple of log_every "
                          f"({config['log_every']}): λ_max is computed at logged steps only")
    return config


def problem_maker(config):
    """make_problem(device, dtype) for the config's data (loaded once, here). The problem (torch) is
    imported here, when a run starts, not with the command line."""
    from zoflat_cli.data import libsvm_sets
    from zoflat_cli.problems.convex import ConvexProblem

    train, test, description = libsvm_sets.load_splits(config.dataset, config.data_file, config.test_file,
                                                       config.train_size, config.split_seed)

    def make_problem(device, dtype):
        return ConvexProblem(train, test, config.model, config.features, config.dense, dtype, device, description,
                             config.eig_every)

    return make_problem


def run(config, runs, quiet: bool = False, resume=None):
    from zoflat_cli.engine.batched import run_batched

    return run_batched(config, runs, problem_maker(config), quiet, resume)


def points(config, runs, steps: dict, folder=None):
    from zoflat_cli.engine.points import batched_points

    return batched_points(config, runs, problem_maker(config), steps)


EXPERIMENT = Experiment(
    "convex", "SVM / logistic regression on random features of LIBSVM data (paper Figures 2 and 5).", SETTINGS, run,
    check=check, defaults_for=defaults_for, position=2, points=points)
