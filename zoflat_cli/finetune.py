"""`zoflat finetune`: the runs of a config, one model at a time, each resumable.

Besides config.yaml, metrics.csv and summary.json, the run folder holds
    updates/<run_id>.bin      ZO runs: one record per step, (step, then seed and projected gradient
                              per direction): replaying it on the base weights rebuilds the run
    checkpoints/<run_id>.pt   parameters at a step: every --checkpoint-every steps, and when a GD
                              run is stopped (a GD step cannot be replayed from a few bytes)
`zoflat finetune --resume DIR` continues every unfinished run from its checkpoint and log.
"""

import math
import os
import signal
import struct
import time
from pathlib import Path

import torch

from zoflat_cli.config import DTYPES, resolve_device, runs_from
from zoflat_cli.errors import ZoflatError
from zoflat_cli.estimators import get_estimator, n_evals
from zoflat_cli.hessian import dot, finite_difference, hutchinson, top_eigenvalue
from zoflat_cli.inplace import Directions, in_place_step, tilted_coefficients_for, two_point_coefficients
from zoflat_cli.live import LiveView
from zoflat_cli.problems.lm import LMProblem, peak_memory_mib
from zoflat_cli.runfolder import RunFolder, create_run_dir, read_summary
from zoflat_cli.streams import generator, stream_seed
from zoflat_cli.text_tasks import get_task, kshot
from zoflat_cli.trainer import RunState

REPLAYABLE = ("zo", "zest")  # optimizers whose steps the update log can replay


def update_log_path(run_dir: Path, run_id: str) -> Path:
    return run_dir / "updates" / f"{run_id}.bin"


def check_replay_device(run_dir: Path, runs, device: torch.device):
    """A logged ZO step is replayed by regenerating its directions, which only a generator of the
    same kind can do: CPU and CUDA generators draw different numbers from one seed."""
    drawn_on = read_summary(run_dir).get("device")
    kind = torch.device(drawn_on).type if drawn_on else device.type
    logged = [r.run_id for r in runs if r.optimizer in REPLAYABLE and update_log_path(run_dir, r.run_id).is_file()]
    if logged and kind != device.type:
        raise ZoflatError(f"--resume: {logged[0]} drew its directions on {kind} and can only be replayed there; "
                          f"resume with --device {kind}")


def coefficients_of(run):
    """The in-place estimator of a ZO-type run: f⁺, f⁻ lists -> coefficients of its directions."""
    if run.optimizer == "zest":
        return tilted_coefficients_for(run.value("lambda"), run.value("tilt"))
    return two_point_coefficients(run.value("lambda"))


class UpdateLog:
    """Fixed-size little-endian records: int64 step, then (uint64 seed, float64 c) per direction."""

    def __init__(self, path: Path, samples: int):
        self.path = path
        self.record = struct.Struct("<q" + "Qd" * samples)

    def read(self) -> list:
        """[(step, seeds, coefs)]; a torn last record (killed mid-write) is ignored."""
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        usable = len(data) - len(data) % self.record.size
        out = []
        for (step, *pairs) in self.record.iter_unpack(data[:usable]):
            out.append((step, list(pairs[0::2]), list(pairs[1::2])))
        return out

    def truncate(self, records: int):
        if self.path.is_file():
            os.truncate(self.path, records * self.record.size)

    def open(self):
        self.path.parent.mkdir(exist_ok=True)
        self._file = open(self.path, "ab")
        return self

    def append(self, step: int, seeds, coefs):
        self._file.write(self.record.pack(step, *[v for pair in zip(seeds, coefs) for v in pair]))
        self._file.flush()

    def close(self):
        self._file.close()


class GracefulStop:
    """First Ctrl-C (or SIGTERM) asks the loop to stop after the current step; a second Ctrl-C
    interrupts at once."""

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        return False


def direction_seeds(run, step: int) -> list:
    return [stream_seed(run.seed, "directions", step, i) for i in range(run.samples)]


def save_checkpoint(folder: Path, run_id: str, step: int, problem):
    path = folder / "checkpoints" / f"{run_id}.pt"
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"step": step, "state": {k: v.cpu() for k, v in problem.state().items()}}, tmp)
    os.replace(tmp, path)


class RunTrainer:
    """Trains one run of the config on `problem` (whose model holds the base weights)."""

    def __init__(self, problem: LMProblem, run, config: dict, folder: RunFolder, state: RunState, on_log):
        self.problem, self.run, self.config, self.folder = problem, run, config, folder
        self.state, self.on_log = state, on_log
        self.directions = Directions(problem.params)
        self.log = UpdateLog(update_log_path(folder.path, run.run_id), run.samples)
        self.evals_per_step = n_evals(get_estimator(run.optimizer), run.samples)
        self.wall_offset = 0.0
        self.passes_offset = 0.0

    # -- restoring a run

    def restore(self, logged_rows: list) -> int:
        """Bring the model to the latest recoverable step of this run; returns that step."""
        path = self.folder.path / "checkpoints" / f"{self.run.run_id}.pt"
        step = 0
        if path.is_file():
            saved = torch.load(path, map_location="cpu")
            self.problem.load_state(saved["state"])
            step = saved["step"]
        if self.run.optimizer in REPLAYABLE:
            records = self.log.read()
            lam = self.run.value("lambda")
            done = step
            for rec_step, seeds, coefs in records:
                if rec_step != done:
                    if rec_step < done:
                        continue
                    break  # a gap: the log ends being usable here
                in_place_step(self.directions, None, seeds, lam, self.run.lr, None, coefs=coefs)
                done += 1
            step = done
            self.log.truncate(sum(1 for r in records if r[0] < step))
        previous = [r for r in logged_rows if int(r["step"]) < step]
        if previous:  # carry the counters on, counting the replayed steps' forward passes
            last = previous[-1]
            self.wall_offset = float(last["wall_s"])
            self.passes_offset = float(last["forward_passes"]) + (step - int(last["step"])) * self.evals_per_step * (
                self.problem.batch_fraction(self.config["batch_size"]))
        return step

    # -- one step

    def step(self, step: int):
        run, problem = self.run, self.problem
        if run.optimizer in REPLAYABLE:
            seeds = direction_seeds(run, step)
            coefs = in_place_step(self.directions, lambda: problem.loss("batch"), seeds, run.value("lambda"),
                                  run.lr, coefficients_of(run))
            self.log.append(step, seeds, coefs)
            return
        grads = problem.gradient()
        if run.optimizer == "sam":  # the gradient at the ascent point x + ρ g/‖g‖ (Foret et al.)
            norm = dot(grads, grads) ** 0.5
            scale = run.value("rho") / norm if norm > 0 else 0.0
            with torch.no_grad():
                for p, g in zip(problem.params, grads):
                    p.add_(g, alpha=scale)
            ascent = problem.gradient()
            with torch.no_grad():
                for p, g in zip(problem.params, grads):
                    p.sub_(g, alpha=scale)
            grads = ascent
        with torch.no_grad():
            for p, g in zip(problem.params, grads):
                p.add_(g, alpha=-run.lr)

    # -- metrics

    def _due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.config["steps"]

    def metrics(self, step: int) -> dict:
        cfg, problem = self.config, self.problem
        loss, accuracy = problem.evaluate("train")
        row = {"loss": loss, "accuracy": accuracy, "test_loss": None, "test_accuracy": None,
               "hessian_trace": None, "hessian_trace_stderr": None, "lambda_max": None, "grad_norm": None}
        if self._due(step, cfg["eval_every"]):
            row["test_loss"], row["test_accuracy"] = problem.evaluate("test")
            grads = problem.gradient("train")
            row["grad_norm"] = dot(grads, grads) ** 0.5
        if cfg["eig_every"] and self._due(step, cfg["eig_every"]):
            gen = generator(self.run.seed, "probes", self.directions.device, step, 1)  # not the trace probes
            with problem.double_backward():
                row["lambda_max"] = top_eigenvalue(problem.params, problem.loss_terms, cfg["eig_iters"], gen)
        if cfg["trace"] != "none" and self._due(step, cfg["trace_every"]):
            row["hessian_trace"], row["hessian_trace_stderr"] = self.trace(step)
        row["forward_passes"] = round(self.passes_offset + problem.forward_passes, 3)
        row["peak_memory_mib"] = round(peak_memory_mib(self.directions.device), 1)
        return row

    def trace(self, step: int) -> tuple:
        cfg, problem = self.config, self.problem
        if cfg["trace"] == "fd":
            seeds = [stream_seed(self.run.seed, "probes", step, i) for i in range(cfg["trace_probes"])]
            return finite_difference(self.directions, problem.loss, seeds, cfg["trace_delta"])
        gen = generator(self.run.seed, "probes", self.directions.device, step)
        with problem.double_backward():
            return hutchinson(problem.params, problem.loss_terms, cfg["trace_probes"], gen)

    # -- the loop

    def train(self, start: int, stop: GracefulStop):
        steps, every = self.config["steps"], self.config["checkpoint_every"]
        began = time.perf_counter()
        self.problem.forward_passes = 0.0
        if self.run.optimizer in REPLAYABLE:
            self.log.open()
        try:
            for step in range(start, steps + 1):
                if self._due(step, self.config["log_every"]):
                    row = self.run.columns()
                    row.update(step=step, wall_s=None, n_evals=step * self.evals_per_step)
                    row.update(self.metrics(step))
                    row["wall_s"] = round(self.wall_offset + time.perf_counter() - began, 3)
                    self.state.steps_done = step
                    if not math.isfinite(row["loss"]):
                        self.state.status = "diverged"
                    elif step == steps:
                        self.state.status = "completed"
                    self.on_log(step, [row])
                    if self.state.status != "running":
                        return
                if stop.requested:
                    self.state.status = "interrupted"
                    if self.run.optimizer not in REPLAYABLE:
                        save_checkpoint(self.folder.path, self.run.run_id, step, self.problem)
                    return
                self.problem.draw_batch(self.config["batch_size"], self.run.seed, step)
                self.step(step)
                self.state.steps_done = step + 1
                if every and (step + 1) % every == 0:
                    save_checkpoint(self.folder.path, self.run.run_id, step + 1, self.problem)
        finally:
            if self.run.optimizer in REPLAYABLE:
                self.log.close()


def run_finetune(config: dict, quiet: bool = False, resume: Path = None):
    """Runs (or, with resume, continues) every run of the config. Returns (folder, status)."""
    task = get_task(config["task"])
    device, dtype = resolve_device(config["device"]), DTYPES[config["dtype"]]
    runs = runs_from(config)
    if resume:
        check_replay_device(Path(resume), runs, device)
    train, _dev, test = kshot(task, config["k"], config["split_seed"], config["data_dir"], config["test_mode"])
    problem = LMProblem(config, task, {"train": train.examples(), "test": test.examples()}, device, dtype)
    path = Path(resume) if resume else create_run_dir(config["out"], config["command"], config["name"])
    folder = RunFolder(path, config, problem, str(device))
    previous = folder.summary["runs"]
    states = {r.run_id: RunState(status="queued") for r in runs}
    view = LiveView(f"zoflat finetune · {path}", config["steps"], quiet)

    def on_log(step, rows):
        folder.on_log(step, rows, states)
        view.on_log(step, rows, states)

    plans = {}
    for run in runs:
        status = previous.get(run.run_id, {}).get("status")
        if status in ("completed", "diverged") and previous[run.run_id]["steps_done"] >= config["steps"]:
            states[run.run_id] = RunState(status, previous[run.run_id]["steps_done"])
        else:
            plans[run.run_id] = run
    try:
        with view, GracefulStop() as stop:
            kept_rows = folder.logged_rows()
            for i, run in enumerate(plans.values()):
                state = states[run.run_id]
                state.status = "running"
                if i > 0:
                    problem.load_base()
                trainer = RunTrainer(problem, run, config, folder, state, on_log)
                mine = [r for r in kept_rows if r["run_id"] == run.run_id]
                start = trainer.restore(mine)
                if mine:
                    folder.keep_rows(lambda r: r["run_id"] != run.run_id or int(r["step"]) < start)
                trainer.train(start, stop)
                if stop.requested:
                    break
    except KeyboardInterrupt:
        for state in states.values():
            if state.status == "running":
                state.status = "interrupted"
    except BaseException:
        for state in states.values():
            if state.status == "running":
                state.status = "failed"
        raise
    finally:
        status = folder.finish(states)
    return path, status

