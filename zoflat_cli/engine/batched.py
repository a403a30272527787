"""The batched runner (toy, convex): all runs of an invocation advance together as tensors.

Runs that share a preset, update rule, direction law and sample count form a group whose
parameters are one (runs, dim) tensor, so a step costs a few tensor operations per group, not a
Python loop over runs. The runner knows nothing of any problem: it asks what the BatchedProblem
protocol (problems/protocols.py) says.

Resuming: the runner saves checkpoints/batched.pt (every group's parameters and update-rule
state at a step) when it stops, when it ends, and every --checkpoint-every steps; directions are
a function of (seed, step, sample), so `--resume` continues bit for bit, also past the old --steps.
"""

import time

import numpy as np
import torch

from zoflat_cli.arrays import addcmul, constant, vecdot
from zoflat_cli.engine.live import LiveView
from zoflat_cli.engine.loop import NUMERICAL_ERRORS, RunState, carried_over, drive, judge, measure_if_due, session
from zoflat_cli.devices import DTYPES, check_memory, resolve_device
from zoflat_cli.errors import ZoflatError, describe
from zoflat_cli.optim.directions import UNIT, DirectionStream, stream_bytes
from zoflat_cli.optim.estimators import (Estimator, ascent_scale, curvature_weights, hessian_informed, mask_thresholds,
                                         sparse_mask)
from zoflat_cli.optim.presets import HYPERPARAMETERS, STRUCTURED, estimator_of, evals_until
from zoflat_cli.optim.structured import Structure, balanced
from zoflat_cli.optim.updates import apply, get_update, state_to
from zoflat_cli.runs.folder import RunFolder, create_run_dir, open_for_resume
from zoflat_cli.runs.identity import check_checkpoint_step
from zoflat_cli.streams import generator

CHECKPOINT = "batched.pt"  # under checkpoints/


# ---------------------------------------------------------------- the estimate at a group's points

def _combine(coef: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Σ_s coef[s, r] · u[s, r, :] over the samples s; coef is (samples, runs, 1). Coefficients
    fold 1/samples in: on small tensors mean(0) costs 3x a sum, sum(0) 3x indexing."""
    terms = coef * u
    return terms[0] if len(terms) == 1 else terms.sum(0)


def directional_derivatives(problem, x, u, use_jvp: bool) -> torch.Tensor:
    """uᵀ∇f(x) for u (samples, runs, dim): (samples, runs)."""
    if use_jvp:  # forward-mode AD with dual tensors (works through the convex problem's sparse products)
        with torch.inference_mode(False), torch.autograd.forward_ad.dual_level():  # the trainer's mode has no AD
            dual = torch.autograd.forward_ad.make_dual(x.expand_as(u).clone(), u.clone())
            return torch.autograd.forward_ad.unpack_dual(problem.loss(dual)).tangent
    return vecdot(u, problem.grad(x))


def estimate(estimator: Estimator, problem, x, u, hyper) -> torch.Tensor:
    """ĝ at x (runs, dim) for a batched problem (`loss` over any leading shape, `grad`), with
    directions u (samples, runs, dim) and hyper {name: (runs, 1)}: tensors, or, for an estimator
    and a problem that take them (their `numpy`), numpy arrays."""
    if estimator.name == "gd":
        return problem.grad(x)
    if estimator.name == "sam":
        g = problem.grad(x)
        return problem.grad(x + ascent_scale(torch.linalg.vector_norm(g, dim=-1, keepdim=True), hyper["rho"]) * g)
    if estimator.query == "directional":
        values = directional_derivatives(problem, x, u, estimator.jvp)[None, ..., None]
        return _combine(estimator.coefficients(values, None, hyper), u)
    return _combine(loss_coefficients(estimator, problem, x, u, hyper)[0], u)


def loss_coefficients(estimator: Estimator, problem, x, u, hyper) -> tuple:
    """(coefficients (samples, runs, 1), loss values (offsets, samples, runs, 1), f(x) or None) of a
    "loss" estimator at x along u."""
    offsets = constant(estimator.offsets, x, (-1, 1, 1, 1))
    points = addcmul(x, offsets * hyper["lambda"], u)  # (offsets, samples, runs, dim): one call
    values = problem.loss(points)[..., None]
    center = problem.loss(x)[..., None] if estimator.center else None
    return estimator.coefficients(values, center, hyper), values, center


def stateful_estimate(estimator: Estimator, problem, x, u, hyper, memory: tuple, step: int, period: int) -> tuple:
    """(ĝ, new memory) of an estimator that keeps something between steps (optim/estimators.py):
    Sparse MeZO its thresholds h, HiZOO its curvature D, MeZO-SVRG its anchor, the anchor's
    directions and their coefficients."""
    if estimator.scaling == "mask":
        return estimate(estimator, problem, x, u * sparse_mask(x, memory[0]), hyper), memory
    if estimator.scaling == "curvature":
        c, values, center = loss_coefficients(estimator, problem, x, u * memory[0].rsqrt(), hyper)
        g, curvature = hessian_informed(memory[0], u, c, curvature_weights(values, center, hyper),
                                        hyper["hessian_smooth"])
        return g, (curvature,)
    c = loss_coefficients(estimator, problem, x, u, hyper)[0]
    if step % period == 0:  # a new anchor: its estimate is the step (x̄ = x)
        return _combine(c, u), (x.clone(), u.clone(), c)
    anchor, anchor_u, anchor_c = memory
    at_anchor = loss_coefficients(estimator, problem, anchor, u, hyper)[0]
    return _combine(c - at_anchor, u) + _combine(anchor_c, anchor_u), memory


def initial_memory(estimator: Estimator, x, hyper, blocks: list, samples: int) -> tuple:
    """What a stateful estimator keeps, at the runs' starting points x (runs, dim)."""
    if estimator.scaling == "mask":  # per run and block, from its starting weights
        h = torch.empty_like(x)
        for r in range(x.shape[0]):
            for block in blocks:
                h[r, block] = mask_thresholds(x[r, block], float(hyper["sparsity"][r]))
        return (h,)
    if estimator.scaling == "curvature":
        return (torch.ones_like(x),)
    if estimator.anchored:  # filled at step 0 (an anchor step)
        return (torch.zeros_like(x), x.new_zeros(samples, *x.shape), x.new_zeros(samples, x.shape[0], 1))
    return ()


# ---------------------------------------------------------------- groups of runs as tensors

class BatchedSubject:
    """One run of a batched problem at a point x (its own copy), its blocks as the tensors."""

    def __init__(self, bound, x: torch.Tensor, blocks: dict):
        self.bound, self.x = bound, x
        self.names, self.slices = list(blocks), list(blocks.values())
        self.params = [x[s] for s in self.slices]  # views: moving them moves x

    def loss(self) -> float:
        return float(self.bound.loss(self.x[None])[0])

    def gradient(self) -> list:
        g = self.bound.grad(self.x[None])[0]
        return [g[s] for s in self.slices]

    def hvp(self, v: list) -> list:
        hv = self.bound.hvp(self.x[None], torch.cat([t.reshape(-1) for t in v])[None, :, None])[0, :, 0]
        return [hv[s] for s in self.slices]

    @staticmethod
    def examples():
        return None  # the batched problems' losses are not measured batch by batch

    def restricted(self, indices):
        raise NotImplementedError("batched problems have no m-sharpness")


class BatchedGroup:
    """Runs that share one preset, update rule, direction law and sample count, as batched tensors."""

    def __init__(self, problem, runs, dtype, device, steps: int = None):
        first = runs[0]
        self.source = problem
        self.problem = problem.bind(runs)  # the problem as seen by these runs (e.g. their seeds' features)
        self.runs = runs
        self.estimator, self.rule = estimator_of(first.optimizer), get_update(first.rule)
        self.period = int(first.value("period") or 1)
        # a structured law sees each block of the parameter vector as its most nearly square matrix
        views = tuple(balanced(s.stop - s.start) for s in problem.blocks.values())
        self.structure = None if first.directions not in STRUCTURED else Structure(
            first.directions, views, int(first.value("rank")), self.period)
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
        self.plain_sgd = self.rule.name == "sgd" and not decay  # one addcmul
        self.state = self.transform.init(self.x)
        self.memory = initial_memory(self.estimator, self.x, self.hyper, list(problem.blocks.values()), first.samples)
        self.dtype, self.device = dtype, device
        # The small-problem fast path: plain SGD steps of a stateless estimator on numpy views of x,
        # the directions and the hyperparameters, for problems up to UNIT numbers (whatever the
        # number of runs, so a run's numbers do not depend on the others beside it).
        self.numpy, self._view = None, (None, None)  # the hyperparameters' views; (x, its view)
        if (self.plain_sgd and not self.memory and self.estimator.numpy and getattr(self.problem, "numpy", False)
                and device.type == "cpu" and dtype in (torch.float32, torch.float64) and problem.n_params <= UNIT):
            self.numpy = {name: value.numpy() for name, value in self.hyper.items()}
        self.directions, self.steps = None, steps  # directions are drawn up to `steps` (None: on and on)
        # the theory predicts from the initial point (also when the group resumes later on)
        self.initial_metrics = self.problem.metrics(self.x, 0) if self.problem.theory is not None else None

    def step(self, step: int):
        """Iteration `step` (from 0); a resumed group's first step starts its directions there."""
        if self.directions is None and self.estimator.uses_directions:
            first = self.runs[0]
            self.directions = DirectionStream([r.seed for r in self.runs], first.samples, self.x.shape[-1], first.directions,
                                              self.dtype, self.device, start_step=step, end_step=self.steps,
                                              structure=self.structure, numpy=self.numpy is not None)
        u = self.directions.next() if self.directions else None
        if self.numpy is not None:
            if self._view[0] is not self.x:  # a new tensor (a restored checkpoint)
                self._view = (self.x, self.x.numpy())  # the view moves self.x
            x = self._view[1]
            x -= self.numpy["lr"] * estimate(self.estimator, self.problem, x, u, self.numpy)
            return
        if self.memory:
            g, self.memory = stateful_estimate(self.estimator, self.problem, self.x, u, self.hyper, self.memory, step,
                                               self.period)
        else:
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


def group_kind(run) -> tuple:
    """What the runs of one group share: (optimizer, update rule, direction law, samples, and the
    hyperparameters that shape the directions or the anchors' schedule)."""
    return (run.optimizer, run.rule, run.directions, run.samples,
            tuple((k, v) for k, v in run.hyper if HYPERPARAMETERS[k].structural))


def make_groups(problem, runs, dtype, device, steps: int = None) -> list:
    by_kind = {}
    for run in runs:
        by_kind.setdefault(group_kind(run), []).append(run)
    return [BatchedGroup(problem, members, dtype, device, steps) for members in by_kind.values()]


class Trainer:
    """Steps every group from `start` to `steps`, logging every `log_every` steps."""

    def __init__(self, problem, groups, steps: int, log_every: int, on_log=(), states=None, folder=None,
                 checkpoint_every: int = 0, config=None):
        self.problem, self.groups, self.steps, self.log_every = problem, groups, steps, log_every
        self.config = config  # with folder: its --measure-every measures go to flatness.csv
        self.on_log = list(on_log)  # callables(step, rows, states)
        self.states = states or {r.run_id: RunState() for g in groups for r in g.runs}
        self.folder, self.checkpoint_every = folder, checkpoint_every
        self.wall_offset = 0.0

    def run(self, start: int = 0, stop=None) -> dict:
        """Train all groups; returns {run_id: RunState}. With `stop` (a GracefulStop), a request
        ends the loop after the current step and leaves a checkpoint to resume from."""
        self._began = time.perf_counter()
        # inference mode skips autograd bookkeeping (~20% off each small op); numpy, like torch, lets a
        # diverging run's numbers overflow to Inf and NaN quietly (the next log marks it diverged)
        with torch.inference_mode(), np.errstate(all="ignore"):
            step, _ = drive(self, start, self.steps, self.log_every, self.checkpoint_every, stop)
        self.checkpoint(step)
        return self.states

    # -- the Stepper protocol (engine/loop.py)

    def log(self, step: int) -> bool:
        self._log(step, self.wall_offset + time.perf_counter() - self._began)
        return any(s.status == "running" for s in self.states.values())

    @staticmethod
    def stopped(stop) -> bool:
        return stop is not None and stop.requested

    def advance(self, step: int):
        for group in self.groups:
            group.step(step)

    def run_ids(self) -> list:
        return [r.run_id for g in self.groups for r in g.runs]

    def checkpoint(self, step: int):
        if self.folder is None:
            return
        self.folder.save_checkpoint(CHECKPOINT, {
            "step": step, "groups": {g.key(): {"x": g.x.cpu(), "state": state_to(g.state, "cpu"),
                                               "memory": state_to(g.memory, "cpu")} for g in self.groups}},
            self.run_ids())

    def restore(self, logged_rows: list, live) -> int:
        """Load the checkpoint of a resumed folder; returns its step (0 without one). `live`: the
        runs that go on (their rows must reach the checkpoint's step)."""
        path = self.folder.path / "checkpoints" / CHECKPOINT
        saved = self.folder.load_checkpoint(CHECKPOINT, self.run_ids())
        if saved is None:
            return 0
        check_checkpoint_step(path, saved.get("step"), logged_rows, live, self.log_every, self.steps)
        restored = []
        try:
            for group in self.groups:
                entry = saved["groups"][group.key()]
                if entry["x"].shape != group.x.shape:
                    raise ValueError(f"parameters of shape {tuple(entry['x'].shape)}, not {tuple(group.x.shape)}")
                restored.append((entry["x"].to(group.device), state_to(entry["state"], group.device),
                                 state_to(entry.get("memory", ()), group.device)))
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as err:
            raise ZoflatError(f"{path} is damaged ({describe(err)}); delete it to start its runs over") from None
        for group, (x, state, memory) in zip(self.groups, restored):
            group.x, group.state, group.memory = x, state, memory
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
                row.update(step=step, wall_s=round(wall_s, 3), n_evals=evals_until(run, step))
                row.update({n: table[k][i] for k, n in enumerate(names)})
                rows.append(row)
                if self.config is not None and state.status != "diverged":
                    measure_if_due(self.folder, self.config, run, step, lambda group=group, i=i, run=run: BatchedSubject(
                        group.source.bind([run]), group.x[i].clone(), group.source.blocks))
        for callback in self.on_log:
            callback(step, rows, states)


def run_batched(config, runs, make_problem, quiet: bool = False, resume=None, console=None):
    """Run (or, with resume, continue) the runs of one typed config of a batched experiment.
    make_problem(device, dtype) builds the problem. Returns (run folder path, overall status)."""
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    if resume:
        previous = open_for_resume(resume, runs, device, config.to_dict())
    problem = make_problem(device, dtype)
    groups = {}
    for run in runs:
        groups.setdefault(group_kind(run), set()).add(run.seed)
    streams = sum(stream_bytes(len(seeds), kind[3], problem.n_params, config.steps) for kind, seeds in groups.items())
    check_memory(problem.memory_bytes(runs, dtype.itemsize) + streams, device,
                 f"{len(runs)} runs of `zoflat {config.command}`")
    groups = make_groups(problem, runs, dtype, device, config.steps)
    path = resume or create_run_dir(config.out, config.command, config.name)
    folder = RunFolder(path, config.to_dict(), problem, str(device))
    states = {r.run_id: RunState() for r in runs}
    view = LiveView(f"zoflat {config.command} · {path}", config.steps, quiet, console, states=states)
    trainer = Trainer(problem, groups, config.steps, config.log_every, [folder.on_log, view.on_log], states,
                      folder, config.checkpoint_every, config)
    result = {}
    with session(folder, view, states, result) as stop:
        start = 0
        if resume:
            # diverged runs stay as they ended; the others continue from the checkpoint
            states.update(carried_over(previous, runs, config.steps, completed=False))
            start = trainer.restore(folder.logged_rows(), [r for r, s in states.items() if s.status != "diverged"])
            folder.begin()
            folder.keep_rows(lambda r: int(r["step"]) < start or states[r["run_id"]].status == "diverged")
        trainer.run(start, stop)
    return path, result["status"]
