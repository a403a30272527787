"""`zoflat finetune` on tiny random RoBERTa models (offline): heads, in-place ZO, traces, resume."""

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import DEVICES
from typer.testing import CliRunner

from zoflat_cli.runs import folder as runfolder
from zoflat_cli.cli import app
from zoflat_cli.experiments import finetune
from zoflat_cli.errors import ZoflatError
from zoflat_cli.measures.hessian import finite_difference, hutchinson
from zoflat_cli.optim.parameters import ParameterDirections
from zoflat_cli.optim.estimators import ESTIMATORS, tilted_coefficients
from zoflat_cli.optim.inplace import InPlaceOptimizer
from zoflat_cli.optim.updates import UPDATES
from zoflat_cli.problems import encoder as lm
from zoflat_cli.data.lmbff_tasks import TASKS, kshot

runner = CliRunner()


def make_problem(model, dtype=torch.float64, task="sst2", k=8, head="auto", device="cpu", **extra):
    config = finetune.EXPERIMENT.resolve({"model": model, "task": task, "k": k, "head": head, **extra})
    train, _, test = kshot(TASKS[task], k, 13)
    return lm.EncoderProblem(config, TASKS[task], {"train": train.examples(), "test": test.examples()[:40]},
                        torch.device(device), dtype)


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


# ---------------------------------------------------------------- heads and encoding

def test_prompt_encoding_places_template_and_mask(tiny_mlm):
    problem = make_problem(tiny_mlm)
    tok = problem.tokenizer
    ids, pos = lm.encode_prompt(TASKS["sst2"], tok, "a fine film", 128)
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and ids[pos] == tok.mask_token_id
    assert tok.decode(ids[1:pos]) == "a fine film It was" and tok.decode(ids[pos + 1:-1]) == "."
    ids, pos = lm.encode_prompt(TASKS["trec"], tok, "Who won ?", 128)
    assert pos == 1 and tok.decode(ids[2:-1]) == ": Who won ?"
    short, pos = lm.encode_prompt(TASKS["sst2"], tok, "word " * 200, 20)
    assert len(short) == 20 and short[pos] == tok.mask_token_id and tok.decode(short[pos + 1:-1]) == "."


def test_prompt_logits_are_mlm_logits_at_mask_on_label_words(tiny_mlm):
    from transformers import AutoModelForMaskedLM

    problem = make_problem(tiny_mlm)
    reference = AutoModelForMaskedLM.from_pretrained(tiny_mlm, dtype=torch.float64).eval()
    ids, mask, mask_pos, _ = problem.splits["train"].batches[0]
    with torch.no_grad():
        full = reference(input_ids=ids, attention_mask=mask).logits
        ours = problem.model(ids, mask, mask_pos)
    words = [problem.tokenizer.convert_tokens_to_ids("Ġ" + w) for w in ("terrible", "great")]
    torch.testing.assert_close(ours, full[torch.arange(len(ids)), mask_pos][:, words])


def test_linear_head_starts_from_label_word_embeddings(tiny_encoder):
    problem = make_problem(tiny_encoder)
    assert problem.head == "linear"
    w = problem.model.weight.detach()
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(2, dtype=w.dtype))
    loss, accuracy = problem.evaluate("train").values()
    assert 0 < loss < 10 and 0 <= accuracy <= 1


def test_prompt_head_needs_an_mlm_head(tiny_encoder):
    with pytest.raises(ZoflatError, match="has no MLM head.*--head linear"):
        make_problem(tiny_encoder, head="prompt")


def test_unknown_hub_model_offline_is_one_clear_line():
    with pytest.raises(ZoflatError, match="not in the Hugging Face cache.*smollm2-135m or tiny-opt \\(decoder LMs.*minilm"):
        make_problem("roberta-large")


# ---------------------------------------------------------------- in-place directions and ZO

def in_place(d, estimator="two-point", update="sgd", **hyper):
    """The engine's in-place optimizer for one run's hyperparameters (lr, lambda, tilt, ...)."""
    return InPlaceOptimizer(d, ESTIMATORS[estimator], UPDATES[update], {"lr": 0.0, "lambda": 0.0, **hyper})


def test_directions_are_standard_normal_and_thread_independent(tiny_mlm, monkeypatch):
    problem = make_problem(tiny_mlm, dtype=torch.float32)
    monkeypatch.setattr("zoflat_cli.optim.directions.CHUNK", 1000)  # many chunks
    d = ParameterDirections(problem.params, module=problem.model)
    z = flat(d.draw((123, 0)))
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
    assert torch.equal(z, flat(d.draw((123, 0)))) and not torch.equal(z, flat(d.draw((124, 0))))
    d._pool = None  # one thread: same numbers
    assert torch.equal(z, flat(d.draw((123, 0))))


@pytest.mark.parametrize("device", DEVICES)
def test_zo_step_estimates_directional_derivative_and_restores(tiny_mlm, device):
    problem = make_problem(tiny_mlm, device=device)
    d = ParameterDirections(problem.params, module=problem.model)
    before = flat(problem.params).clone()
    grad = flat(problem.gradient())
    z = flat(d.draw((7, 0)))
    lam = 1e-6
    (c,), _ = in_place(d, **{"lambda": lam}).step(problem, [(7, 0)], 1)
    assert c == pytest.approx(float(z @ grad), rel=1e-6)  # central difference: error O(λ²)
    restored = flat(problem.params)
    # in place, restoring is exact up to one rounding of (x + λz) - λz per parameter
    assert (restored - before).abs().max() <= 4 * torch.finfo(torch.float64).eps * (before.abs() + lam * z.abs()).max()
    (c,), _ = in_place(d, lr=0.5, **{"lambda": lam}).step(problem, [(7, 0)], 1)
    torch.testing.assert_close(flat(problem.params), before - 0.5 * c * z)


@pytest.mark.parametrize("device", DEVICES)
def test_replaying_the_update_log_is_bit_identical(tiny_mlm, device):
    problem = make_problem(tiny_mlm, dtype=torch.float32, device=device)
    opt = in_place(ParameterDirections(problem.params, module=problem.model), lr=1e-2, **{"lambda": 1e-3})
    log = []
    for step in range(5):
        keys = [(1000, step), (2000, step)]
        log.append((keys, opt.step(problem, keys, step + 1)))
    trained = flat(problem.params).clone()
    problem.load_base()
    opt = in_place(ParameterDirections(problem.params, module=problem.model), lr=1e-2, **{"lambda": 1e-3})
    for step, (keys, logged) in enumerate(log):
        opt.step(None, keys, step + 1, logged=logged)
    assert torch.equal(flat(problem.params), trained)


@pytest.mark.parametrize("device", DEVICES)
def test_zest_in_place_uses_the_tilted_weights_and_replays_bit_identically(tiny_mlm, device):
    problem = make_problem(tiny_mlm, device=device)
    d = ParameterDirections(problem.params, module=problem.model)
    before = flat(problem.params).clone()
    keys, lam, t, lr = [(3, 0), (4, 0), (5, 0)], 1e-3, 10.0, 0.1
    evaluated = []

    class Recording:
        def loss(self):
            evaluated.append(problem.loss())
            return evaluated[-1]

    coefs, _ = in_place(d, "tilted", lr=lr, tilt=t, **{"lambda": lam}).step(Recording(), keys, 1)
    losses = torch.tensor([evaluated[0::2], evaluated[1::2]])  # f⁺ and f⁻, python floats
    torch.testing.assert_close(torch.tensor(coefs), tilted_coefficients(losses, lam, torch.tensor(t)))
    z = [flat(d.draw(s)) for s in keys]
    update = sum(c * zi for c, zi in zip(coefs, z))
    torch.testing.assert_close(flat(problem.params), before - lr * update)
    trained = flat(problem.params).clone()
    problem.load_base()
    in_place(ParameterDirections(problem.params, module=problem.model), "tilted", lr=lr, tilt=t, **{"lambda": lam}).step(
        None, keys, 1, logged=(coefs, True))
    assert torch.equal(flat(problem.params), trained)


def test_sam_step_is_gd_at_the_ascent_point(tiny_mlm, tmp_path):
    problem = make_problem(tiny_mlm)
    x0 = flat(problem.params).clone()
    g = flat(problem.gradient())
    rho, lr = 0.05, 0.1
    ascent = x0 + rho * g / g.norm()
    with torch.no_grad():  # by hand: the gradient at the ascent point
        torch.nn.utils.vector_to_parameters(ascent, problem.params)
    expected = x0 - lr * flat(problem.gradient())
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(x0, problem.params)
    in_place(ParameterDirections(problem.params, module=problem.model), "sam", lr=lr, rho=rho).step(problem, [], 1)
    torch.testing.assert_close(flat(problem.params), expected)


# ---------------------------------------------------------------- Hessian traces vs the exact Hessian

def _few_params_problem(tiny_mlm, device="cpu"):
    """Only the last LayerNorm and the MLM head's bias train: a Hessian small enough to form."""
    problem = make_problem(tiny_mlm, device=device)
    head = problem.model.mlm_head
    problem.params = [head.layer_norm.weight, head.layer_norm.bias, head.dense.bias]
    return problem


def _exact_hessian(problem):
    """Row by row with autograd: H[i] = ∂(∂f/∂x_i)/∂x."""
    with problem.double_backward():
        loss = sum(problem.loss_terms())
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, problem.params, create_graph=True)])
        rows = [torch.autograd.grad(grad[i], problem.params, retain_graph=True) for i in range(len(grad))]
    return torch.stack([torch.cat([r.reshape(-1) for r in row]) for row in rows])


@pytest.mark.parametrize("device", DEVICES)
def test_hutchinson_and_fd_match_the_exact_hessian(tiny_mlm, device):
    problem = _few_params_problem(tiny_mlm, device)
    H = _exact_hessian(problem)
    torch.testing.assert_close(H, H.T)
    exact = torch.trace(H).item()
    # one probe: vᵀHv exactly, for the same Rademacher v
    gen = torch.Generator(device).manual_seed(5)
    with problem.double_backward():
        one, _ = hutchinson(problem.params, problem.hvp, 1, gen)
    gen = torch.Generator(device).manual_seed(5)
    v = torch.cat([torch.randint(0, 2, p.shape, generator=gen, device=device).to(p.dtype) * 2 - 1
                   for p in problem.params])
    assert one == pytest.approx(float(v @ H @ v), rel=1e-8)
    # fd: uᵀHu up to O(δ²), for the same Gaussian u
    d = ParameterDirections(problem.params, module=problem.model)
    u = flat(d.draw((11, 0)))
    fd_one, _ = finite_difference(d, problem.loss, [(11, 0)], 1e-4)
    assert fd_one == pytest.approx(float(u @ H @ u), rel=1e-4)
    # both unbiased: many probes land within 4 standard errors of the exact trace
    with problem.double_backward():
        mean, stderr = hutchinson(problem.params, problem.hvp, 200, torch.Generator(device).manual_seed(1))
    assert abs(mean - exact) < 4 * stderr and stderr < 0.2 * abs(exact)
    mean, stderr = finite_difference(d, problem.loss, [(k, 0) for k in range(200)], 1e-4)
    assert abs(mean - exact) < 4 * stderr and stderr < 0.3 * abs(exact)


@pytest.mark.parametrize("device", DEVICES)
def test_power_iteration_finds_the_top_eigenvalue(tiny_mlm, device):
    from zoflat_cli.measures.hessian import top_eigenvalue

    problem = _few_params_problem(tiny_mlm, device)
    eigenvalues = torch.linalg.eigvalsh(_exact_hessian(problem))
    assert eigenvalues[-1] > abs(eigenvalues[0])  # λ_max dominates here
    with problem.double_backward():
        top = top_eigenvalue(problem.params, problem.hvp, 200, torch.Generator(device).manual_seed(0))
    assert top == pytest.approx(eigenvalues[-1].item(), rel=1e-6)


def test_fd_trace_leaves_parameters_bit_identical(tiny_mlm):
    problem = make_problem(tiny_mlm, dtype=torch.float32)
    before = flat(problem.params).clone()
    finite_difference(ParameterDirections(problem.params, module=problem.model), problem.loss, [(1, 0), (2, 0), (3, 0)], 1e-3)
    assert torch.equal(flat(problem.params), before)


# ---------------------------------------------------------------- the command line, end to end

def _invoke(*args):
    return runner.invoke(app, ["finetune", *map(str, args)], catch_exceptions=False)


def _rows(path: Path) -> list:
    with open(path / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


COMMON = ["--task", "sst2", "--k", "8", "--steps", "8", "--log-every", "2", "--eval-every", "4",
          "--trace-every", "4", "--trace-probes", "2", "--lr", "gd=0.05", "--lr", "zo=0.01", "--quiet"]
MODEL_COLUMNS = ("loss", "accuracy", "test_loss", "test_accuracy", "hessian_trace", "hessian_trace_stderr")


def test_finetune_cli_end_to_end(tiny_mlm, tmp_path):
    result = _invoke("--model", tiny_mlm, "-o", "gd,zo", "--out", tmp_path, *COMMON)
    assert result.exit_code == 0, result.output
    path = Path(result.output.strip())
    rows = _rows(path)
    assert {r["run_id"] for r in rows} == {"gd-lr0.05-s0", "zo-lam0.002-lr0.01-s0"}
    zo = [r for r in rows if r["optimizer"] == "zo"]
    assert [int(r["step"]) for r in zo] == [0, 2, 4, 6, 8]
    assert [r["test_accuracy"] != "" for r in zo] == [True, False, True, False, True]
    assert float(zo[-1]["n_evals"]) == 16 and float(zo[-1]["forward_passes"]) >= 16
    assert float(zo[-1]["peak_memory_mib"]) > 0
    assert zo[0]["loss"] != zo[-1]["loss"]
    assert (path / "updates" / "zo-lam0.002-lr0.01-s0.bin").stat().st_size == 40 + 8 * (16 + 16)  # header; step, accepted, (key, c)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["panels"] == ["loss", "test_accuracy", "hessian_trace"]
    assert summary["problem"]["head"] == "prompt" and summary["problem"]["train_examples"] == 16
    # the saved config re-runs to the same numbers
    again = _invoke("--config", path / "config.yaml", "--out", tmp_path / "again", "--quiet")
    rerun = _rows(Path(again.output.strip()))
    assert [[r[c] for c in MODEL_COLUMNS] for r in rerun] == [[r[c] for c in MODEL_COLUMNS] for r in rows]
    plotted = runner.invoke(app, ["plot", str(path)])
    assert plotted.exit_code == 0 and (path / "figure.png").is_file()


@pytest.mark.parametrize("device", DEVICES[1:])
def test_finetune_on_cuda_repeats_itself_and_gd_follows_the_cpu_path(tiny_mlm, tmp_path, device):
    args = ["--model", tiny_mlm, "-o", "gd,zo,zest", "--pairs", "2", "--dtype", "float64", "--eig-every", "8",
            "--eig-iters", "3", *COMMON]
    rows = {}
    for name, on in (("cpu", "cpu"), ("cuda", device), ("again", device)):
        result = _invoke(*args, "--device", on, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        rows[name] = _rows(Path(result.output.strip()))
    columns = (*MODEL_COLUMNS, "lambda_max", "grad_norm")
    assert [[r[c] for c in columns] for r in rows["again"]] == [[r[c] for c in columns] for r in rows["cuda"]]
    on_cpu, on_gpu = ([float(r["loss"]) for r in rows[k] if r["optimizer"] == "gd"] for k in ("cpu", "cuda"))
    assert on_gpu == pytest.approx(on_cpu, rel=1e-9) and len(set(on_gpu)) == len(on_gpu)
    assert all(float(r["peak_memory_mib"]) > 0 and r["loss"] != "nan" for r in rows["cuda"])


def test_finetune_sam_and_zest_with_sharpness_columns(tiny_mlm, tmp_path):
    result = _invoke("--model", tiny_mlm, "-o", "sam,zest", "--tilt", "1", "--pairs", "2", "--eig-every", "8",
                     "--eig-iters", "3", "--out", tmp_path, *COMMON[:-5], "--quiet")
    assert result.exit_code == 0, result.output
    path = Path(result.output.strip())
    rows = _rows(path)
    zest = [r for r in rows if r["optimizer"] == "zest"]
    assert zest[-1]["n_evals"] == "32" and zest[-1]["samples"] == "2" and zest[-1]["tilt"] == "1.0"
    assert [r["lambda_max"] != "" for r in zest] == [True, False, False, False, True]
    assert all(r["grad_norm"] != "" for r in zest if r["test_accuracy"] != "")
    assert (path / "updates" / f"{zest[0]['run_id']}.bin").stat().st_size == 40 + 8 * (16 + 2 * 16)
    assert {r["optimizer"] for r in rows} == {"sam", "zest"}
    summary = json.loads((path / "summary.json").read_text())
    assert summary["panels"] == ["loss", "test_accuracy", "hessian_trace", "lambda_max", "grad_norm"]


def test_finetune_linear_head_with_fd_trace(tiny_encoder, tmp_path):
    result = _invoke("--model", tiny_encoder, "-o", "zo", "--trace", "fd", "--out", tmp_path, *COMMON)
    assert result.exit_code == 0, result.output
    rows = _rows(Path(result.output.strip()))
    assert rows[0]["hessian_trace"] != "" and rows[0]["hessian_trace_stderr"] != ""


def test_interrupted_runs_resume_to_the_uninterrupted_result(tiny_mlm, tmp_path, monkeypatch):
    straight = _invoke("--model", tiny_mlm, "-o", "gd,zo", "--out", tmp_path / "a", *COMMON)
    reference = _rows(Path(straight.output.strip()))

    original = runfolder.RunFolder.on_log

    def interrupt_at_step_4(self, step, rows, states):  # Ctrl-C while the first run logs step 4
        original(self, step, rows, states)
        if step == 4 and rows[0]["optimizer"] == "gd" and not os.environ.get("RESUMED"):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(runfolder.RunFolder, "on_log", interrupt_at_step_4)
    stopped = _invoke("--model", tiny_mlm, "-o", "gd,zo", "--out", tmp_path / "b", *COMMON)
    assert stopped.exit_code == 130
    path = Path(stopped.stdout.strip().splitlines()[0])
    assert json.loads((path / "summary.json").read_text())["status"] == "interrupted"
    assert (path / "checkpoints" / "gd-lr0.05-s0.pt").is_file()  # GD cannot be replayed
    monkeypatch.setenv("RESUMED", "1")
    resumed = _invoke("--resume", path, "--quiet")
    assert resumed.exit_code == 0, resumed.output
    rows = _rows(path)
    key = lambda r: (r["run_id"], int(r["step"]))  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, reference))
    got = {key(r): [r[c] for c in MODEL_COLUMNS] for r in rows}
    assert got == {key(r): [r[c] for c in MODEL_COLUMNS] for r in reference}


def test_zo_resume_after_a_kill_replays_the_log(tiny_mlm, tmp_path):
    """A killed ZO run (no checkpoint) is rebuilt from its update log, bit for bit."""
    args = ["--model", tiny_mlm, "-o", "zo", *COMMON]
    full = _rows(Path(_invoke(*args, "--out", tmp_path / "a").output.strip()))
    short = Path(_invoke(*args, "--out", tmp_path / "b").output.strip())
    # pretend the process died after step 5: log holds 5 records, metrics rows up to step 6
    log = short / "updates" / "zo-lam0.002-lr0.01-s0.bin"
    log.write_bytes(log.read_bytes()[: 5 * 24 + 7])  # and a torn sixth record
    summary = json.loads((short / "summary.json").read_text())
    summary["runs"]["zo-lam0.002-lr0.01-s0"]["status"] = "running"
    (short / "summary.json").write_text(json.dumps(summary))
    assert _invoke("--resume", short, "--quiet").exit_code == 0
    assert [[r[c] for c in MODEL_COLUMNS] for r in _rows(short)] == [[r[c] for c in MODEL_COLUMNS] for r in full]


def test_resume_on_another_device_kind_is_refused_before_replaying(tiny_mlm, tmp_path):
    """CPU and CUDA generators draw different directions from one seed: a replay elsewhere would
    silently rebuild another model."""
    folder = Path(_invoke("--model", tiny_mlm, "-o", "zo", "--out", tmp_path, *COMMON).output.strip())
    summary = json.loads((folder / "summary.json").read_text())
    summary.update(device="cuda:0")  # as if drawn on a GPU
    summary["runs"]["zo-lam0.002-lr0.01-s0"]["status"] = "interrupted"
    (folder / "summary.json").write_text(json.dumps(summary))
    before = (folder / "metrics.csv").read_bytes()
    result = runner.invoke(app, ["finetune", "--resume", str(folder), "--device", "cpu"])
    assert result.exit_code == 2 and "can only be continued there" in result.output and "resume with --device cuda" in result.output
    assert len(result.output.strip().splitlines()) == 1 and (folder / "metrics.csv").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--task", "mnli"], "task must be one of sst2, sst5, trec, rte, "),
    (["--head", "mlp"], "head must be one of"),
    (["--task", "trec", "--k", "50"], "fewer than 2K = 100"),
    (["--data-dir", "/nonexistent"], "is not a directory"),
    (["-o", "zoo"], "unknown optimizer 'zoo'"),
    (["--directions", "uniform"], "unknown directions 'uniform'"),
    (["--lr", "zoo=0.5"], "lr names an unknown optimizer 'zoo' (did you mean 'fzoo' or 'zo'?)"),
    (["--model", "roberta-large"], "not in the Hugging Face cache"),
    (["--model", "/nonexistent/model"], "no config.json"),
])
def test_finetune_bad_input_is_one_line(tiny_mlm, tmp_path, args, message):
    base = ["--model", tiny_mlm, "--steps", "1", "--out", tmp_path]
    result = runner.invoke(app, ["finetune", *map(str, base + args)])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_resume_refuses_other_flags(tmp_path):
    result = runner.invoke(app, ["finetune", "--resume", str(tmp_path), "--lr", "0.1"])
    assert result.exit_code == 2 and "only --steps, --device" in result.output
