"""The benchmark scripts still run (tiny settings; their timings are not asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_toy_benchmark_runs():
    out = run("benchmarks/toy_batched_vs_numpy.py", "--steps", "200", "--seeds", "2")
    lines = [line.split(":")[0].split() for line in out.splitlines() if "fast / numpy" in line]
    assert lines == [["zo", "1", "curve(s)", "x", "1", "seed(s)"], ["figure1", "5", "curve(s)", "x", "2", "seed(s)"]]


def test_convex_benchmark_runs(tmp_path):
    out = run("benchmarks/convex_factored_vs_dense.py", "--part", "figure2", "--steps", "20", "--out", str(tmp_path))
    assert "figure2: 4 invocations" in out and len(list((tmp_path / "convex").iterdir())) == 4


def test_finetune_benchmark_runs():
    out = run("benchmarks/finetune_zo_step.py", "--models", "roberta-small", "--repeats", "1", "--dtypes", "float32",
              "--trainable", "all,lora", "--methods", "zo,mezo-svrg")
    assert "zoflat ZO step" in out and "update pass" in out and "(target zo <= 1.1x)" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith(("  zo ", "  mezo-svrg "))] == \
        ["zo", "mezo-svrg"]


@pytest.mark.slow  # 2–3 min: three fresh processes per dtype × trainable
def test_causal_benchmark_runs():
    out = run("benchmarks/causal_zo_step.py", "--models", "tiny", "--repeats", "1")
    assert all(f"{name} " in out for name in ("in-place ZO step", "MeZO-style step", "GD step", "Hutchinson probe",
                                               "fd probe", "greedy generation"))
    assert [line.split()[:2] for line in out.splitlines() if line.startswith(("  float32", "  bfloat16"))] == \
        [["float32", "all"], ["float32", "lora"], ["bfloat16", "all"], ["bfloat16", "lora"]]


def test_zest_overhead_benchmark_runs():
    out = run("benchmarks/zest_overhead.py", "--pairs", "2", "--repeats", "1")
    assert out.count("ZEST overhead") == 6  # toy: estimate and step for 1 and 9 runs; convex; finetune


def test_seed_study_benchmark_runs():
    out = run("benchmarks/seed_study.py", "--seeds", "3", "--steps", "5")
    assert out.splitlines()[-1].split()[0] == "3" and "this tree MiB" in out


@pytest.mark.slow  # 1.5 min: one fresh process per measure
def test_flatness_benchmark_runs():
    out = run("benchmarks/flatness_cost.py", "--model", "tiny", "--trainable", "all", "--probes", "1", "--hutchpp", "3",
              "--top-k", "1", "--slq-steps", "3", "--points", "3", "--ascent-steps", "1")
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and "forward eq." not in line]
    assert rows == ["forward", "gradient", "Hessian-vector", "trace", "eigenvalues", "density", "modules", "sharpness",
                    "landscape"]
