"""The run-loop contract both runners follow: run settings, statuses, logging, signals, summary.

A run's status goes queued -> running -> completed | diverged | interrupted | failed:
  diverged     its loss or parameters became NaN/Inf at a logged step (the others go on);
  interrupted  Ctrl-C or SIGTERM: the runner stops after the current step and saves what it
               needs to resume;
  failed       an unexpected error (then reported).
`session()` wraps a runner: it installs the signal handlers, marks unfinished runs on the way out
and always writes the final summary.
"""

import contextlib
import functools
import math
import signal
from dataclasses import dataclass

import torch

from zoflat_cli.errors import describe
from zoflat_cli.optim.presets import HYPERPARAMETERS, get_preset


@dataclass(frozen=True)
class RunSpec:
    optimizer: str  # a preset (optim/presets.py)
    lr: float
    seed: int
    samples: int = 1
    hyper: tuple = ()  # ((name, value), ...) for the hyperparameters it reads, in HYPERPARAMETERS order
    directions: str = "gaussian"
    update: str = None  # None: the preset's own rule

    @property
    def rule(self) -> str:
        return self.update or get_preset(self.optimizer).update

    def value(self, name: str):
        return dict(self.hyper).get(name)

    @functools.cached_property  # rows are built for every run at every log: compute once
    def run_id(self) -> str:
        preset = get_preset(self.optimizer)
        parts = [self.optimizer]
        if preset.uses_directions and self.directions != "gaussian":
            parts.append(self.directions)
        if self.rule != preset.update:
            parts.append(self.rule)
        parts += [f"{HYPERPARAMETERS[k].tag}{v:g}" for k, v in self.hyper if v or not HYPERPARAMETERS[k].optional]
        parts.append(f"lr{self.lr:g}")
        if self.samples != 1:
            parts.append(f"n{self.samples}")
        parts.append(f"s{self.seed}")
        return "-".join(parts)

    def columns(self) -> dict:
        return dict(self._columns)

    @functools.cached_property
    def _columns(self) -> dict:
        uses = get_preset(self.optimizer).uses_directions
        return {
            "run_id": self.run_id,
            "optimizer": self.optimizer,
            "update": self.rule,
            "directions": self.directions if uses else None,
            **{name: self.value(name) for name in HYPERPARAMETERS},
            "lr": self.lr,
            "seed": self.seed,
            "samples": self.samples,
        }


RUN_COLUMNS = list(RunSpec("gd", 0.1, 0).columns())  # the settings columns of metrics.csv


@dataclass
class RunState:
    status: str = "running"  # queued | running | completed | diverged | interrupted | failed
    steps_done: int = 0


def judge(state: RunState, step: int, finite: bool, steps: int):
    """A run's status after logging `step`: diverged on NaN/Inf, completed at the last step."""
    state.steps_done = step
    if not finite:
        state.status = "diverged"
    elif step == steps:
        state.status = "completed"


def due(step: int, every: int, steps: int) -> bool:
    """Whether a periodic event (a log, an evaluation, a trace) happens at `step`: every `every`
    steps and at the last one."""
    return step % every == 0 or step == steps


# Exceptions of a run's own arithmetic (an eigensolver on overflowed values, ...): that run has
# diverged; the other runs go on.
NUMERICAL_ERRORS = (torch.linalg.LinAlgError, ArithmeticError)


def finite(value) -> bool:
    return value is not None and math.isfinite(value)


class GracefulStop:
    """First Ctrl-C (or SIGTERM) asks the runner to stop after the current step; a second Ctrl-C
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


def mark_unfinished(states: dict, status: str):
    for state in states.values():
        if state.status in ("running", "queued"):
            state.status = status


@contextlib.contextmanager
def session(folder, view, states: dict, result: dict):
    """Runs the body with signals handled; afterwards every unfinished run is marked (interrupted
    after a stop request or a second Ctrl-C, failed after an error) and the summary is final.
    result["status"] gets the overall status."""
    error = None
    try:
        with view, GracefulStop() as stop:
            yield stop
            if stop.requested:
                mark_unfinished(states, "interrupted")
    except KeyboardInterrupt:
        mark_unfinished(states, "interrupted")
    except BaseException as err:
        mark_unfinished(states, "failed")
        error = describe(err)
        raise
    finally:
        result["status"] = folder.finish(states, error)
