"""The batched runner (toy, convex): all runs of an invocation advance together as tensors.

Runs that share a preset, update rule, direction law and sample count form a group whose
parameters are one (runs, dim) tensor, so a step costs a few tensor operations per group, not a
Python loop over runs. The runner knows nothing of any problem: a problem gives `init`, `bind`,
`loss`, `grad` and `metrics`.

Resuming: the runner saves checkpoints/batched.pt (every group's parameters and update-rule
state at a step) when it stops, when it ends, and every --checkpoint-every steps; directions are
a function of (seed, step, sample), so `--resume` continues bit for bit, also past the old --steps.
"""

import time

import torch

from zoflat_cli.config import DTYPES, check_memory, resolve_device, runs_from
from zoflat_cli.engine.live import LiveView
from zoflat_cli.engine.loop import NUMERICAL_ERRORS, RunState, due, judge, session
from zoflat_cli.engine.runfolder import RunFolder, create_run_dir, open_for_resume
from zoflat_cli.optim.directions import DirectionStream
from zoflat_cli.optim.estimators import estimate
from zoflat_cli.optim.presets import HYPERPARAMETERS, estimator_of, evals_per_step
from zoflat_cli.optim.updates import apply, get_update, state_to
from zoflat_cli.streams import generator

CHECKPOINT = "batched.pt"  # under checkpoints/


class Group:
    """Runs that share one preset, update rule, direction law and sample count, as batched tensors."""

    def __init__(self, problem, runs, dtype, device):
        first = runs[0]
        self.source = problem
        self.problem = problem.bind(runs)  # the problem as seen by these runs (e.g. their seeds' features)
        self.runs = runs
        self.estimator, self.rule = estimator_of(first.optimizer), get_update(first.rule)
        # initial points are drawn on the CPU so every device starts from the same place
        cpu = torch.device("cpu")
        self.x = torch.stack([problem.init(generator(r.seed, "init", cpu), dtype, cpu) for r in runs]).to(device)

        def column(values):
            return torch.tensor(values, dtype=dtype, device=device).unsqueeze(-1)

        # every hyperparameter for every run, 0 where unused (the toy's theory reads λ = 0 for GD)
        self.hyper = {name: column([r.value(name) or 0.0 for r in runs]) for name in HYPERPARAMETERS}
        self.hyper["lr"] = column([r.lr for r in runs])
        decay = any(r.value("weight_decay") for r in runs)
        self.transform = self.rule.build(weight_decay=decay)
        self.plain_sgd = self.rule.name == "sgd" and not decay  # the fast path: one addcmul
        self.state = self.transform.init(self.x)
        self.dtype, self.device = dtype, device
        self.directions = None
        self.evals_per_step = evals_per_step(first.optimizer, first.rule, first.samples)
        # the theory predicts from the initial point (also when the group resumes later on)
        self.initial_metrics = self.problem.metrics(self.x, 0) if hasattr(self.problem, "theory") else None

    def step(self, step: int):
        """Iteration `step` (from 0); a resumed group's first step starts its directions there."""
        if self.estimator.uses_directions and self.directions is None:
            first = self.runs[0]
            self.directions = DirectionStream([r.seed for r in self.runs], first.samples, self.x.shape[-1], first.directions,
                                              self.dtype, self.device, start_step=step)
        u = self.directions.next() if self.directions else None
        g = estimate(self.estimator, self.problem, self.x, u, self.hyper)
        if self.plain_sgd:
            self.x.addcmul_(self.hyper["lr"], g, value=-1.0)
            return
        moved, state = apply(self.transform, self.x, g, self.state, self.hyper, step + 1)
        if self.rule.conservative:  # keep a run's step only where it lowers its loss
            moved = torch.where((self.problem.loss(moved) < self.problem.loss(self.x)).unsqueeze(-1), moved, self.x)
        self.x, self.state = moved, state

    def metrics(self, step: int) -> dict:
        try:
            values = self.problem.metrics(self.x, step)
        except NUMERICAL_ERRORS:  # some run's values broke a solver: find it, keep the others'
            values = self._metrics_per_run(step)
        if self.initial_metrics is not None:
            lr, lam = self.hyper["lr"].squeeze(-1), self.hyper["lambda"].squeeze(-1)
            theory = self.problem.theory(step, self.initial_metrics, lr, lam, self.runs[0].directions)
            if not self.problem.has_theory(self.runs[0]):  # NaN: no prediction for this method
                theory = {k: torch.full_like(v, float("nan")) for k, v in theory.items()}
            values.update(theory)
        return values

    def _metrics_per_run(self, step: int) -> dict:
        """The metrics run by run; a run whose own computation fails gets NaN (so: diverged)."""
        per_run = []
        for i, run in enumerate(self.runs):
            try:
                per_run.append(self.source.bind([run]).metrics(self.x[i:i + 1], step))
            except NUMERICAL_ERRORS:
                per_run.append(None)
        shape = next((m for m in per_run if m), None)  # the metrics' names and shapes
        if shape is None:  # every run failed
            shape = self.source.bind(self.runs[:1]).metrics(torch.zeros_like(self.x[:1]), step)
        nan = {k: torch.full_like(v, float("nan")) for k, v in shape.items()}
        return {k: torch.cat([(m or nan)[k] for m in per_run]) for k in shape}

    def key(self) -> str:
        return "|".join(r.run_id for r in self.runs)


def make_groups(problem, runs, dtype, device) -> list:
    by_kind = {}
    for run in runs:
        by_kind.setdefault((run.optimizer, run.rule, run.directions, run.samples), []).append(run)
    return [Group(problem, members, dtype, device) for members in by_kind.values()]


class Trainer:
    """Steps every group from `start` to `steps`, logging every `log_every` steps."""

    def __init__(self, problem, groups, steps: int, log_every: int, on_log=(), states=None, folder=None,
                 checkpoint_every: int = 0):
        self.problem, self.groups, self.steps, self.log_every = problem, groups, steps, log_every
        self.on_log = list(on_log)  # callables(step, rows, states)
        self.states = states or {r.run_id: RunState() for g in groups for r in g.runs}
        self.folder, self.checkpoint_every = folder, checkpoint_every
        self.wall_offset = 0.0

    def run(self, start: int = 0, stop=None) -> dict:
        """Train all groups; returns {run_id: RunState}. With `stop` (a GracefulStop), a request
        ends the loop after the current step and leaves a checkpoint to resume from."""
        began = time.perf_counter()
        step = start
        with torch.inference_mode():  # skips autograd bookkeeping: ~20% off each small op
            for step in range(start, self.steps + 1):
                if due(step, self.log_every, self.steps):
                    self._log(step, self.wall_offset + time.perf_counter() - began)
                    if not any(s.status == "running" for s in self.states.values()):
                        break
                if stop is not None and stop.requested:
                    break
                if step < self.steps:
                    for group in self.groups:
                        group.step(step)
                    if self.checkpoint_every and (step + 1) % self.checkpoint_every == 0:
                        self.save(step + 1)
        self.save(step)
        return self.states

    def save(self, step: int):
        if self.folder is None:
            return
        self.folder.save_checkpoint(CHECKPOINT, {
            "step": step, "groups": {g.key(): {"x": g.x.cpu(), "state": state_to(g.state, "cpu")} for g in self.groups}})

    def restore(self, logged_rows: list) -> int:
        """Load the checkpoint of a resumed folder; returns its step (0 without one)."""
        saved = self.folder.load_checkpoint(CHECKPOINT)
        if saved is None:
            return 0
        for group in self.groups:
            entry = saved["groups"][group.key()]
            group.x = entry["x"].to(group.device)
            group.state = state_to(entry["state"], group.device)
        step = saved["step"]
        earlier = [float(r["wall_s"]) for r in logged_rows if int(r["step"]) <= step]
        self.wall_offset = max(earlier, default=0.0)
        return step

    def _log(self, step: int, wall_s: float):
        states = self.states
        rows = []
        for group in self.groups:
            metrics = group.metrics(step)
            names = list(metrics)
            table = torch.stack([metrics[n].reshape(-1) for n in names])
            # diverged: loss or parameters NaN/Inf (other metrics may be NaN when not computed)
            ok = torch.isfinite(metrics["loss"].reshape(-1)) & torch.isfinite(group.x).all(-1)
            table, ok = table.cpu().tolist(), ok.cpu().tolist()
            for i, run in enumerate(group.runs):
                state = states[run.run_id]
                if state.status != "running":
                    continue
                judge(state, step, ok[i], self.steps)
                row = run.columns()
                row.update(step=step, wall_s=round(wall_s, 3), n_evals=step * group.evals_per_step)
                row.update({n: table[k][i] for k, n in enumerate(names)})
                rows.append(row)
        for callback in self.on_log:
            callback(step, rows, states)


def run_batched(config: dict, make_problem, quiet: bool = False, resume=None, console=None):
    """Run (or, with resume, continue) one resolved config of a batched command.
    make_problem(device, dtype) builds the problem. Returns (run folder path, overall status)."""
    runs = runs_from(config)
    device, dtype = resolve_device(config["device"]), DTYPES[config["dtype"]]
    if resume:
        previous = open_for_resume(resume, runs, device, config["steps"])
    problem = make_problem(device, dtype)
    check_memory(problem.memory_bytes(runs, dtype.itemsize), device, f"{len(runs)} runs of `zoflat {config['command']}`")
    groups = make_groups(problem, runs, dtype, device)
    path = resume or create_run_dir(config["out"], config["command"], config["name"])
    folder = RunFolder(path, config, problem, str(device))
    states = {r.run_id: RunState() for r in runs}
    view = LiveView(f"zoflat {config['command']} · {path}", config["steps"], quiet, console)
    trainer = Trainer(problem, groups, config["steps"], config["log_every"], [folder.on_log, view.on_log], states,
                      folder, config.get("checkpoint_every", 0))
    result = {}
    with session(folder, view, states, result) as stop:
        start = 0
        if resume:
            start = trainer.restore(folder.logged_rows())
            for run in runs:  # diverged runs stay as they ended; the others continue from the checkpoint
                entry = previous.get(run.run_id, {})
                if entry.get("status") == "diverged":
                    states[run.run_id] = RunState("diverged", entry["steps_done"])
            folder.keep_rows(lambda r: int(r["step"]) < start or states[r["run_id"]].status == "diverged")
        trainer.run(start, stop)
    return path, result["status"]
