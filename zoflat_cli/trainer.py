"""The trainer loop: joins a problem, estimators and an update rule; knows nothing of any problem.

All runs of an experiment (seeds x λ values x lrs x optimizers) advance together. Runs that share
an estimator form a group whose parameters are one (runs, dim) tensor, so a step costs a few
tensor operations per group, not a Python loop over runs.
"""

import time
from dataclasses import dataclass, field

import torch

from zoflat_cli.estimators import HYPERPARAMETERS, Estimator, get_estimator, n_evals
from zoflat_cli.streams import DirectionStream, generator
from zoflat_cli.updates import SGD, UpdateRule


@dataclass(frozen=True)
class RunSpec:
    optimizer: str
    lr: float
    seed: int
    samples: int = 1
    hyper: tuple = ()  # ((name, value), ...) for the estimator's hyperparameters, in HYPERPARAMETERS order

    def value(self, name: str):
        return dict(self.hyper).get(name)

    @property
    def run_id(self) -> str:
        tags = "".join(f"-{HYPERPARAMETERS[k]}{v:g}" for k, v in self.hyper)
        samples = f"-n{self.samples}" if self.samples != 1 else ""
        return f"{self.optimizer}{tags}-lr{self.lr:g}{samples}-s{self.seed}"

    def columns(self) -> dict:
        return {
            "run_id": self.run_id,
            "optimizer": self.optimizer,
            **{name: self.value(name) for name in HYPERPARAMETERS},
            "lr": self.lr,
            "seed": self.seed,
            "samples": self.samples,
        }


@dataclass
class RunState:
    status: str = "running"  # running | completed | diverged | interrupted | failed
    steps_done: int = 0


class Group:
    """Runs that share one estimator and sample count, as batched tensors."""

    def __init__(self, problem, estimator: Estimator, runs, update: UpdateRule, dtype, device):
        self.problem = problem.bind(runs)  # the problem as seen by these runs (e.g. their seeds' features)
        self.estimator, self.runs, self.update = estimator, runs, update
        # initial points are drawn on the CPU so every device starts from the same place
        cpu = torch.device("cpu")
        self.x = torch.stack([problem.init(generator(r.seed, "init", cpu), dtype, cpu) for r in runs]).to(device)

        def column(values):
            return torch.tensor(values, dtype=dtype, device=device).unsqueeze(-1)

        self.lr = column([r.lr for r in runs])
        # every hyperparameter for every run, 0 where unused (the toy's theory reads λ = 0 for GD)
        self.hyper = {name: column([r.value(name) or 0.0 for r in runs]) for name in HYPERPARAMETERS}
        self.directions = None
        if estimator.uses_directions:
            seeds = [r.seed for r in runs]
            self.directions = DirectionStream(seeds, runs[0].samples, problem.n_params, dtype, device)
        self.state = update.init(self.x)
        self.evals_per_step = n_evals(estimator, runs[0].samples)
        self.initial_metrics = None

    def step(self):
        u = self.directions.next() if self.directions else None
        g = self.estimator.estimate(self.problem, self.x, u, self.hyper)
        self.update.apply(self.x, g, self.lr, self.state)

    def metrics(self, step: int) -> dict:
        values = self.problem.metrics(self.x, step)
        if self.initial_metrics is None:
            self.initial_metrics = values
        if hasattr(self.problem, "theory"):
            lr, lam = self.lr.squeeze(-1), self.hyper["lambda"].squeeze(-1)
            theory = self.problem.theory(step, self.initial_metrics, lr, lam)
            if self.estimator.name not in self.problem.theory_for:  # NaN: no prediction for this method
                theory = {k: torch.full_like(v, float("nan")) for k, v in theory.items()}
            values.update(theory)
        return values


def make_groups(problem, runs, dtype, device, update: UpdateRule = SGD):
    by_kind = {}
    for run in runs:
        by_kind.setdefault((run.optimizer, run.samples), []).append(run)
    return [
        Group(problem, get_estimator(opt), members, update, dtype, device)
        for (opt, _), members in by_kind.items()
    ]


@dataclass
class Trainer:
    problem: object
    groups: list
    steps: int
    log_every: int
    on_log: list = field(default_factory=list)  # callables(step, rows, states)

    def __post_init__(self):
        self.states = {r.run_id: RunState() for g in self.groups for r in g.runs}

    def run(self) -> dict:
        """Train all groups; returns {run_id: RunState}. Ctrl-C ends it cleanly ('interrupted');
        any other exception marks the unfinished runs 'failed' and propagates."""
        start = time.perf_counter()
        try:
            with torch.inference_mode():  # skips autograd bookkeeping: ~20% off each small op
                for step in range(self.steps + 1):
                    if step % self.log_every == 0 or step == self.steps:
                        self._log(step, time.perf_counter() - start)
                        if not any(s.status == "running" for s in self.states.values()):
                            break
                    if step < self.steps:
                        for group in self.groups:
                            group.step()
        except KeyboardInterrupt:
            self._mark_unfinished("interrupted")
        except BaseException:
            self._mark_unfinished("failed")
            raise
        return self.states

    def _mark_unfinished(self, status: str):
        for state in self.states.values():
            if state.status == "running":
                state.status = status

    def _log(self, step: int, wall_s: float):
        states = self.states
        rows = []
        for group in self.groups:
            metrics = group.metrics(step)
            names = list(metrics)
            table = torch.stack([metrics[n].reshape(-1) for n in names])
            # diverged: loss or parameters NaN/Inf (other metrics may be NaN when not computed)
            finite = torch.isfinite(metrics["loss"].reshape(-1)) & torch.isfinite(group.x).all(-1)
            table, finite = table.cpu().tolist(), finite.cpu().tolist()
            for i, run in enumerate(group.runs):
                state = states[run.run_id]
                if state.status != "running":
                    continue
                state.steps_done = step
                if not finite[i]:
                    state.status = "diverged"
                elif step == self.steps:
                    state.status = "completed"
                row = run.columns()
                row.update(step=step, wall_s=round(wall_s, 3), n_evals=step * group.evals_per_step)
                row.update({n: table[k][i] for k, n in enumerate(names)})
                rows.append(row)
        for callback in self.on_log:
            callback(step, rows, states)
