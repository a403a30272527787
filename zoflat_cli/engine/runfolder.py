"""The run folder: the one on-disk format every subcommand writes (see README, "Run folders").

runs/<command>/<UTC timestamp>-<name>/
    config.yaml    the fully resolved config; `zoflat <command> --config` on it re-runs it
    metrics.csv    tidy: one row per run x logged step, appended and flushed at every log
    summary.json   per-run status, final and best values, versions, device; rewritten atomically
"""

import csv
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

import zoflat_cli
from zoflat_cli.engine.loop import RUN_COLUMNS
from zoflat_cli.errors import ZoflatError

SUMMARY_EVERY_S = 1.0
SETTINGS = {*RUN_COLUMNS, "step"}  # a row's columns that are not metrics


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def create_run_dir(out: Path, command: str, name: str) -> Path:
    """A new folder runs/<command>/<timestamp>-<name>; never reuses an existing one."""
    parent = Path(out) / command
    parent.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{name}"
    for attempt in range(1, 1000):
        path = parent / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free run folder name under {parent}")


def read_summary(folder: Path) -> dict:
    """The summary.json of a run folder as written so far ({} when there is none)."""
    path = Path(folder) / "summary.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ZoflatError(f"{path} is damaged ({err}); restore it, or start a new run folder") from None


def formats() -> dict:
    """The format versions of what a resume regenerates or reads back: directions drawn from their
    keys, and finetune's update logs. A folder written with other versions is not resumed."""
    from zoflat_cli.engine.model import UPDATE_LOG_VERSION
    from zoflat_cli.optim.directions import FORMAT_VERSION

    return {"directions": FORMAT_VERSION, "update_log": UPDATE_LOG_VERSION}


def open_for_resume(folder: Path, runs, device, steps: int) -> dict:
    """Checks that this zoflat can continue the folder's runs on `device` bit for bit, up to
    `steps`; returns the recorded runs ({run_id: entry})."""
    from zoflat_cli.optim.presets import get_preset

    summary = read_summary(folder)
    done = max((entry.get("steps_done", 0) for entry in summary.get("runs", {}).values()), default=0)
    if steps < done:  # resuming would drop rows already logged
        raise ZoflatError(f"--resume: --steps {steps} is below the {done} steps already done; give --steps {done} "
                          f"or more")
    drawing = [r.run_id for r in runs if get_preset(r.optimizer).uses_directions]
    if drawing:
        recorded = summary.get("formats", {"directions": 1, "update_log": 1})
        if recorded != formats():
            raise ZoflatError(f"--resume {folder}: its directions and update logs have format {recorded}, this "
                              f"zoflat draws {formats()}: it would rebuild different models; finish the folder with "
                              f"the zoflat version that started it")
        drawn_on = summary.get("device")
        kind = str(drawn_on).split(":")[0] if drawn_on else device.type
        if kind != device.type:
            raise ZoflatError(f"--resume: {drawing[0]} drew its directions on {kind} and can only be continued "
                              f"there (CPU and CUDA generators draw different numbers); resume with --device {kind}")
    return summary.get("runs", {})


def versions() -> dict:
    import numpy
    import torch

    return {
        "zoflat": zoflat_cli.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


class RunFolder:
    def __init__(self, path: Path, config: dict, problem, device: str):
        self.path = Path(path)
        self.problem = problem
        (self.path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self._csv_file = None
        self._writer = None
        self._last_summary = 0.0
        recorded = read_summary(self.path)
        if recorded:  # a resumed run: keep what the first session recorded
            self.summary = recorded
            self.summary.update(status="running", device=device, versions=versions())
            return
        self.summary = {
            "command": config["command"],
            "name": config["name"],
            "status": "running",
            "created_utc": utc_now(),
            "updated_utc": utc_now(),
            "device": device,
            "versions": versions(),
            "formats": formats(),
            "references": {k: {"value": v, "label": lab} for k, (v, lab) in problem.references.items()},
            "problem": getattr(problem, "description", {}),
            "panels": getattr(problem, "panels", None),
            "runs": {},
        }

    def logged_rows(self) -> list:
        """The rows of metrics.csv so far, as dicts of strings ([] before the first log)."""
        path = self.path / "metrics.csv"
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    def keep_rows(self, keep):
        """Resuming: drop the logged rows for which keep(row) is false, append after the rest."""
        path = self.path / "metrics.csv"
        rows = self.logged_rows()
        if not rows:
            return
        fields, rows = list(rows[0]), [r for r in rows if keep(r)]
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        if self._csv_file is not None:
            self._csv_file.close()
        self._csv_file = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._csv_file, fieldnames=fields, extrasaction="ignore")

    def on_log(self, step: int, rows: list, states: dict):
        if rows:
            if self._writer is None:  # append after what an earlier session wrote, never over it
                path = self.path / "metrics.csv"
                kept = self.logged_rows()
                self._csv_file = open(path, "a" if kept else "w", newline="")
                self._writer = csv.DictWriter(self._csv_file, fieldnames=list(kept[0]) if kept else list(rows[0]),
                                              extrasaction="ignore")  # every row has the header's keys: skip the check
                if not kept:
                    self._writer.writeheader()
            self._writer.writerows(rows)
            self._csv_file.flush()
        for row in rows:
            self._record(row, states[row["run_id"]])
        if time.monotonic() - self._last_summary >= SUMMARY_EVERY_S:
            self._write_summary()

    def _record(self, row: dict, state):
        entry = self.summary["runs"].get(row["run_id"])
        if entry is None:
            entry = self.summary["runs"][row["run_id"]] = {k: row[k] for k in RUN_COLUMNS if k != "run_id"}
        entry.update(status=state.status, steps_done=state.steps_done)
        final = entry.setdefault("final", {})
        final["step"] = row["step"]
        final.update((k, v) for k, v in row.items() if v is not None and k not in SETTINGS)
        best = entry.setdefault("best", {})
        for name, direction in self.problem.best.items():
            value = row[name]
            if value is None:  # not evaluated at this step
                continue
            old = best.get(name)
            if old is None or (value < old["value"] if direction == "min" else value > old["value"]):
                best[name] = {"value": value, "step": row["step"]}

    def _write_summary(self):
        self.summary["updated_utc"] = utc_now()
        tmp = self.path / "summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=2, allow_nan=True))
        os.replace(tmp, self.path / "summary.json")
        self._last_summary = time.monotonic()

    def finish(self, states: dict) -> str:
        """Final statuses; returns the overall status: the first of failed, interrupted,
        diverged that any run has, else completed."""
        for run_id, state in states.items():
            entry = self.summary["runs"].get(run_id)
            if entry is not None:
                entry["status"] = state.status
        statuses = {s.status for s in states.values()}
        overall = next((s for s in ("failed", "interrupted", "diverged") if s in statuses), "completed")
        self.summary["status"] = overall
        if self._csv_file is not None:
            self._csv_file.close()
        self._write_summary()
        return overall
