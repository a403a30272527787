"""`zoflat finetune` on tiny random decoder LMs (GPT-2, OPT, LLaMA layouts; offline): option scoring,
losses, ZO in place, traces against the exact Hessian, generation, objectives, and the CLI."""

import csv
import json

import pytest
import torch
from test_finetune import _exact_hessian, flat, in_place
from typer.testing import CliRunner

from zoflat_cli.experiments import finetune
from zoflat_cli.cli import app
from zoflat_cli.measures.hessian import finite_difference, hutchinson
from zoflat_cli.optim.parameters import ParameterDirections

runner = CliRunner()
ARCHS = ("gpt2", "opt", "llama")


def make_problem(model, task="copa", n=6, dtype=torch.float64, **extra):
    config = finetune.EXPERIMENT.resolve({"model": model, "task": task, "num_train": n, "num_dev": 2,
                                          "num_eval": n, "max_length": 200, **extra})
    return finetune.make_problem(config, torch.device("cpu"), dtype)


def full_logprobs(problem, batch):
    """Per row, Σ log p(token t | tokens < t) over the option tokens, from the model's own full logits."""
    logits = problem.hf_model(input_ids=batch.ids, attention_mask=batch.mask).logits
    logp = torch.log_softmax(logits, -1)
    sums = []
    for r in range(len(batch.ids)):
        positions = batch.target[r].nonzero().flatten().tolist()
        sums.append(sum(logp[r, t - 1, batch.ids[r, t]] for t in positions))
    return torch.stack(sums)


# ---------------------------------------------------------------- option scoring and losses

@pytest.mark.parametrize("arch", ARCHS)
def test_option_scores_are_sums_of_token_logprobs_and_the_loss_their_cross_entropy(tiny_causal, arch):
    problem = make_problem(tiny_causal(arch), "copa")
    batch = problem.splits["train"].batches[0]
    with torch.no_grad():
        scores = problem.model(*problem._inputs(batch))
        torch.testing.assert_close(scores, full_logprobs(problem, batch))
        table = torch.full(batch.correct.shape, float("-inf"), dtype=scores.dtype)
        for s, e, slot in zip(scores, batch.row_example, batch.row_slot):
            table[e, slot] = s
        expected = -torch.log_softmax(table, -1)[torch.arange(batch.examples), batch.gold].sum()
        torch.testing.assert_close(problem._batch_loss(scores, batch), expected)
    with torch.no_grad():
        total = sum(float(problem._batch_loss(problem.model(*problem._inputs(b)), b))
                    for b in problem.splits["train"].batches)
    assert problem.cross_entropy("train") == pytest.approx(total / problem.splits["train"].size)


def test_option_tokens_are_the_full_text_beyond_the_context(tiny_causal):
    problem = make_problem(tiny_causal("opt"), "rte")
    tok = problem.tokenizer
    encoded = problem.encoded["train"][0]
    ids, n = encoded.rows[0]
    assert ids[0] == tok.bos_token_id and tok.decode(ids[-n:]) == "Yes"
    assert tok.decode(encoded.rows[1][0][-encoded.rows[1][1]:]) == "No"
    copa = make_problem(tiny_causal("gpt2"), "copa").encoded["train"][0]
    texts = [tok.decode(ids[-n:]) for ids, n in copa.rows]
    assert all(t.startswith(" ") and t.endswith(".") for t in texts)  # " the sun was rising."


def test_every_option_of_a_micro_batch_goes_through_one_forward_pass(tiny_causal):
    problem = make_problem(tiny_causal("gpt2"), "copa", n=8, micro_batch=4)
    calls = []
    hook = problem.hf_model.base_model.register_forward_hook(lambda m, args, kwargs_out: calls.append(1))
    try:
        problem.evaluate("train")
    finally:
        hook.remove()
    assert len(calls) == len(problem.splits["train"].batches) == 2
    assert len(problem.splits["train"].batches[0].ids) == 8  # 4 examples × 2 options


def test_mean_scoring_divides_by_the_option_length(tiny_causal):
    summed = make_problem(tiny_causal("gpt2"), "copa")
    mean = make_problem(tiny_causal("gpt2"), "copa", scoring="mean")
    batch = summed.splits["train"].batches[0]
    with torch.no_grad():
        scores = summed.model(*summed._inputs(batch))
        table = mean.option_scores(scores, mean.splits["train"].batches[0])
    torch.testing.assert_close(table[batch.row_example, batch.row_slot], scores / batch.lengths)


def test_generation_loss_is_the_answer_tokens_mean_nll(tiny_causal):
    problem = make_problem(tiny_causal("llama"), "squad", train_pool="eval")
    batches = problem.splits["train"]
    with torch.no_grad():
        nll = -sum(full_logprobs(problem, b).sum() for b in batches.batches)
    tokens = sum(int(b.target.sum()) for b in batches.batches)
    assert batches.weight == tokens
    assert problem.cross_entropy("train") == pytest.approx(float(nll) / tokens)


# ---------------------------------------------------------------- ZO in place, traces

# OPT's and LLaMA's attention take their softmax in float32 even in a float64 model: their loss
# carries float32 rounding, so the checks are to float32's digits and the central difference needs a
# larger λ (error O(λ²)) to rise above that noise; GPT-2 is float64 throughout
@pytest.mark.parametrize("arch,lam,rel", [("gpt2", 1e-6, 1e-6), ("llama", 1e-3, 5e-3), ("opt", 1e-5, 1e-3)])
def test_zo_in_place_equals_the_autograd_directional_derivative(tiny_causal, arch, lam, rel):
    problem = make_problem(tiny_causal(arch), "rte")
    d = ParameterDirections(problem.params, module=problem.model)
    z = flat(d.draw((7, 0)))
    with problem.double_backward():  # eager attention throughout, as forward-mode AD runs it
        grad = flat(problem.gradient())
        assert problem.jvp(d.draw((7, 0))) == pytest.approx(float(z @ grad), rel=min(rel, 1e-5))
        before = flat(problem.params).clone()
        (c,), _ = in_place(d, **{"lambda": lam}).step(problem, [(7, 0)], 1)
        assert c == pytest.approx(float(z @ grad), rel=rel)
        (c,), _ = in_place(d, lr=0.5, **{"lambda": lam}).step(problem, [(7, 0)], 1)
    torch.testing.assert_close(flat(problem.params), before - 0.5 * c * z)


def test_hutchinson_and_fd_match_the_exact_hessian_of_a_causal_lm(tiny_causal):
    problem = make_problem(tiny_causal("gpt2"), "copa")
    final_norm = problem.hf_model.transformer.ln_f
    problem.params = [final_norm.weight, final_norm.bias]  # 64 parameters: a Hessian small enough to form
    H = _exact_hessian(problem)
    torch.testing.assert_close(H, H.T)
    exact = torch.trace(H).item()
    with problem.double_backward():
        mean, stderr = hutchinson(problem.params, problem.hvp, 300, torch.Generator().manual_seed(1))
    assert abs(mean - exact) < 4 * stderr and stderr < 0.3 * abs(exact)
    d = ParameterDirections(problem.params, module=problem.model)
    u = flat(d.draw((11, 0)))
    fd_one, _ = finite_difference(d, problem.loss, [(11, 0)], 1e-4)
    assert fd_one == pytest.approx(float(u @ H @ u), rel=1e-3)  # error O(δ²)


# ---------------------------------------------------------------- generation

@pytest.mark.parametrize("arch", ("gpt2", "llama"))
def test_batched_greedy_decoding_equals_one_example_at_a_time(tiny_causal, arch):
    batched = make_problem(tiny_causal(arch), "squad", n=6, train_pool="eval", micro_batch=6, max_new_tokens=6,
                           dtype=torch.float32)
    single = make_problem(tiny_causal(arch), "squad", n=6, train_pool="eval", micro_batch=1, max_new_tokens=6,
                          dtype=torch.float32)
    assert sorted(batched.generate("test")) == sorted(single.generate("test"))
    em, f1 = batched.answer_scores("test")
    assert 0 <= em <= f1 <= 1


# ---------------------------------------------------------------- the CLI

def finetune_cli(tmp_path, *args):
    result = runner.invoke(app, ["finetune", "--num-train", "8", "--num-dev", "2", "--num-eval", "8",
                                 "--max-length", "200", "--trace-probes", "2", "--out", str(tmp_path), "--quiet",
                                 *args])
    return result


def rows(folder):
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("task,arch,extra,metric", [
    ("rte", "opt", ["--optimizer", "zo,gd"], "test_accuracy"),
    ("copa", "gpt2", ["--optimizer", "zest,gd", "--trace", "fd"], "test_accuracy"),
    ("squad", "llama", ["--optimizer", "zo,gd", "--train-pool", "eval", "--max-new-tokens", "4"], "test_f1"),
])
def test_cli_runs_resumes_bit_exactly_and_plots_each_task_kind(tiny_causal, tmp_path, task, arch, extra, metric):
    common = ["--model", tiny_causal(arch), "--task", task, "--log-every", "2",
              "--eval-every", "4", "--trace-every", "4", *extra]
    result = finetune_cli(tmp_path / "whole", *common, "--steps", "4")
    assert result.exit_code == 0, result.output
    whole = next((tmp_path / "whole" / "finetune").iterdir())
    result = finetune_cli(tmp_path / "parts", *common, "--steps", "2")
    assert result.exit_code == 0, result.output
    part = next((tmp_path / "parts" / "finetune").iterdir())
    result = runner.invoke(app, ["finetune", "--resume", str(part), "--steps", "4", "--quiet"])
    assert result.exit_code == 0, result.output

    def strip(table):  # resumed rows are appended run after run: compare in (run, step) order
        table = sorted(table, key=lambda r: (r["run_id"], int(r["step"])))
        return [{k: v for k, v in r.items() if k not in ("wall_s", "peak_memory_mib")} for r in table]
    assert strip(rows(part)) == strip(rows(whole))
    table = rows(whole)
    assert {r["optimizer"] for r in table} == set(extra[1].split(","))
    assert all(r[metric] != "" and r["hessian_trace"] != "" for r in table if r["step"] in ("0", "4"))
    summary = json.loads((whole / "summary.json").read_text())
    assert all(run["status"] == "completed" for run in summary["runs"].values())
    result = runner.invoke(app, ["plot", str(whole)])
    assert result.exit_code == 0 and (whole / "figure.png").is_file()


def test_objective_accuracy_is_what_zo_raises(tiny_causal, tmp_path):
    result = finetune_cli(tmp_path, "--model", tiny_causal("gpt2"), "--task", "sst2", "--num-train", "32",
                          "--num-dev", "0", "--max-length", "64", "--objective", "accuracy", "--optimizer", "zo",
                          "--lambda", "0.3", "--lr", "3", "--steps", "50", "--log-every", "50", "--trace", "none",
                          "--eval-every", "50")
    assert result.exit_code == 0, result.output
    first, last = rows(next((tmp_path / "finetune").iterdir()))
    assert float(first["objective"]) == pytest.approx(1 - float(first["accuracy"]))
    assert float(last["accuracy"]) >= float(first["accuracy"]) + 0.15


def test_in_context_demonstrations_are_an_evaluation_without_training(tiny_causal, tmp_path):
    result = finetune_cli(tmp_path, "--model", tiny_causal("gpt2"), "--task", "copa", "--demos", "2",
                          "--steps", "0", "--trace", "none")
    assert result.exit_code == 0, result.output
    folder = next((tmp_path / "finetune").iterdir())
    row, = rows(folder)
    assert row["step"] == "0" and row["test_accuracy"] != ""
    problem = make_problem(tiny_causal("gpt2"), "copa", demos=2, steps=0)
    demo = problem.tokenizer.decode(problem.encoded["test"][0].rows[0][0])
    assert demo.count("\n\n") == 2  # two demonstrations, each followed by MeZO's separator


@pytest.mark.parametrize("args,message", [
    (["--task", "rte", "--optimizer", "gd", "--objective", "accuracy"], "not differentiable: gd"),
    (["--task", "squad", "--objective", "accuracy"], "does not fit task squad"),
    (["--task", "copa", "--demos", "2"], "add --steps 0"),
    (["--task", "trec"], "encoder task"),
    (["--task", "boolq"], "not bundled, not cached"),
    (["--task", "rte", "--head", "prompt"], "for encoder models"),
    (["--task", "rte", "--max-length", "5000"], "beyond the 512 positions"),
    (["--task", "squad", "--train-pool", "eval", "--max-length", "4"], "does not fit --max-length 4"),
    (["--task", "rte", "--num-eval", "0"], "num_eval must be >= 1"),
    (["--task", "rte", "--scoring", "max"], "scoring must be one of"),
])
def test_bad_input_is_one_line_and_leaves_no_folder(tiny_causal, tmp_path, args, message):
    result = finetune_cli(tmp_path / "out", "--model", tiny_causal("gpt2"), "--steps", "2", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_decoder_task_with_an_encoder_is_one_line(tiny_mlm, tmp_path):
    result = finetune_cli(tmp_path / "out", "--model", tiny_mlm, "--task", "rte", "--steps", "2")
    assert result.exit_code == 2 and "needs a decoder LM" in result.output
    assert not (tmp_path / "out").exists()
