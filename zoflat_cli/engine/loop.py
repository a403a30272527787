"""The run loop both runners follow: statuses, the step-driving loop, signals, resume, summary.

A run's status goes queued -> running -> completed | diverged | interrupted | failed:
  diverged     its loss or parameters became NaN/Inf at a logged step (the others go on);
  interrupted  a stop signal (signals.py: Ctrl-C, SIGTERM, SIGHUP, SIGQUIT): the runner stops
               after the current step and saves what it needs to resume;
  failed       an unexpected error (then reported).
`drive()` is the one loop: log every --log-every steps and at the last, stop on request, step,
checkpoint every --checkpoint-every steps; a runner (the batched one: all runs as tensors; the
model one: one run in place) says what each of those is (the Stepper protocol). `session()` wraps
a runner: it installs the signal handlers, marks unfinished runs on the way out and always writes
the final summary.
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Protocol

import torch

from zoflat_cli.errors import describe
from zoflat_cli.measures.catalog import Settings, measure_names
from zoflat_cli.measures.registry import take
from zoflat_cli.runs.flatness import write_rows
from zoflat_cli.runs.spec import due
from zoflat_cli.signals import GracefulStop


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


def carried_over(previous: dict, runs, steps: int, completed: bool) -> dict:
    """{run_id: RunState} of a resumed folder's runs that stay as they ended: the diverged ones,
    and with `completed` those completed at `steps` or beyond (a runner that trains runs one at a
    time skips them; the batched runner steps every run together, so it only skips diverged ones)."""
    kept = {}
    for run in runs:
        entry = previous.get(run.run_id, {})
        if entry.get("status") == "diverged" or (completed and entry.get("status") == "completed"
                                                 and entry["steps_done"] >= steps):
            kept[run.run_id] = RunState(entry["status"], entry["steps_done"])
    return kept


class Stepper(Protocol):
    """What drive() asks of a runner."""

    def log(self, step: int) -> bool:
        """Log `step` (metrics rows, statuses judged); whether any of its runs goes on."""

    def stopped(self, stop) -> bool:
        """Whether to stop before stepping (a stop signal seen by `stop`, on every rank at once)."""

    def advance(self, step: int):
        """Iteration `step` (from 0): the parameters go from x_step to x_(step+1)."""

    def checkpoint(self, step: int):
        """Save what resuming at `step` needs."""


def drive(runner: Stepper, start: int, steps: int, log_every: int, checkpoint_every: int, stop) -> tuple:
    """Steps from `start` up to `steps`: (the step reached, whether a stop request ended it there)."""
    for step in range(start, steps + 1):
        if due(step, log_every, steps) and not runner.log(step):
            return step, False
        if runner.stopped(stop):
            return step, True
        if step == steps:
            return step, False
        runner.advance(step)
        if checkpoint_every and (step + 1) % checkpoint_every == 0:
            runner.checkpoint(step + 1)
    return start, False  # nothing left to do (start > steps)


# Exceptions of a run's own arithmetic (an eigensolver on overflowed values, ...): that run has
# diverged; the other runs go on.
NUMERICAL_ERRORS = (torch.linalg.LinAlgError, ArithmeticError)


def finite(value) -> bool:
    return value is not None and math.isfinite(value)


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


def measure_if_due(folder, config, run, step: int, subject):
    """--measure-every: the run's --measures at this step into flatness.csv, when due (every N
    steps and at the last). subject() makes the run's Subject (measures/subject.py). The landscape's
    plane, which needs the run's start, is `zoflat flatness`'s only."""
    if config.measure_every and due(step, config.measure_every, config.steps):
        rows = take(subject(), measure_names(config.measures), Settings(), run, step)
        with folder.writing("flatness.csv"):
            write_rows(folder.path, rows)
