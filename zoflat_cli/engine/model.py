"""The model runner: the runs of a config one model at a time, each in place and resumable.

A model problem is what the ModelProblem protocol (problems/protocols.py) says: the trained
`params`, loss, gradient and JVP on the current batch (`draw_batch`), `metrics(seed, step)` of a
logged step, its state and the base weights. Besides config.yaml, metrics.csv and summary.json,
the run folder holds
    updates/<run_id>.bin      runs that draw directions: one record per step (runs/updatelog.py);
                              replaying it on the base weights rebuilds the run bit for bit
    checkpoints/<run_id>.pt   parameters and update-rule state at a step: every --checkpoint-every
                              steps, and when a run that cannot be replayed (gd, sam) is stopped
`--resume DIR` continues every unfinished run from its checkpoint and log; a step logged before the
stop is not evaluated again. The runs of a folder start from the same weights, so the metrics of
step 0 are computed once per seed (their probes' seed) and shared.
"""

import contextlib
import time
from pathlib import Path

from zoflat_cli.engine.live import LiveView
from zoflat_cli.engine.loop import NUMERICAL_ERRORS, RunState, carried_over, drive, finite, judge, measure_if_due, session
from zoflat_cli.errors import ZoflatError, describe
from zoflat_cli.optim.inplace import InPlaceOptimizer
from zoflat_cli.optim.parameters import ParameterDirections
from zoflat_cli.optim.presets import HYPERPARAMETERS, estimator_of, evals_until, get_preset
from zoflat_cli.optim.updates import get_update
from zoflat_cli.runs.folder import RunFolder, create_run_dir
from zoflat_cli.runs.identity import check_checkpoint_step, identity
from zoflat_cli.runs.updatelog import UpdateLog, update_log_path
from zoflat_cli.signals import StopRequested
from zoflat_cli.streams import direction_base


def checkpoint_name(run_id: str) -> str:
    return f"{run_id}.pt"  # under checkpoints/


def update_log(folder: RunFolder, run) -> UpdateLog:
    return UpdateLog(update_log_path(folder.path, run.run_id), run.samples, identity(folder.summary, [run.run_id]),
                     estimator_of(run.optimizer).extra)


def run_hyper(run) -> dict:
    """A run's hyperparameters as python floats (0 where unused), with its lr."""
    return {**{name: float(run.value(name) or 0.0) for name in HYPERPARAMETERS}, "lr": run.lr}


class ModelSubject:
    """A model problem at its current weights: the training loss over the whole training set."""

    def __init__(self, problem):
        self.problem = problem
        self.params = problem.params
        self.names = [n for n, p in problem.model.named_parameters() if p.requires_grad]

    def loss(self) -> float:
        return self.problem.cross_entropy("train")

    def gradient(self) -> list:
        return self.problem.gradient("train")

    def hvp(self, v: list) -> list:
        return self.problem.hvp(v)

    def examples(self) -> int:
        return self.problem.splits["train"].size

    @contextlib.contextmanager
    def restricted(self, indices):
        splits = self.problem.splits
        whole = splits["train"]
        splits["train"] = self.problem._batches([self.problem.encoded["train"][i] for i in indices])
        try:
            yield
        finally:
            splits["train"] = whole


class ModelRunner:
    """Trains one run on `problem` (whose model holds the base weights) under a typed config."""

    def __init__(self, problem, run, config, folder: RunFolder, state: RunState, on_log, starts: dict = None):
        self.problem, self.run, self.config, self.folder = problem, run, config, folder
        self.state, self.on_log = state, on_log
        self.starts = {} if starts is None else starts  # seed -> (step-0 metrics, their forward passes)
        self.logged_at = None  # (step, row): the step a resumed run restarts at, logged before its stop
        self.evaluating = None  # the step being logged (a stop request during its evaluation resumes there)
        self.directions = ParameterDirections(problem.params, run.directions, problem.model, run.value("rank") or 1,
                                              run.value("period") or 1, config.probe_cache)
        self.optimizer = InPlaceOptimizer(self.directions, estimator_of(run.optimizer), get_update(run.rule),
                                          run_hyper(run))
        self.replayable = get_preset(run.optimizer).uses_directions  # its steps are a few logged numbers
        self.updates = update_log(folder, run)
        self.wall_offset = 0.0
        self.passes_offset = 0.0

    # -- restoring a run

    def restore(self, logged_rows: list, until: int = None, completed: bool = False) -> int:
        """Bring the model to the latest recoverable step of this run; returns that step. With
        `until` (the flatness measures'), to exactly that step, read-only: a checkpoint past it is
        passed over, the log replayed up to it, and a run that cannot be replayed (gd, sam) is
        recomputed from there, as it was trained. The row of the step it restarts at is kept (not
        evaluated again) unless the run had `completed` its old --steps: then that row was the last
        step's, evaluated as the last (--eval-every and the others are due there)."""
        self.logged_rows = logged_rows
        step = self.load_checkpoint(until=until)
        if until is not None:
            return self.go_to(step, until)
        if self.replayable:
            records = self.updates.read()
            step = self.replay(records, step)
            self.updates.truncate(sum(1 for r in records if r[0] < step))
        previous = [r for r in logged_rows if int(r["step"]) < step]
        at = [r for r in logged_rows if int(r["step"]) == step]
        if at and not completed:  # logged before the stop: not evaluated again
            self.logged_at = (step, at[-1])
            previous.append(at[-1])
        if previous:  # carry the counters on, counting the replayed steps' forward passes
            last = previous[-1]
            self.wall_offset = float(last["wall_s"])
            fraction = self.problem.batch_fraction(self.config.batch_size)
            self.passes_offset = float(last["forward_passes"]) + evals_until(self.run, step, fraction) - evals_until(
                self.run, int(last["step"]), fraction)
        return step

    def load_checkpoint(self, after: int = -1, until: int = None) -> int:
        """Load the run's checkpoint if its step is past `after` (and at most `until`); returns the
        step the model is at then (`after`, or 0, without one)."""
        name = checkpoint_name(self.run.run_id)
        saved = self.folder.load_checkpoint(name, [self.run.run_id])
        if saved is None:
            return max(after, 0)
        at = saved.get("step")
        if isinstance(at, int) and not isinstance(at, bool) and not (after < at and (until is None or at <= until)):
            return max(after, 0)  # outside the range: passed over (a malformed step is damage, said below)
        path = self.folder.path / "checkpoints" / name
        check_checkpoint_step(path, at, self.logged_rows, [self.run.run_id], self.config.log_every, self.config.steps)
        try:
            self.problem.load_state(saved["state"])
            self.optimizer.load_state_dict(saved.get("optimizer"))
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as err:
            raise ZoflatError(f"{path} is damaged ({describe(err)}); delete it to start the run over") from None
        return at

    def replay(self, records: list, step: int, until: int = None) -> int:
        """Apply the logged steps from `step` on (up to `until`); returns the step reached."""
        for rec_step, keys, coefs, accepted in records:
            if rec_step < step:
                continue
            if rec_step != step or step == until:
                break  # a gap: the log ends being usable here
            self.optimizer.step(self.problem, keys, step + 1, logged=(coefs, accepted))
            step += 1
        return step

    def go_to(self, step: int, until: int) -> int:
        """From `step` to exactly `until`: the log replayed, or the steps recomputed (gd, sam) from
        the run's checkpoint where it lies between."""
        if self.replayable:
            reached = self.replay(self.updates.read(), step, until)
            if reached < until:
                raise ZoflatError(f"run {self.run.run_id}: its update log reaches step {reached}, not {until}")
            return until
        for at in range(self.load_checkpoint(after=step, until=until), until):
            self.move(at)
        return until

    def checkpoint(self, step: int):
        self.problem.progress(f"step {step}: checkpointing")
        self.folder.save_checkpoint(checkpoint_name(self.run.run_id), {
            "step": step, "state": {k: v.cpu() for k, v in self.problem.state().items()},
            "optimizer": self.optimizer.state_dict()}, [self.run.run_id])
        self.problem.progress(None)

    # -- the loop

    def train(self, start: int, stop):
        self.problem.forward_passes = 0.0
        if self.replayable:
            with self.folder.writing(f"updates/{self.run.run_id}.bin"):
                self.updates.open()
        try:
            self._began = time.perf_counter()
            try:
                step, stopped = drive(self, start, self.config.steps, self.config.log_every,
                                      self.config.checkpoint_every, stop)
            except StopRequested:  # during a step's evaluation: discarded, the run resumes at that step
                step, stopped = self.evaluating, True
            if stopped:
                self.state.status = "interrupted"
                if not self.replayable:
                    self.checkpoint(step)
        except NUMERICAL_ERRORS as err:  # this run's arithmetic failed: it diverged, the next runs go on
            self.state.status = "diverged"
            self.folder.note(self.run.run_id, describe(err))
        finally:
            if self.replayable:
                self.updates.close()

    # -- the Stepper protocol (engine/loop.py)

    def log(self, step: int) -> bool:
        if self.logged_at and self.logged_at[0] == step:  # a resumed run's step, logged before the stop
            judge(self.state, step, finite(float(self.logged_at[1]["loss"])), self.config.steps)
            return self.state.status == "running"
        self.evaluating = step
        row = self.run.columns()
        row.update(step=step, wall_s=None, n_evals=evals_until(self.run, step))
        row.update(self.metrics(step))
        row["forward_passes"] = round(self.passes_offset + self.problem.forward_passes, 3)
        row["wall_s"] = round(self.wall_offset + time.perf_counter() - self._began, 3)
        judge(self.state, step, finite(row["loss"]), self.config.steps)
        if self.state.status != "diverged":
            measure_if_due(self.folder, self.config, self.run, step, lambda: ModelSubject(self.problem))
        self.on_log(step, [row])
        return self.state.status == "running"

    def metrics(self, step: int) -> dict:
        """The problem's metrics of this step; step 0's once per seed (every run starts from the same
        weights), their forward passes counted in each run as if computed again."""
        if step == 0 and self.run.seed in self.starts:
            metrics, passes = self.starts[self.run.seed]
            self.problem.forward_passes += passes
            return dict(metrics)
        before = self.problem.forward_passes
        metrics = self.problem.metrics(self.run.seed, step)
        if step == 0:
            self.starts[self.run.seed] = (metrics, self.problem.forward_passes - before)
        return metrics

    def stopped(self, stop) -> bool:
        return self.problem.group.any(stop.requested)  # all data-parallel ranks stop at the same step

    def move(self, step: int) -> tuple:
        """x_step -> x_(step+1); returns what the update log records of it."""
        run = self.run
        self.problem.draw_batch(self.config.batch_size, run.seed, step)
        keys = [(direction_base(run.seed, i), step) for i in range(run.samples)] if self.replayable else []
        return keys, *self.optimizer.step(self.problem, keys, step + 1)

    def advance(self, step: int):
        keys, coefs, accepted = self.move(step)
        if self.replayable:
            with self.folder.writing(f"updates/{self.run.run_id}.bin"):
                self.updates.append(step, keys, coefs, accepted)
        self.state.steps_done = step + 1


def run_models(config, problem, runs, quiet: bool = False, resume: Path = None, previous=None):
    """Runs (or, with resume, continues) the runs of a typed config on `problem`, one after
    another; `previous`: the resumed folder's runs (runs/folder.open_for_resume). Returns
    (folder, status)."""
    previous = previous or {}
    path = Path(resume) if resume else create_run_dir(config.out, config.command, config.name)
    folder = RunFolder(path, config.to_dict(), problem, str(problem.device))
    states = {r.run_id: RunState(status="queued") for r in runs}
    view = LiveView(f"zoflat {config.command} · {path}", config.steps, quiet, sequential=True, states=states)

    def on_log(step, rows):
        folder.on_log(step, rows, states)
        view.on_log(step, rows, states)

    problem.progress = view.activity
    starts = {}  # step 0's metrics by seed, shared by the runs
    states.update(carried_over(previous, runs, config.steps, completed=True))  # those are not run again
    plans = [run for run in runs if states[run.run_id].status == "queued"]
    result = {}
    with session(folder, view, states, result) as stop:
        kept_rows = folder.logged_rows()
        for run in plans:  # every update log is this run's before any run goes on
            if get_preset(run.optimizer).uses_directions:
                update_log(folder, run).read()
        for i, run in enumerate(plans):
            state = states[run.run_id]
            state.status = "running"
            if i > 0:
                problem.load_base()
            runner = ModelRunner(problem, run, config, folder, state, on_log, starts)
            mine = [r for r in kept_rows if r["run_id"] == run.run_id]
            start = runner.restore(mine, completed=previous.get(run.run_id, {}).get("status") == "completed")
            if not folder.begun:
                folder.begin()
            if mine:
                last = start + (runner.logged_at is not None)  # a step logged before the stop stays
                folder.keep_rows(lambda r, run_id=run.run_id, last=last: r["run_id"] != run_id or int(r["step"]) < last)
            runner.train(start, stop)
            if problem.group.any(stop.requested):
                break
    return path, result["status"]
