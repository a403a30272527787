"""ZEST's cost beyond its 2n loss evaluations, side by side with ZO at the same n.

  batched (toy/convex path): one estimate on the toy (d = 100) and on the w5a-sized convex problem
      (factored features), zo with n directions vs zest with n pairs: both evaluate the same 2n
      losses in one call; on the toy also a whole trainer step (directions, estimate, update)
  in place (finetune path): one step on a small random RoBERTa, n directions, zo vs zest

    python benchmarks/zest_overhead.py [--pairs 4] [--repeats 20]
"""

import argparse
import tempfile
from pathlib import Path

import torch

from zoflat_cli.data import libsvm_sets as datasets
from timing import timed  # benchmarks/timing.py (this folder is on sys.path)
from zoflat_cli.experiments import finetune
from zoflat_cli.optim.parameters import ParameterDirections
from zoflat_cli.engine.batched import estimate
from zoflat_cli.optim.estimators import ESTIMATORS
from zoflat_cli.optim.inplace import InPlaceOptimizer
from zoflat_cli.optim.updates import UPDATES
from zoflat_cli.problems import encoder as lm
from zoflat_cli.problems.convex import ConvexProblem
from zoflat_cli.problems.toy import ToyProblem
from zoflat_cli.models.tiny import save_tiny_roberta
from zoflat_cli.data.lmbff_tasks import TASKS, kshot
from zoflat_cli.engine.batched import make_groups
from zoflat_cli.runs.spec import RunSpec


def two_point(problem, x, u, hyper):
    return estimate(ESTIMATORS["two-point"], problem, x, u, hyper)


def zest(problem, x, u, hyper):
    return estimate(ESTIMATORS["tilted"], problem, x, u, hyper)


def report(label, zo, ze):
    print(f"  {label}: zo {zo * 1e3:9.3f} ms, zest {ze * 1e3:9.3f} ms -> ZEST overhead {100 * (ze / zo - 1):+.1f}% "
          f"(target <= +10%)")


def batched(pairs: int, repeats: int):
    config = {"dataset": "w8a", "data_file": None, "test_file": None, "train_size": 9_888, "split_seed": 0}
    train, test, description = datasets.load_splits(**config)
    problem = ConvexProblem(train, test, "svm", 10_000, False, torch.float64, torch.device("cpu"))
    bound = problem.bind([RunSpec("zest", 1e-4, 29)])
    x = 0.1 * torch.randn(1, problem.n_params, dtype=torch.float64)
    u = torch.randn(pairs, 1, problem.n_params, dtype=torch.float64)
    hyper = {"lambda": torch.full((1, 1), 0.005, dtype=torch.float64),
             "tilt": torch.full((1, 1), 1.0, dtype=torch.float64)}
    print(f"batched, convex SVM ({description}, D = 10,000), {pairs} directions / pairs per step:")
    with torch.inference_mode():
        report("estimate", timed(lambda: two_point(bound, x, u, hyper), repeats),
               timed(lambda: zest(bound, x, u, hyper), repeats))


def toy(pairs: int, repeats: int):
    problem = ToyProblem(100)
    print(f"batched, toy (d = 100), {pairs} directions / pairs per step:")
    for runs in (1, 9):
        x = torch.randn(runs, 200, dtype=torch.float64)
        u = torch.randn(pairs, runs, 200, dtype=torch.float64)
        hyper = {"lambda": torch.full((runs, 1), 0.1, dtype=torch.float64),
                 "tilt": torch.full((runs, 1), 1.0, dtype=torch.float64)}
        zo_runs = [RunSpec("zo", 1e-3, seed, pairs, (("lambda", 0.1),)) for seed in range(runs)]
        zest_runs = [RunSpec("zest", 1e-3, seed, pairs, (("lambda", 0.1), ("tilt", 1.0))) for seed in range(runs)]
        zo_group, zest_group = (make_groups(problem, r, torch.float64, torch.device("cpu"))[0]
                                for r in (zo_runs, zest_runs))
        with torch.inference_mode():
            report(f"estimate, {runs} runs", timed(lambda: two_point(problem, x, u, hyper), 50 * repeats),
                   timed(lambda: zest(problem, x, u, hyper), 50 * repeats))
            report(f"trainer step, {runs} runs", timed(lambda: zo_group.step(0), 50 * repeats),
                   timed(lambda: zest_group.step(0), 50 * repeats))


def in_place(pairs: int, repeats: int):
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_roberta(Path(tmp), hidden=256, layers=4, vocab_size=4000)
        config = finetune.EXPERIMENT.resolve({"model": model, "k": 16, "micro_batch": 32})
        train, _, _ = kshot(TASKS["sst2"], 16, 13)
        problem = lm.EncoderProblem(config, TASKS["sst2"], {"train": train.examples()}, torch.device("cpu"), torch.float32)
        d = ParameterDirections(problem.params, module=problem.model)
        seeds = [(i, 0) for i in range(pairs)]
        hyper = {"lr": 1e-6, "lambda": 1e-3, "tilt": 1.0}
        zo_step = InPlaceOptimizer(d, ESTIMATORS["two-point"], UPDATES["sgd"], hyper)
        zest_step = InPlaceOptimizer(d, ESTIMATORS["tilted"], UPDATES["sgd"], hyper)
        print(f"in place, random RoBERTa ({problem.n_params / 1e6:.1f}M parameters, 32 examples), {pairs} directions:")
        zo = timed(lambda: zo_step.step(problem, seeds, 1), repeats)
        ze = timed(lambda: zest_step.step(problem, seeds, 1), repeats)
        report("step", zo, ze)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    toy(args.pairs, args.repeats)
    batched(args.pairs, args.repeats)
    in_place(args.pairs, max(3, args.repeats // 4))


if __name__ == "__main__":
    main()
