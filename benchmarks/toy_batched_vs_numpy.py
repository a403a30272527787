"""The toy (Figure 1 of the paper): zoflat's command against a plain numpy loop, side by side in one run.

Every timing is a fresh process, start-up included, as a researcher waits for it:
  numpy     the paper-style loop (one per-step loop per curve, metrics every 100 steps), for the curves asked;
  zoflat    `zoflat toy` through the real CLI (run folder, CSV, summary): the batched runner's small-problem
            fast path (numpy views, engine/batched.py), and the general torch path it replaces (forced by
            setting the fast path's size limit to 0), with the training time alone (metrics.csv's wall_s).
Cases: one ZO run (`-o zo --seeds 1`), Figure 1's five curves (gd, zo λ=0.1,0.05,0.01, dd) for one seed, and the
five curves for 25 seeds (the fast path must not be slower than the general one there).

    python benchmarks/toy_batched_vs_numpy.py            # the issue's setting: 100,000 steps
    python benchmarks/toy_batched_vs_numpy.py --steps 20000 --seeds 1,5
"""

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CURVES = {"zo": [("zo", 0.001, 0.1)],
          "figure1": [("gd", 0.01, None), ("zo", 0.001, 0.1), ("dd", 0.001, None), ("zo", 0.001, 0.05),
                      ("zo", 0.001, 0.01)]}
FLAGS = {"zo": ["-o", "zo", "--lambda", "0.1"], "figure1": ["--lambda", "0.1,0.05,0.01"]}
GENERAL = "import zoflat_cli.engine.batched as b; b.UNIT = 0; "  # the fast path's size limit: none qualifies


def numpy_curve(optimizer, lr, lam, steps, dim=100, log_every=100, seed=13):
    rng = np.random.default_rng(seed)
    y, z = rng.standard_normal(dim), rng.standard_normal(dim)
    log = []
    for t in range(steps + 1):
        if t % log_every == 0:
            log.append((0.5 * (y @ z - 1) ** 2, y @ y + z @ z, (y @ y - z @ z) / 2))
        if t == steps:
            break
        if optimizer == "gd":
            r = y @ z - 1
            gy, gz = r * z, r * y
        else:
            a, b = rng.standard_normal(dim), rng.standard_normal(dim)
            if optimizer == "zo":
                f_plus = 0.5 * ((y + lam * a) @ (z + lam * b) - 1) ** 2
                f_minus = 0.5 * ((y - lam * a) @ (z - lam * b) - 1) ** 2
                c = (f_plus - f_minus) / (2 * lam)
            else:
                c = (y @ z - 1) * (z @ a + y @ b)
            gy, gz = c * a, c * b
        y, z = y - lr * gy, z - lr * gz
    return log


def timed(command) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def time_numpy(case: str, steps: int) -> float:
    return timed([sys.executable, __file__, "--numpy-child", case, "--steps", str(steps)])


def time_zoflat(case: str, steps: int, seeds: int, general: bool, out: str) -> tuple:
    """(wall s of the command, training s from metrics.csv)."""
    name = f"{case}-{seeds}-{'general' if general else 'fast'}"
    flags = ["toy", *FLAGS[case], "--steps", str(steps), "--seeds", str(seeds), "--out", out, "--name", name]
    prefix = GENERAL if general else ""
    wall = timed([sys.executable, "-c", prefix + "import sys; from zoflat_cli.__main__ import main; "
                  "sys.argv[0] = 'zoflat'; main()", *flags])
    folder = next(p for p in (Path(out) / "toy").iterdir() if p.name.endswith(name))
    with open(folder / "metrics.csv") as f:
        training = max(float(r["wall_s"]) for r in csv.DictReader(f))
    return wall, training


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--seeds", default="1,25", help="seed counts of Figure 1's five curves to time")
    parser.add_argument("--numpy-child", choices=list(CURVES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.numpy_child:
        for curve in CURVES[args.numpy_child]:
            numpy_curve(*curve, args.steps)
        return
    print(f"{args.steps} steps, logging every 100; fresh processes, start-up included (training alone in brackets)")
    with tempfile.TemporaryDirectory() as out:
        cases = [("zo", 1)] + [("figure1", int(s)) for s in args.seeds.split(",")]
        for case, seeds in cases:
            curves = len(CURVES[case])
            t_numpy = time_numpy(case, args.steps)
            fast, fast_train = time_zoflat(case, args.steps, seeds, False, out)
            general, general_train = time_zoflat(case, args.steps, seeds, True, out)
            print(f"  {case:8s} {curves} curve(s) x {seeds:>2} seed(s): numpy loop (1 seed) {t_numpy:6.1f} s | "
                  f"zoflat fast path {fast:6.1f} s ({fast_train:5.1f}) | general path {general:6.1f} s "
                  f"({general_train:5.1f}) | fast / numpy = {fast / t_numpy:.2f}, per seed {fast / t_numpy / seeds:.2f}"
                  f" | fast / general = {fast / general:.2f}", flush=True)


if __name__ == "__main__":
    main()
