"""A/B: one benchmark on this tree and on another commit's, interleaved, side by side.

For a change that should not change speed (a refactor): the benchmark script of each tree runs
with that tree's package first on the path, alternately, `--repeats` times each; it prints each
tree's median wall time, their ratio, and each run's output, the two trees' line by line side by side.

    python benchmarks/ab.py --base HEAD~1 -- benchmarks/toy_batched_vs_numpy.py --steps 20000 --seeds 5
    python benchmarks/ab.py --base main --repeats 3 -- benchmarks/finetune_zo_step.py --models minilm
"""

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(tree: Path, script: str, args: list) -> tuple:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(tree / script), *args], cwd=tree, env=env, capture_output=True,
                          text=True)
    if done.returncode:
        sys.exit(f"error: {script} failed in {tree}:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, done.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="The commit to compare this working tree with.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS]: a benchmark of this repository")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the benchmark: -- benchmarks/NAME.py [ARGS]")
    script, script_args = command[0], command[1:]
    with tempfile.TemporaryDirectory(prefix="zoflat-ab-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=REPO, check=True,
                       capture_output=True)
        try:
            walls, outputs = {"base": [], "this": []}, {"base": [], "this": []}
            for _, (label, tree) in itertools.product(range(args.repeats), (("base", base), ("this", REPO))):
                wall, output = run(tree, script, script_args)
                print(f"  {label}: {wall:.2f} s", flush=True)  # as it goes: a long A/B cut short keeps its runs
                walls[label].append(wall)
                outputs[label].append(output.splitlines())
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, capture_output=True)
    base_s, this_s = statistics.median(walls["base"]), statistics.median(walls["this"])
    print(f"{script} {' '.join(script_args)}: {args.repeats} runs each, interleaved")
    print(f"  median wall: base ({args.base}) {base_s:.2f} s, this tree {this_s:.2f} s -> this / base = "
          f"{this_s / base_s:.3f}")
    width = max((len(line) for lines in outputs["base"] for line in lines), default=0)
    for repeat, (base_lines, this_lines) in enumerate(zip(outputs["base"], outputs["this"]), start=1):
        print(f"\n  {f'base: run {repeat}':<{width}} | this tree: run {repeat}")
        for left, right in itertools.zip_longest(base_lines, this_lines, fillvalue=""):
            print(f"  {left:<{width}} | {right}")


if __name__ == "__main__":
    main()
