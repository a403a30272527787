"""Seed studies: `zoflat toy` with thousands of seeds, each in a fresh process: wall time and peak
resident memory, against the number of runs; with --base-tree, the same commands on another
checkout's package (e.g. a git worktree of an older commit), side by side with the ratios.

    python benchmarks/seed_study.py                                  # this tree
    git worktree add /tmp/old 4625bf8
    python benchmarks/seed_study.py --base-tree /tmp/old             # before / after
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The command's own peak (VmHWM, KiB): ru_maxrss would keep the parent's across exec on Linux.
PEAK = ("import sys\nsys.argv = ['zoflat'] + sys.argv[1:]\nfrom zoflat_cli.cli import main\ntry:\n    main()\n"
        "finally:\n    print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)\n")


def measure(tree: Path, seeds: int, dim: int, steps: int) -> tuple:
    """(wall seconds, peak MiB) of one toy run of `seeds` ZO runs, in a fresh process."""
    with tempfile.TemporaryDirectory() as out:
        args = ["toy", "-o", "zo", "--seeds", str(seeds), "--dim", str(dim), "--steps", str(steps), "-q", "--out", out]
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        began = time.perf_counter()
        # cwd: `python -c` puts the working directory first on sys.path, so it must be the tree measured
        done = subprocess.run([sys.executable, "-c", PEAK, *args], cwd=tree, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - began
    if done.returncode:
        sys.exit(f"error: {tree}: {done.stderr.strip()[-400:]}")
    return wall, int(done.stderr.split()[-1]) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="100,1000,10000", help="Seed counts, comma-separated.")
    parser.add_argument("--dim", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--base-tree", type=Path, help="Another checkout to compare with (its package is run).")
    args = parser.parse_args()
    trees = [("this tree", REPO)] + ([("base", args.base_tree)] if args.base_tree else [])
    print(f"zoflat toy -o zo --dim {args.dim} --steps {args.steps}, each in a fresh process (python start and "
          f"imports included)")
    header = f"{'seeds':>7}" + "".join(f" | {name + ' s':>12} {name + ' MiB':>14}" for name, _ in trees)
    print(header + (" | base/this: time, memory" if args.base_tree else ""))
    for seeds in map(int, args.seeds.split(",")):
        results = [measure(tree, seeds, args.dim, args.steps) for _, tree in trees]
        line = f"{seeds:>7}" + "".join(f" | {wall:>12.1f} {peak:>14.0f}" for wall, peak in results)
        if args.base_tree:
            (wall, peak), (base_wall, base_peak) = results
            line += f" | {base_wall / wall:.1f}x, {base_peak / peak:.1f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
