"""`zoflat toy`: Example 2.1 of the paper, f(y, z) = (yᵀz - 1)²/2 (problems/toy.py).

The paper's setting (Section 2, Figure 1): d = 100, T = 100,000, GD lr 0.01, ZO lr 0.001, λ = 0.1.
"""

from zoflat_cli.experiments.experiment import Experiment, table
from zoflat_cli.experiments.settings import Setting
from zoflat_cli.optim.presets import default_lrs

SETTINGS = table(
    {"dim": Setting("int", 1, 10**9, default=100, help="d: y, z in R^d.")},  # memory is checked separately
    name="toy", dtype="float64", steps=100_000, log_every=100, seeds=[13], optimizer=["gd", "zo", "dd"],
    lr=default_lrs(gradient=0.01, zo=0.001, per_coordinate=0.001), **{"lambda": 0.1},
)


# The engine and the problem (torch) are imported when a run starts, not with the command line.
def run(config, runs, quiet: bool = False, resume=None):
    from zoflat_cli.engine.batched import run_batched
    from zoflat_cli.problems.toy import ToyProblem

    return run_batched(config, runs, lambda device, dtype: ToyProblem(config.dim), quiet, resume)


def points(config, runs, steps: dict, folder=None):
    from zoflat_cli.engine.points import batched_points
    from zoflat_cli.problems.toy import ToyProblem

    return batched_points(config, runs, lambda device, dtype: ToyProblem(config.dim), steps)


EXPERIMENT = Experiment(
    "toy", "Example 2.1: f(y, z) = (yᵀz - 1)²/2. ZO drifts to the flat minimum (Hessian trace 2).", SETTINGS, run,
    position=1, points=points)
