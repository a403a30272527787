"""What a run folder's runs are, as a fingerprint: checked on --resume before anything is written.

A new run folder records in summary.json the fingerprint of its resolved config (every setting but
those a resume may change: steps, device, out) and a sha256 of each data file the config names
(`*_file` settings). Every checkpoint and update log carries the fingerprint and its run ids. A
resume compares config.yaml, the data files, metrics.csv, the checkpoints and the update logs
against them first; a file that does not match is one `error:` line naming it, and nothing changes.
"""

import hashlib
import json
from pathlib import Path

from zoflat_cli.errors import ZoflatError
from zoflat_cli.optim.presets import HYPERPARAMETERS
from zoflat_cli.runs.spec import due

RESUMABLE = ("steps", "device", "probe_cache")  # what --resume may change in a run folder's config
RESUMABLE_FLAGS = ", ".join("--" + name.replace("_", "-") for name in RESUMABLE)
# nor where the folder is, nor which flatness measures are logged (they never move the weights; folders
# written before --measure-every have no such keys)
NOT_IDENTITY = (*RESUMABLE, "out", "measures", "measure_every")
# settings added after folders had fingerprints: left out while at their default, so those folders still resume
LATER = {name: HYPERPARAMETERS[name].default for name in ("rank", "period", "sparsity", "hessian_smooth")}
STATUSES = ("queued", "running", "completed", "diverged", "interrupted", "failed")


def digest(mapping: dict) -> str:
    """sha256 of a mapping as canonical JSON."""
    return hashlib.sha256(json.dumps(mapping, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(config: dict) -> str:
    """sha256 of the config's identity: its settings but NOT_IDENTITY (and LATER ones at their default)."""
    return digest({k: v for k, v in config.items() if k not in NOT_IDENTITY and not (k in LATER and v == LATER[k])})


def data_hashes(config: dict) -> dict:
    """{setting: sha256} of the data files the config names."""
    hashes = {}
    for key, value in config.items():
        if key.endswith("_file") and value and Path(value).is_file():
            digest = hashlib.sha256()
            with open(value, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            hashes[key] = digest.hexdigest()
    return hashes


def identity(summary: dict, run_ids) -> dict:
    """What a checkpoint or update log of these runs carries."""
    return {"fingerprint": summary.get("fingerprint"), "runs": list(run_ids)}


def check_identity(found, summary: dict, run_ids, path: Path):
    """A checkpoint's or update log's identity against the folder's (folders made before fingerprints: none)."""
    if summary.get("fingerprint") is None:
        return
    expected = identity(summary, run_ids)
    if not isinstance(found, dict) or found.get("fingerprint") != expected["fingerprint"]:
        raise ZoflatError(f"{path} belongs to another run folder or config (its fingerprint differs); delete it to "
                          f"start its runs over, or start a new run folder")
    if found.get("runs") != expected["runs"]:
        raise ZoflatError(f"{path} holds runs {', '.join(map(str, found.get('runs') or []))}, not "
                          f"{', '.join(expected['runs'])}; delete it to start its runs over, or start a new run folder")


def summary_damage(summary: dict):
    """What makes a summary.json unusable for a resume (None if nothing)."""
    for key, kind in (("fingerprint", str), ("device", str), ("formats", dict), ("data", dict)):
        if key in summary and not isinstance(summary[key], kind):
            return f"{key} is not a {kind.__name__}"
    for run_id, entry in summary.get("runs", {}).items():
        steps = entry.get("steps_done", 0)
        if entry.get("status", "running") not in STATUSES:
            return f"run {run_id}: status {entry.get('status')!r}"
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            return f"run {run_id}: steps_done {steps!r}"
    return None


def check_unchanged(folder: Path, summary: dict, config: dict):
    """config.yaml and the data files are those the runs started with."""
    if summary.get("fingerprint") is None:
        return
    if fingerprint(config) != summary["fingerprint"]:
        raise ZoflatError(f"{folder / 'config.yaml'} was changed after its runs started (only {RESUMABLE_FLAGS} may "
                          f"change on resume); restore it, or start a new run folder with the new config")
    now = data_hashes(config)
    for key, digest in summary.get("data", {}).items():
        if now.get(key) != digest:
            raise ZoflatError(f"{config.get(key)} (--{key.replace('_', '-')}) is not the file the runs of {folder} "
                              f"started with (its sha256 differs); restore it, or start a new run folder")


def check_rows(folder: Path, rows: list, summary: dict, run_ids):
    """metrics.csv against the runs and summary.json: only these runs, steps rising, and every step
    summary.json records as logged present."""
    path = folder / "metrics.csv"
    last = {}
    for number, row in enumerate(rows, start=2):
        run_id, step = row["run_id"], int(row["step"])
        if run_id not in run_ids:
            raise ZoflatError(f"{path} line {number}: run {run_id} is not a run of this folder's config; restore "
                              f"the file, or start a new run folder")
        if step <= last.get(run_id, -1):
            raise ZoflatError(f"{path} line {number}: step {step} of {run_id} after step {last[run_id]} (rows "
                              f"reordered or repeated); restore the file, or start a new run folder")
        last[run_id] = step
    for run_id, entry in summary.get("runs", {}).items():
        final = entry.get("final", {}).get("step")
        if isinstance(final, int) and final > last.get(run_id, -1):
            raise ZoflatError(f"{path} lacks rows summary.json records ({run_id} at step {final}); restore it, or "
                              f"start a new run folder")


def check_checkpoint_step(path: Path, step, rows: list, run_ids, log_every: int, steps: int):
    """A checkpoint's step is one the rows reach: every logged step before it is in metrics.csv."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ZoflatError(f"{path} is damaged (step {step!r}); delete it to start its runs over")
    if step > steps:  # stopped between two logged steps, past the --steps now asked for
        raise ZoflatError(f"--resume: the checkpoint is at step {step}, past --steps {steps}; give --steps {step} or "
                          f"more")
    expected = sum(1 for s in range(step) if due(s, log_every, steps))  # rows are unique and rising (check_rows)
    counts = dict.fromkeys(run_ids, 0)
    for row in rows:
        if row["run_id"] in counts and int(row["step"]) < step:
            counts[row["run_id"]] += 1
    for run_id, count in counts.items():
        if count < expected:
            raise ZoflatError(f"{path} is at step {step}, but metrics.csv has {count} of the {expected} rows of "
                              f"{run_id} logged before it (rows deleted, or the checkpoint of another run); restore "
                              f"metrics.csv, or delete the checkpoint to start its runs over")
