"""`zoflat convex` speed and memory, measured side by side in one run.

Part 1 (iteration): one ZO iteration on the w5a-sized problem (N = 9,888, d = 300, D = 10,000,
test 39,861; the offline re-split of w8a) with train + test metrics logged every 10 steps,
factored path vs the --dense reference (N x D features materialised), same seed and data.
Part 2 (figure2): the whole Figure 2 set (SVM and logistic x a5a-like and w5a-like x gd and zo,
10,000 iterations each) through the real CLI, total wall time and the peak memory of the runs.

    python benchmarks/convex_factored_vs_dense.py                  # both parts
    python benchmarks/convex_factored_vs_dense.py --part iteration --iterations 50
    python benchmarks/convex_factored_vs_dense.py --part figure2 --steps 2000
"""

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from zoflat_cli.data import libsvm_sets as datasets
from zoflat_cli.problems.convex import ConvexProblem
from zoflat_cli.engine.batched import Trainer, make_groups
from zoflat_cli.runs.spec import RunSpec

REPO = Path(__file__).resolve().parents[1]
FIGURE2 = ["fig2_svm-offline", "fig2_svm_a5a-offline", "fig2_logreg-offline", "fig2_logreg_a5a-offline"]


def time_iterations(train, test, dense: bool, iterations: int):
    start = time.perf_counter()
    problem = ConvexProblem(train, test, "svm", 10_000, dense, torch.float64, torch.device("cpu"))
    groups = make_groups(problem, [RunSpec("zo", 1e-4, 29, 1, (("lambda", 0.005),))], torch.float64,
                         torch.device("cpu"))
    setup = time.perf_counter() - start
    Trainer(problem, groups, 10, 10).run()  # warm-up
    start = time.perf_counter()
    Trainer(problem, groups, iterations, 10).run()  # logs train + test metrics every 10 steps
    return setup, (time.perf_counter() - start) / iterations


def part_iteration(iterations: int):
    config = {"dataset": "w8a", "data_file": None, "test_file": None, "train_size": 9_888, "split_seed": 0}
    train, test, description = datasets.load_splits(**config)
    print(f"iteration: {description}, D = 10,000, ZO (svm), metrics every 10 steps, {iterations} iterations")
    setup_f, factored = time_iterations(train, test, False, iterations)
    setup_d, dense = time_iterations(train, test, True, iterations)
    print(f"  factored: {factored * 1e3:8.2f} ms/iteration (setup {setup_f:.1f} s)")
    print(f"  dense:    {dense * 1e3:8.2f} ms/iteration (setup {setup_d:.1f} s)")
    print(f"  speed-up factored vs dense: {dense / factored:.1f}x")


def part_figure2(steps: int, out: str):
    start = time.perf_counter()
    for recipe in FIGURE2:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "zoflat_cli", "convex", "--config", f"recipes/convex/{recipe}.yaml",
                        "--steps", str(steps), "--out", out, "--quiet"], check=True, cwd=REPO)
        print(f"  {recipe}: {time.perf_counter() - t0:.1f} s", flush=True)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"figure2: 4 invocations x (gd + zo) x {steps} steps: {time.perf_counter() - start:.1f} s in all, "
          f"peak memory of one run {peak_mib:.0f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["iteration", "figure2", "all"], default="all")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench"), help="where the figure2 runs go")
    args = parser.parse_args()
    if args.part in ("figure2", "all"):  # first, so the dense part's memory is not counted
        part_figure2(args.steps, args.out)
    if args.part in ("iteration", "all"):
        part_iteration(args.iterations)


if __name__ == "__main__":
    main()
