"""Figure 1 + Figure 4 of the paper, side by side: zoflat's batched runs vs a plain numpy loop.

zoflat: 5 curves (gd, zo λ=0.1, dd, zo λ=0.05, zo λ=0.01) x 5 seeds = 25 runs, through the real
CLI pipeline (run folder, CSV, summary), logging every 100 steps.
numpy:  the same 5 curves for ONE seed, one per-step loop per curve, logging every 100 steps;
        and, for reference, the same loop in the style of the paper's public toy script
        (metrics recorded every step, numpy's legacy global RNG).

    python benchmarks/toy_batched_vs_numpy.py            # the issue's setting: 100,000 steps
    python benchmarks/toy_batched_vs_numpy.py --steps 20000 --seeds 5 --repeats 2
"""

import argparse
import tempfile
import time

import numpy as np

from zoflat_cli.experiments.toy import EXPERIMENT as TOY

CURVES = [("gd", 0.01, None), ("zo", 0.001, 0.1), ("dd", 0.001, None), ("zo", 0.001, 0.05), ("zo", 0.001, 0.01)]


def numpy_curve(optimizer, lr, lam, steps, dim=100, log_every=100, seed=13, legacy_rng=False):
    rng = np.random.RandomState(seed) if legacy_rng else np.random.default_rng(seed)
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


def time_numpy(steps, **style):
    start = time.perf_counter()
    for optimizer, lr, lam in CURVES:
        numpy_curve(optimizer, lr, lam, steps, **style)
    return time.perf_counter() - start


def time_zoflat(steps, seeds, out):
    flags = {"steps": steps, "seeds": seeds, "lambda": [0.1, 0.05, 0.01], "out": out, "name": "bench"}
    config = TOY.resolve(flags)
    start = time.perf_counter()
    _, status = TOY.start(config, quiet=True)
    assert status == "completed"
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--seeds", default="1,5,25", help="zoflat seed counts to time (5 curves each)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    seed_counts = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as out:
        for rep in range(1, args.repeats + 1):
            t_numpy = time_numpy(args.steps)
            print(f"[{rep}] {args.steps} steps, logging every 100 | numpy loop, 5 curves x 1 seed: "
                  f"{t_numpy:.1f} s ({t_numpy / args.steps * 1e6:.0f} us/step)", flush=True)
            t_paper = time_numpy(args.steps, log_every=1, legacy_rng=True)
            print(f"[{rep}]   reference: paper-style numpy loop (metrics every step, legacy RNG), "
                  f"5 curves x 1 seed: {t_paper:.1f} s", flush=True)
            for seeds in seed_counts:
                t = time_zoflat(args.steps, seeds, out)
                print(f"[{rep}]   zoflat 5 curves x {seeds:>3} seeds ({5 * seeds:>3} runs): {t:6.1f} s"
                      f" ({t / args.steps * 1e6:.0f} us/step) | ratio to numpy(1 seed) = {t / t_numpy:.2f}"
                      f" | to numpy x {seeds} seeds (linear) = {t / (t_numpy * seeds):.2f}", flush=True)


if __name__ == "__main__":
    main()
