"""The batched trainer: the paper's balance dynamics, batching invariance, divergence, Ctrl-C."""

import contextlib
import csv
import json

import pytest
import torch

from zoflat_cli.problems.toy import ToyProblem
from zoflat_cli.engine.batched import Trainer, make_groups
from zoflat_cli.engine.loop import session
from zoflat_cli.runs.spec import RunSpec
from zoflat_cli.runs.folder import RunFolder

CPU = torch.device("cpu")


def train(problem, runs, steps, log_every, dtype=torch.float64, extra=()):
    """Runs the trainer; returns ({step: {run_id: row}}, states)."""
    rows = {}

    def collect(step, logged, states):
        rows[step] = {r["run_id"]: r for r in logged}

    groups = make_groups(problem, runs, dtype, CPU)
    states = Trainer(problem, groups, steps, log_every, [collect, *extra]).run()
    return rows, states


def balance_slope(rows, steps, optimizer):
    """Least-squares slope of B_T on B_0 across seeds: estimates E[B_T | B_0] / B_0."""
    b0 = torch.tensor([r["balance"] for r in rows[0].values() if r["optimizer"] == optimizer])
    bt = torch.tensor([r["balance"] for r in rows[steps].values() if r["optimizer"] == optimizer])
    return float((b0 * bt).sum() / (b0 * b0).sum())


def test_zo_mean_balance_decays_at_the_predicted_rate_and_dd_does_not():
    problem, steps, lr, lam = ToyProblem(5), 2000, 0.001, 0.5
    runs = [RunSpec("zo", lr, s, 1, (("lambda", lam),)) for s in range(500)]
    runs += [RunSpec("dd", lr, s, 1) for s in range(300)]
    rows, _ = train(problem, runs, steps, steps)
    predicted = (1 - 2 * lr * lam**2) ** steps  # Proposition 2.2: about e^-1 here
    assert abs(balance_slope(rows, steps, "zo") / predicted - 1) < 0.05
    assert abs(balance_slope(rows, steps, "dd") - 1) < 0.05
    # the theory column carries the same prediction per run
    some_zo = next(r for r in rows[steps].values() if r["optimizer"] == "zo")
    b0 = rows[0][some_zo["run_id"]]["balance"]
    assert abs(some_zo["balance_theory"] - b0 * predicted) < 1e-9 * abs(b0)


@pytest.mark.parametrize("law", ["rademacher", "sphere"])
def test_every_direction_law_drifts_at_its_predicted_rate(law):
    """Proposition 2.2 holds for any law with E[u] = 0, E[uuᵀ] = I and independent coordinates;
    on the sphere of radius √n the drift is slower by κ = n/(n+2) (here n = 10: 0.83)."""
    problem, steps, lr, lam = ToyProblem(5), 2000, 0.001, 0.5
    runs = [RunSpec("zo", lr, s, 1, (("lambda", lam),), law) for s in range(1000)]
    rows, _ = train(problem, runs, steps, steps)
    kappa = problem.drift_factor(law)
    predicted, gaussian = (1 - 2 * kappa * lr * lam**2) ** steps, (1 - 2 * lr * lam**2) ** steps
    assert abs(balance_slope(rows, steps, "zo") / predicted - 1) < 0.04
    if law == "sphere":
        assert balance_slope(rows, steps, "zo") / gaussian - 1 > 0.1  # distinguishable from the Gaussian rate
    some = next(iter(rows[steps].values()))
    assert abs(some["balance_theory"] - rows[0][some["run_id"]]["balance"] * predicted) < 1e-9


def test_gd_conserves_balance_up_to_its_exact_discrete_factor():
    """Gradient flow conserves B; a GD step multiplies it by exactly (1 - η² r²) = (1 - 2η² f)."""
    problem, lr = ToyProblem(10), 0.01
    rows, _ = train(problem, [RunSpec("gd", lr, s, 1) for s in range(4)], 300, 1)
    for run_id in rows[0]:
        for t in range(300):
            now, nxt = rows[t][run_id], rows[t + 1][run_id]
            expected = now["balance"] * (1 - 2 * lr**2 * now["loss"])
            assert abs(nxt["balance"] - expected) <= 1e-9 * max(1.0, abs(expected))
        drift = abs(rows[300][run_id]["balance"] - rows[0][run_id]["balance"])
        assert drift <= 2 * lr**2 * sum(rows[t][run_id]["loss"] for t in range(300)) * 50


def test_batched_and_single_runs_have_identical_trajectories():
    problem = ToyProblem(20)
    runs = [
        RunSpec("zo", 0.001, 1, 1, (("lambda", 0.1),)),
        RunSpec("zo", 0.001, 2, 1, (("lambda", 0.05),)),
        RunSpec("zo", 0.002, 3, 2, (("lambda", 0.1),)),
        RunSpec("gd", 0.01, 1, 1),
        RunSpec("dd", 0.001, 2, 1),
    ]
    batched, _ = train(problem, runs, 500, 100)
    for run in runs:
        alone, _ = train(problem, [run], 500, 100)
        for step in alone:
            a, b = alone[step][run.run_id], batched[step][run.run_id]
            assert {k: v for k, v in a.items() if k != "wall_s"} == {k: v for k, v in b.items() if k != "wall_s"}


def test_same_seed_shares_init_and_directions_across_optimizers():
    problem = ToyProblem(8)
    rows, _ = train(problem, [RunSpec("zo", 0.001, 7, 1, (("lambda", 0.1),)), RunSpec("dd", 0.001, 7, 1)], 1, 1)
    first = list(rows[0].values())
    assert first[0]["loss"] == first[1]["loss"]


def test_divergent_run_is_marked_and_the_others_finish(tmp_path):
    problem = ToyProblem(10)
    runs = [RunSpec("gd", 1.0, 0, 1), RunSpec("zo", 0.001, 0, 1, (("lambda", 0.1),))]
    rows, states = train(problem, runs, 200, 10)
    assert states[runs[0].run_id].status == "diverged"
    assert states[runs[1].run_id].status == "completed"
    last = max(s for s in rows if runs[0].run_id in rows[s])
    assert last < 200 and not torch.isfinite(torch.tensor(rows[last][runs[0].run_id]["loss"]))
    assert runs[1].run_id in rows[200]


def in_session(problem, runs, steps, log_every, folder, callback):
    """Runs the trainer inside the engine's session, as the commands do: (states, overall status)."""
    trainer = Trainer(problem, make_groups(problem, runs, torch.float64, CPU), steps, log_every,
                      [folder.on_log, callback], folder=folder)
    result = {}
    with session(folder, contextlib.nullcontext(), trainer.states, result) as stop:
        trainer.run(0, stop)
    return trainer.states, result["status"]


def test_ctrl_c_keeps_what_was_logged(tmp_path):
    problem = ToyProblem(10)
    runs = [RunSpec("zo", 0.001, s, 1, (("lambda", 0.1),)) for s in range(2)]
    folder = RunFolder(tmp_path, {"command": "toy", "name": "t"}, problem, "cpu")

    def interrupt(step, rows, states):
        if step == 50:
            raise KeyboardInterrupt

    states, status = in_session(problem, runs, 1000, 10, folder, interrupt)
    assert {s.status for s in states.values()} == {"interrupted"} and status == "interrupted"
    with open(tmp_path / "metrics.csv") as f:
        steps = sorted({int(r["step"]) for r in csv.DictReader(f)})
    assert steps == list(range(0, 60, 10))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert {r["status"] for r in summary["runs"].values()} == {"interrupted"}
    assert all(r["final"]["step"] == 50 for r in summary["runs"].values())


def test_an_unexpected_error_marks_runs_failed_and_propagates(tmp_path):
    problem = ToyProblem(4)
    runs = [RunSpec("gd", 0.01, 0, 1)]
    folder = RunFolder(tmp_path, {"command": "toy", "name": "t"}, problem, "cpu")

    def crash(step, rows, states):
        if step == 20:
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        in_session(problem, runs, 100, 10, folder, crash)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["runs"][runs[0].run_id]["final"]["step"] == 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_starts_where_cpu_does_and_gd_follows_the_same_path():
    problem, runs = ToyProblem(10), [RunSpec("gd", 0.01, s, 1) for s in range(3)]
    on_cpu = make_groups(problem, runs, torch.float64, CPU)
    on_gpu = make_groups(problem, runs, torch.float64, torch.device("cuda"))
    torch.testing.assert_close(on_gpu[0].x.cpu(), on_cpu[0].x)
    for _ in range(100):
        on_cpu[0].step(0)
        on_gpu[0].step(0)
    torch.testing.assert_close(on_gpu[0].x.cpu(), on_cpu[0].x)


FAST = [("gd", "gaussian"), ("dd", "gaussian"), ("zo", "gaussian"), ("zo", "rademacher"), ("zo", "sphere"),
        ("zo", "lowrank"), ("zo-one-sided", "gaussian")]


@pytest.mark.parametrize("optimizer,law", FAST)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_the_numpy_fast_path_follows_the_general_path(optimizer, law, dtype, tolerance):
    """The small-problem fast path (numpy views) and the general path (torch) take the same steps:
    equal up to the order of the sums, over 500 steps of 4 runs (2 seeds, 2 step sizes)."""
    problem = ToyProblem(6)
    hyper = (("lambda", 0.1),) if optimizer.startswith("zo") else ()
    hyper += (("rank", 1), ("period", 7)) if law == "lowrank" else ()
    runs = [RunSpec(optimizer, lr, s, 1, hyper, directions=law) for s in (0, 1) for lr in (0.01, 0.02)]
    fast, general = make_groups(problem, runs, dtype, CPU, 500)[0], make_groups(problem, runs, dtype, CPU, 500)[0]
    assert fast.numpy is not None
    general.numpy = None
    with torch.inference_mode():
        for step in range(500):
            fast.step(step)
            general.step(step)
    assert not torch.equal(fast.x, general.x.new_zeros(general.x.shape))
    torch.testing.assert_close(fast.x, general.x, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("optimizer,update,problem", [("zo-adam", None, "toy"), ("zo", "momentum", "toy"),
                                                      ("hizoo", None, "toy"), ("zest", None, "toy"),
                                                      ("zo", None, "big toy")])
def test_the_fast_path_is_left_to_what_it_covers(optimizer, update, problem):
    """Adaptive rules, stateful or torch-only estimators and problems over UNIT numbers take the general path."""
    toy = ToyProblem(10_000 if problem == "big toy" else 6)
    run = RunSpec(optimizer, 0.01, 0, 1, (("lambda", 0.1),), update=update)
    assert make_groups(toy, [run], torch.float64, CPU, 10)[0].numpy is None
