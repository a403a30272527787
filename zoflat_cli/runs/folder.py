"""The run folder: the one on-disk format every subcommand writes (see README, "Run folders").

runs/<command>/<UTC timestamp>-<name>/
    config.yaml    the fully resolved config; `zoflat <command> --config` on it re-runs it
    metrics.csv    tidy: one row per run x logged step, appended and flushed at every log
    summary.json   per-run status, final and best values, versions, device; strict JSON
                   (NaN and Inf written as null), rewritten atomically
    .lock          held (flock) by the one process writing the folder
    .reserve       64 KiB set aside at the start: freed on a full disk, so that the final
                   summary (status failed, with the reason) can still be written

Integrity: rows are only appended; a write that fails (disk full) is cut back to the last whole
row; readers skip a torn last row (a process killed mid-write).
"""

import contextlib
import csv
import errno
import fcntl
import io
import json
import math
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

import zoflat_cli
from zoflat_cli.errors import RunFailed, ZoflatError, one_line
from zoflat_cli.optim.directions import FORMAT_VERSION
from zoflat_cli.optim.presets import get_preset
from zoflat_cli.runs.identity import (check_identity, check_rows, check_unchanged, data_hashes, fingerprint, identity,
                                      summary_damage)
from zoflat_cli.runs.spec import NOT_METRICS, RUN_COLUMNS
from zoflat_cli.runs.trackers import open_tracker
from zoflat_cli.runs.updatelog import UPDATE_LOG_VERSION

SUMMARY_EVERY_S = 1.0  # summary.json is rewritten at most this often while running
RESERVE_BYTES = 64 * 1024  # room kept for the final summary on a full disk


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def create_run_dir(out: Path, command: str, name: str) -> Path:
    """A new folder runs/<command>/<timestamp>-<name>; never reuses an existing one."""
    parent = Path(out) / command
    stem = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{name}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 1000):
            path = parent / (stem if attempt == 1 else f"{stem}-{attempt}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as err:
        raise ZoflatError(f"--out {out}: cannot make a run folder there ({err.strerror})") from None
    raise ZoflatError(f"--out {out}: no free run folder name under {parent}")


def strict(value):
    """value with every non-finite float as None: strict JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def summary_text(summary: dict) -> str:
    """summary.json's text: a key per line, and a line per run (json's C encoder: its indenting
    one is pure Python, seconds for a seed study of thousands of runs)."""
    def line(key, value, indent):
        try:
            text = json.dumps(value, allow_nan=False)
        except ValueError:  # a NaN or Inf somewhere: null, as strict JSON has it
            text = json.dumps(strict(value), allow_nan=False)
        return f"{indent}{json.dumps(key)}: {text}"

    lines = [line(k, v, "  ") for k, v in summary.items() if k != "runs"]
    runs = ",\n".join(line(k, v, "    ") for k, v in summary.get("runs", {}).items())
    lines.append(f'  "runs": {{\n{runs}\n  }}' if runs else '  "runs": {}')
    return "{\n" + ",\n".join(lines) + "\n}\n"


def complete_metrics(folder: Path) -> str:
    """The text of a run folder's metrics.csv up to its last whole row ("" when there is none):
    a torn last row (a write cut short) is left out; damage before it is an error."""
    path = Path(folder) / "metrics.csv"
    if not path.is_file():
        return ""
    data = path.read_bytes()
    damaged = f"{path} is damaged"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ZoflatError(f"{damaged} (not UTF-8 text); restore it, or start a new run folder") from None
    if "\0" in text:
        raise ZoflatError(f"{damaged} (binary data); restore it, or start a new run folder")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # torn: killed mid-row
    if not lines:
        return ""
    header = next(csv.reader(lines[:1]))
    if "run_id" not in header or "step" not in header:
        raise ZoflatError(f"{path} is not a zoflat metrics file (no run_id and step columns)")
    at = header.index("step")
    for number, row in enumerate(csv.reader(lines[1:]), start=2):
        whole = len(row) == len(header) and row[at].isdigit()
        if not whole and number == len(lines):
            lines.pop()  # torn: a last row cut short
        elif not whole:
            raise ZoflatError(f"{damaged} at line {number}; restore it, or start a new run folder")
    return "".join(lines)


def read_summary(folder: Path) -> dict:
    """The summary.json of a run folder as written so far ({} when there is none)."""
    path = Path(folder) / "summary.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ZoflatError(f"{path} is damaged ({one_line(err)}); restore it, or start a new run folder") from None
    runs = summary.get("runs", {}) if isinstance(summary, dict) else None
    if not isinstance(runs, dict) or not all(isinstance(entry, dict) for entry in runs.values()):
        raise ZoflatError(f"{path} is damaged (not a zoflat summary); restore it, or start a new run folder")
    return summary


def formats() -> dict:
    """The format versions of what a resume regenerates or reads back: directions drawn from their
    keys, and finetune's update logs. A folder written with other versions is not resumed."""
    return {"directions": FORMAT_VERSION, "update_log": UPDATE_LOG_VERSION}


def open_for_resume(folder: Path, runs, device, config: dict) -> dict:
    """Checks, before anything is written, that this zoflat can continue the folder's runs of
    `config` (as resolved for the resume) on `device` bit for bit, and that the folder's files are
    those its runs wrote (runs/identity.py); returns the recorded runs ({run_id: entry})."""
    folder, steps = Path(folder), config["steps"]
    summary = read_summary(folder)
    if not summary:
        raise ZoflatError(f"--resume {folder}: no summary.json (the run never started, or the file was deleted); "
                          f"start a new run folder")
    damage = summary_damage(summary)
    if damage:
        raise ZoflatError(f"{folder / 'summary.json'} is damaged ({damage}); restore it, or start a new run folder")
    check_unchanged(folder, summary, config)
    check_rows(folder, list(csv.DictReader(io.StringIO(complete_metrics(folder)))), summary,
               {r.run_id for r in runs})
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


class FolderReader:
    """A run folder read, never written (the flatness measures'): its summary, rows and checkpoints."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.summary = read_summary(self.path)

    def load_checkpoint(self, name: str, run_ids):
        """checkpoints/<name> of these runs (None when there is none), its identity checked
        against the folder's (its step is the runner's to check: identity.check_checkpoint_step)."""
        import torch

        path = self.path / "checkpoints" / name
        if not path.exists():
            return None
        try:
            saved = torch.load(path, map_location="cpu")
        except Exception as err:  # torch raises several kinds on a damaged file (IsADirectoryError, ...)
            raise ZoflatError(f"{path} is damaged ({type(err).__name__}); delete it to resume from the start of "
                              f"its runs, or start a new run folder") from None
        if not isinstance(saved, dict):
            raise ZoflatError(f"{path} is damaged (not a zoflat checkpoint); delete it to start its runs over")
        check_identity(saved.get("identity"), self.summary, run_ids, path)
        return saved

    def logged_rows(self) -> list:
        """The whole rows of metrics.csv so far, as dicts of strings ([] before the first log)."""
        return list(csv.DictReader(io.StringIO(complete_metrics(self.path))))


class RunFolder(FolderReader):
    """The writer of one run folder. It holds the folder's lock for as long as it lives; every
    write goes through `writing`, which turns a failed write into RunFailed (the folder keeps
    every earlier byte; the final summary says failed and why)."""

    def __init__(self, path: Path, config: dict, problem, device: str):
        self.path = Path(path)
        self.problem = problem
        self._lock = lock_folder(self.path)
        self._csv_file = None
        self._writer = None
        self._last_summary = 0.0
        self._keep = []  # keep_rows' predicates, not yet applied
        self.error = None
        recorded = read_summary(self.path)
        self._config, self.begun = config, False
        if not recorded:
            try:
                self.begin()
            except RunFailed:
                self._lock.close()
                shutil.rmtree(self.path, ignore_errors=True)  # nothing ran: leave no half-made folder behind
                raise RunFailed(f"cannot start a run folder in {self.path.parent}: {self.error}") from None
        try:
            self.tracker = open_tracker(config.get("logger"), self.path, config)
        except Exception as err:  # a tracker's own failures come in its own types
            self._lock.close()
            if not recorded:
                shutil.rmtree(self.path, ignore_errors=True)
            raise ZoflatError(f"--logger {config.get('logger')}: cannot start it ({one_line(err)})") from None
        if recorded:  # a resumed run: keep what the first session recorded
            self.summary = recorded
            self.summary.update(status="running", device=device, versions=versions())
            self.summary.pop("error", None)
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
            "fingerprint": fingerprint(config),
            "data": data_hashes(config),
            "references": {k: {"value": v, "label": lab} for k, (v, lab) in problem.references.items()},
            "problem": problem.description,
            "panels": problem.panels,
            "runs": {},
        }

    def begin(self):
        """The folder is this session's from here on: config.yaml (a resume's --steps and --device) and
        the reserve are written. A resumed folder begins once its runs have their state back: a resume
        refused before that changes no file."""
        with self.writing("config.yaml"):
            atomic_write(self.path / "config.yaml", yaml.safe_dump(self._config, sort_keys=False))
            reserve = self.path / ".reserve"
            if not reserve.is_file() or reserve.stat().st_size < RESERVE_BYTES:
                atomic_write(reserve, "\0" * RESERVE_BYTES)
        self.begun = True

    @contextlib.contextmanager
    def writing(self, what: str):
        try:
            yield
        except OSError as err:
            if err.errno == errno.ENOSPC:  # let the final summary be written in the reserve's room
                (self.path / ".reserve").unlink(missing_ok=True)
            self.error = f"writing {what} failed: {err.strerror or one_line(err)}"
            raise RunFailed(f"{self.error}; the run folder {self.path} keeps everything written before and is "
                            f"marked failed (free space, then --resume it)") from None

    def save_checkpoint(self, name: str, content: dict, run_ids):
        """checkpoints/<name> of these runs (with their identity), replaced atomically: a failed save
        (a full disk, a folder in its place) keeps the previous one and is RunFailed."""
        import torch

        path = self.path / "checkpoints" / name
        tmp = path.with_name(path.name + ".tmp")
        with self.writing(f"checkpoints/{name}"):
            path.parent.mkdir(exist_ok=True)
            try:
                with open(tmp, "wb") as f:  # through a Python file: a failed write is an OSError (ENOSPC, ...)
                    torch.save({**content, "identity": identity(self.summary, run_ids)}, f)
            except BaseException as err:
                tmp.unlink(missing_ok=True)
                if isinstance(err, RuntimeError):  # torch's own writer errors
                    raise OSError(errno.EIO, one_line(err)) from None
                raise
            os.replace(tmp, path)

    def keep_rows(self, keep):
        """Resuming: the logged rows for which keep(row) is false are dropped when the resumed runs
        log their first row (so a resume that fails before then loses nothing); appending goes on
        after the rest."""
        self._keep.append(keep)

    def _drop_rows(self):
        keep, self._keep = self._keep, []
        rows = self.logged_rows()
        if not rows:
            return
        fields, rows = list(rows[0]), [r for r in rows if all(k(r) for k in keep)]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        with self.writing("metrics.csv"):
            atomic_write(self.path / "metrics.csv", text.getvalue())
        self._close_csv()
        self._open_csv(fields)

    def _open_csv(self, fields: list):
        """Append after the whole rows written so far (a torn last row is cut off first), under
        their header; `fields` heads a file that has no rows yet."""
        path = self.path / "metrics.csv"
        text = complete_metrics(self.path)
        if text:
            fields = next(csv.reader(text.splitlines()[:1]))
        kept = text.encode()
        with self.writing("metrics.csv"):
            if path.is_file():
                os.truncate(path, len(kept))
            self._csv_file = open(path, "a", newline="")
            self._writer = csv.DictWriter(self._csv_file, fieldnames=fields, extrasaction="ignore")
            if not kept:
                self._writer.writeheader()
                self._csv_file.flush()
            self._good_bytes = self._csv_file.tell()

    def _close_csv(self):
        if self._csv_file is not None:
            with contextlib.suppress(OSError):
                self._csv_file.close()
            self._csv_file = self._writer = None

    def on_log(self, step: int, rows: list, states: dict):
        if rows:
            if self._keep:
                self._drop_rows()
            if self._writer is None:  # after what an earlier session wrote, under its header
                self._open_csv(list(rows[0]))
            try:
                with self.writing("metrics.csv"):
                    self._writer.writerows(rows)
                    self._csv_file.flush()
            except RunFailed:  # cut a partly written row back to the last whole one
                with contextlib.suppress(OSError):
                    os.truncate(self.path / "metrics.csv", self._good_bytes)
                self._csv_file = self._writer = None  # its buffer holds the rows that failed
                raise
            self._good_bytes = self._csv_file.tell()
            if self.tracker is not None:  # a copy; metrics.csv is the record
                self.tracker.log(rows)
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
        final.update((k, v) for k, v in row.items() if v is not None and k not in NOT_METRICS)
        best = entry.setdefault("best", {})
        for name, direction in self.problem.best.items():
            value = row[name]
            if value is None or not math.isfinite(value):  # not evaluated at this step, or diverged
                continue
            old = best.get(name)
            if old is None or (value < old["value"] if direction == "min" else value > old["value"]):
                best[name] = {"value": value, "step": row["step"]}

    def note(self, run_id: str, reason: str):
        """Why a run stopped (a numerical error), kept in its summary entry."""
        self.summary["runs"].setdefault(run_id, {})["reason"] = reason

    def _write_summary(self):
        self.summary["updated_utc"] = utc_now()
        with self.writing("summary.json"):
            atomic_write(self.path / "summary.json", summary_text(self.summary))
        self._last_summary = time.monotonic()

    def finish(self, states: dict, error: str = None) -> str:
        """Final statuses; returns the overall status: the first of failed, interrupted,
        diverged that any run has, else completed. `error`: why the runs failed. A resumed folder
        that never began (its resume was refused) is left as it was."""
        if not self.begun:
            if self.tracker is not None:
                self.tracker.close()
            self._lock.close()
            return "failed"
        for run_id, state in states.items():
            entry = self.summary["runs"].get(run_id)
            if entry is not None:
                entry["status"] = state.status
        statuses = {s.status for s in states.values()}
        overall = next((s for s in ("failed", "interrupted", "diverged") if s in statuses), "completed")
        self.summary["status"] = overall
        if self.error or error:
            self.summary["error"] = self.error or error
        self._close_csv()
        if self.tracker is not None:
            self.tracker.close()
        try:
            try:
                self._write_summary()
            except RunFailed:  # a full disk: the reserve is free now, so once more
                self._write_summary()
        finally:
            self._lock.close()
        return overall


def lock_folder(folder: Path, what: str = "run folder"):
    """An exclusive lock on a run or sweep folder for this process (released when it exits, also on
    kill -9); one zoflat process writes a folder at a time."""
    try:
        handle = open(folder / ".lock", "a+")
    except OSError as err:
        raise ZoflatError(f"cannot write in the {what} {folder} ({err.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ZoflatError(f"{folder} is being written by another zoflat process; wait for it to end "
                          f"(or stop it) before resuming it") from None
    return handle


def atomic_write(path: Path, text: str):
    """path holds either its old content or all of text, whatever happens; a partial temporary
    file is removed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
