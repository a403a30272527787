"""Sweep overhead: 24 toy jobs run one by one (the total work), then as a sweep through the local
launcher (--jobs 2) and through a local Ray instance (2 CPUs), side by side in one run.

Prints each sweep's wall time against total work / 2 cores (target: within 1.2x), and Ray's
start-up (ray.init to a ready instance) on its own.

    python benchmarks/sweep_overhead.py [--steps 30000] [--jobs 24]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZOFLAT = [sys.executable, "-m", "zoflat_cli"]


def grid(steps: int, jobs: int) -> list:
    """jobs runs: 4 λ × 2 optimizers × jobs/8 seeds, each a separate run of `steps` steps."""
    return ["-o", "zo,zo-momentum", "--lambda", "0.1,0.05,0.02,0.01", "--seeds", str(jobs // 8), "--steps",
            str(steps), "--dim", "100", "--log-every", "1000"]


def timed(args, cwd) -> float:
    start = time.perf_counter()
    subprocess.run(ZOFLAT + args, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30000)
    parser.add_argument("--jobs", type=int, default=24)
    args = parser.parse_args()
    recipe = str(REPO / "recipes" / "toy" / "fig4.yaml")
    flags = grid(args.steps, args.jobs)
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(REPO))
        from zoflat_cli.cli import planned_config
        from zoflat_cli.tools.sweep import expand

        jobs = expand(planned_config("toy", ["--config", recipe, *flags]))
        one_by_one = 0.0
        for run_id, job in jobs.items():  # the total work: every job alone, one after another
            one_by_one += timed(["toy", "--config", recipe, "-o", job["optimizer"][0], "--lambda",
                                 str(job["lambda"]), "--seeds", f"{job['seeds'][0]},", "--steps", str(args.steps),
                                 "--dim", "100", "--log-every", "1000", "--out", f"{tmp}/alone", "-q"], tmp)
        ideal = one_by_one / 2
        local = timed(["sweep", recipe, *flags, "--jobs", "2", "--out", f"{tmp}/local", "-q"], tmp)
        ray_wall = timed(["sweep", recipe, *flags, "--launcher", "ray", "--jobs", "2", "--out", f"{tmp}/ray", "-q"], tmp)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import ray; ray.init(num_cpus=2, include_dashboard=False, "
                        "logging_level='ERROR'); ray.shutdown()"], check=True, capture_output=True)
        ray_start = time.perf_counter() - start
    print(f"{len(jobs)} toy jobs of {args.steps} steps: {one_by_one:.1f} s one by one "
          f"({one_by_one / len(jobs):.1f} s a job); total work / 2 cores = {ideal:.1f} s")
    print(f"  local --jobs 2   {local:7.1f} s   {local / ideal:.2f}x the ideal   (target <= 1.2x)")
    print(f"  ray (2 CPUs)     {ray_wall:7.1f} s   {ray_wall / ideal:.2f}x the ideal, "
          f"{(ray_wall - ray_start) / ideal:.2f}x without Ray's start-up")
    print(f"  Ray start-up     {ray_start:7.1f} s   (python -c 'ray.init(); ray.shutdown()' in a fresh process)")


if __name__ == "__main__":
    main()
