"""`--resume` in every command, through the real CLI: a stopped or finished run continues bit for
bit, past the old --steps too, with stateful update rules (momentum, Adam); a folder whose
directions this version would draw differently is refused."""

import csv
import json
import os
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from zoflat_cli.cli import app
from zoflat_cli.runs import folder as runfolder

runner = CliRunner()
FAMILY = "gd,zo-adam,zo-momentum,zo-cons"


def zoflat(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return Path(result.stdout.strip().splitlines()[0])  # --quiet: the run folder


def table(folder: Path) -> dict:
    """(run_id, step) -> row without wall_s (and peak memory: a property of the process)."""
    with open(folder / "metrics.csv", newline="") as f:
        return {(r["run_id"], r["step"]): {k: v for k, v in r.items() if k not in ("wall_s", "peak_memory_mib")}
                for r in csv.DictReader(f)}


def interrupt_at(monkeypatch, step: int):
    """A SIGINT (Ctrl-C) as soon as `step` is logged, once: the runner stops after that step."""
    original, sent = runfolder.RunFolder.on_log, []

    def on_log(self, at, rows, states):
        original(self, at, rows, states)
        if at == step and not sent:
            sent.append(at)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(runfolder.RunFolder, "on_log", on_log)
    return sent


def straight_and_resumed(args, tmp_path, monkeypatch, at: int) -> tuple:
    """The command `args` run straight, and again stopped by a Ctrl-C at step `at` and resumed; the
    two folders (straight, stopped), whose metrics must be equal."""
    straight = zoflat(*args, "--out", tmp_path / "a")
    sent = interrupt_at(monkeypatch, at)
    stopped = zoflat(*args, "--out", tmp_path / "b", code=130)
    assert sent and json.loads((stopped / "summary.json").read_text())["status"] == "interrupted"
    assert max(int(step) for _, step in table(stopped)) == at
    monkeypatch.undo()
    zoflat(args[0], "--resume", stopped, "--quiet")
    assert table(stopped) == table(straight)
    return straight, stopped


COMMANDS = {
    "toy": ["toy", "--dim", 8, "--log-every", 10, "--seeds", 2, "--lr", "zo-adam=0.001", "--lr", "zo-momentum=1e-4"],
    "convex": ["convex", "--features", 300, "--log-every", 10, "--eig-every", 20, "--directions", "rademacher",
               "--lr", "zo-adam=1e-4", "--lr", "zo-cons=1e-3", "--lr", "zo-momentum=1e-5"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_batched_resume_past_the_old_steps_equals_a_straight_run(command, tmp_path):
    args = [*COMMANDS[command], "-o", FAMILY, "--quiet"]
    straight = zoflat(*args, "--steps", 60, "--out", tmp_path / "a")
    first = zoflat(*args, "--steps", 30, "--out", tmp_path / "b")
    assert json.loads((first / "summary.json").read_text())["status"] == "completed"
    zoflat(command, "--resume", first, "--steps", 60, "--quiet")
    assert table(first) == table(straight)
    assert json.loads((first / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("command", COMMANDS)
def test_batched_resume_after_ctrl_c_equals_a_straight_run(command, tmp_path, monkeypatch):
    straight_and_resumed([*COMMANDS[command], "-o", FAMILY, "--steps", 60, "--quiet"], tmp_path, monkeypatch, 20)


def test_finetune_resume_with_stateful_rules_is_bit_exact(tiny_mlm, tmp_path, monkeypatch):
    args = ["finetune", "--model", tiny_mlm, "--task", "sst2", "--k", 8, "--log-every", 2, "--eval-every", 4,
            "--trace", "none", "-o", "zo-adam,zo-momentum", "--lr", "zo-adam=1e-4", "--lr", "zo-momentum=1e-3",
            "--checkpoint-every", 3, "--quiet"]
    straight = zoflat(*args, "--steps", 10, "--out", tmp_path / "a")
    sent = interrupt_at(monkeypatch, 4)
    stopped = zoflat(*args, "--steps", 6, "--out", tmp_path / "b", code=130)
    assert sent
    monkeypatch.undo()
    zoflat("finetune", "--resume", stopped, "--quiet")  # finishes the 6 steps (Adam state from checkpoint + log)
    zoflat("finetune", "--resume", stopped, "--steps", 10, "--quiet")  # and goes on past them
    assert table(stopped) == table(straight)


def test_resume_refuses_a_folder_drawn_by_another_directions_format(tmp_path):
    folder = zoflat("toy", "--dim", 4, "--steps", 20, "--log-every", 10, "-o", "zo", "--out", tmp_path, "--quiet")
    summary = json.loads((folder / "summary.json").read_text())
    summary["formats"]["directions"] = 1
    (folder / "summary.json").write_text(json.dumps(summary))
    before = (folder / "metrics.csv").read_bytes()
    result = runner.invoke(app, ["toy", "--resume", str(folder), "--steps", "40"])
    assert result.exit_code == 2 and result.output.startswith("error: --resume") and "format" in result.output
    assert len(result.output.strip().splitlines()) == 1 and (folder / "metrics.csv").read_bytes() == before


@pytest.mark.parametrize("command", COMMANDS)
def test_resume_below_the_steps_done_is_refused_and_keeps_every_row(command, tmp_path):
    folder = zoflat(*COMMANDS[command], "-o", "zo", "--steps", 30, "--out", tmp_path, "--quiet")
    before = (folder / "metrics.csv").read_bytes(), (folder / "config.yaml").read_bytes()
    result = runner.invoke(app, [command, "--resume", str(folder), "--steps", "20"])
    assert result.exit_code == 2 and "below the 30 steps already done" in result.output
    assert ((folder / "metrics.csv").read_bytes(), (folder / "config.yaml").read_bytes()) == before


# ---------------------------------------------------------------- prompt stop, no repeated work

TINY_FINETUNE = ["finetune", "--task", "sst2", "--k", 8, "--log-every", 2, "--eval-every", 2, "--trace", "hutchinson",
                 "--trace-every", 2, "--trace-probes", 4, "-o", "zo,zo-adam", "--lr", "zo-adam=1e-4", "--quiet"]


def count_calls(monkeypatch, cls, name: str, then=None) -> list:
    """Every call of cls.name (its args); `then(calls)` after each."""
    original, calls = getattr(cls, name), []

    def counted(self, *args):
        calls.append(args)
        result = original(self, *args)
        if then:
            then(calls)
        return result

    monkeypatch.setattr(cls, name, counted)
    return calls


def test_a_stop_during_an_evaluation_acts_at_the_next_micro_batch_and_resumes_before_it(tiny_mlm, tmp_path,
                                                                                        monkeypatch):
    from zoflat_cli.problems.pretrained import PretrainedProblem

    args = [*TINY_FINETUNE, "--model", tiny_mlm, "--steps", 6, "--micro-batch", 4]
    straight = zoflat(*args, "--out", tmp_path / "a")
    sent, batches = [], []

    def stop_in_the_trace(calls):  # the second HVP of zo's step-4 trace: a Ctrl-C mid-evaluation
        if len(calls) == 2 * 4 + 2 and not sent:  # steps 0 and 2: 4 probes each
            sent.append(len(batches))
            os.kill(os.getpid(), signal.SIGINT)

    count_calls(monkeypatch, PretrainedProblem, "hvp", stop_in_the_trace)
    original = PretrainedProblem.my_batches
    monkeypatch.setattr(PretrainedProblem, "my_batches",
                        lambda self, split: (batches.append(b) or b for b in original(self, split)))
    stopped = zoflat(*args, "--out", tmp_path / "b", code=130)
    assert sent and len(batches) == sent[0]  # not one micro-batch more after the signal
    assert max(int(step) for _, step in table(stopped)) == 2  # step 4's evaluation was discarded
    assert json.loads((stopped / "summary.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    zoflat("finetune", "--resume", stopped, "--quiet")
    assert table(stopped) == table(straight)


def test_resume_does_not_evaluate_a_logged_step_again_and_step_0_is_evaluated_once_per_seed(tiny_mlm, tmp_path,
                                                                                           monkeypatch):
    from zoflat_cli.problems.pretrained import PretrainedProblem

    args = [*TINY_FINETUNE, "--model", tiny_mlm, "--steps", 6, "--seeds", "0,1"]
    calls = count_calls(monkeypatch, PretrainedProblem, "metrics")
    straight = zoflat(*args, "--out", tmp_path / "a")
    # 4 runs (2 optimizers x 2 seeds) log steps 0, 2, 4, 6; step 0 once per seed
    assert sorted(calls) == sorted([(0, 0), (1, 0)] + [(s, t) for s in (0, 1) for t in (2, 4, 6)] * 2)
    calls.clear()
    sent = interrupt_at(monkeypatch, 4)
    stopped = zoflat(*args, "--out", tmp_path / "b", code=130)
    assert sent and calls[-1] == (0, 4)  # the first run stopped after logging step 4
    calls.clear()
    zoflat("finetune", "--resume", stopped, "--quiet")
    assert (0, 4) not in calls[:1] and calls[0] == (0, 6)  # step 4 was logged: not evaluated again
    assert table(stopped) == table(straight)
