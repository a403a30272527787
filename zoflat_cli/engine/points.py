"""Runs brought back to chosen steps, as the flatness measures' subjects (measures/subject.py).

Batched runs (toy, convex) are deterministic in their seed: they are re-run to each chosen step,
all runs of a group together, as they were trained (directions are a function of seed, step and
sample). A model run is its base weights, plus a checkpoint at or before the step, plus its
update log replayed up to the step; a run without a log (gd, sam) is recomputed from there.
Either way the parameters are the trained ones bit for bit (on the device kind and, for
recomputed runs, the thread count they were trained with; tested against runs stopped there).
"""

from pathlib import Path

import torch

from zoflat_cli.engine.batched import BatchedSubject, make_groups
from zoflat_cli.engine.loop import RunState
from zoflat_cli.engine.model import ModelRunner, ModelSubject
from zoflat_cli.devices import DTYPES, resolve_device
from zoflat_cli.runs.folder import FolderReader


def batched_points(config, runs, make_problem, steps: dict):
    """Yields (run, step, BatchedSubject) for steps[run_id] (sorted step lists), step by step."""
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    problem = make_problem(device, dtype)
    last = max(max(s) for s in steps.values())
    for group in make_groups(problem, runs, dtype, device, last):
        end = max(max(steps[r.run_id]) for r in group.runs)
        for step in range(end + 1):
            for i, run in enumerate(group.runs):
                if step in steps[run.run_id]:
                    yield run, step, BatchedSubject(problem.bind([run]), group.x[i].clone(), problem.blocks)
            if step < end:
                with torch.inference_mode():
                    group.step(step)


def model_points(config, problem, runs, steps: dict, path: Path):
    """Yields (run, step, ModelSubject) for steps[run_id], run by run, on `problem` (at its base weights)."""
    folder = FolderReader(path)
    rows = folder.logged_rows()
    for i, run in enumerate(runs):
        if i:
            problem.load_base()
        runner = ModelRunner(problem, run, config, folder, RunState(), on_log=None)
        at = None
        for step in steps[run.run_id]:
            at = runner.restore([r for r in rows if r["run_id"] == run.run_id], until=step) if at is None \
                else runner.go_to(at, step)
            yield run, step, ModelSubject(problem)
    problem.load_base()
