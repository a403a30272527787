"""`--logger wandb|tensorboard|mlflow`: the rows of metrics.csv, streamed to an experiment tracker.

The run folder stays the source of truth; a tracker gets a copy of every logged row as it is
written, each metric against the row's step (tensorboard, mlflow: under `<run_id>/<metric>`),
and keeps its files inside the run folder unless told otherwise:
  tensorboard  event files in <run folder>/tensorboard/ (torch.utils.tensorboard)
  wandb        one wandb run per zoflat run (<folder>/<run_id>, grouped by folder, metrics named
               as in metrics.csv); offline unless WANDB_MODE says otherwise, files in
               <run folder>/wandb/ (`wandb sync` uploads them later)
  mlflow       one mlflow run per run folder, in <run folder>/mlruns unless MLFLOW_TRACKING_URI
"""

import logging
import math
import os
from pathlib import Path

from zoflat_cli.env import reachable
from zoflat_cli.errors import ZoflatError
from zoflat_cli.errors import require as require_package
from zoflat_cli.runs.spec import NOT_METRICS, RUN_COLUMNS

LOGGERS = ("wandb", "tensorboard", "mlflow")  # each also the name of the package it imports


WANDB_MODES = ("offline", "online", "disabled", "dryrun", "run")


def require(kind: str):
    """Before any run folder exists: the tracker's package imports (else one line naming the extra
    to install), and a server it is told to use answers within seconds (else one line)."""
    require_package(kind, f"--logger {kind}", "trackers")
    if kind == "wandb":
        mode = os.environ.get("WANDB_MODE", "offline")
        if mode not in WANDB_MODES:
            raise ZoflatError(f"--logger wandb: WANDB_MODE={mode} is not one of {', '.join(WANDB_MODES)}")
        server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        if mode in ("online", "run") and not reachable(server):
            raise ZoflatError(f"--logger wandb: {server} cannot be reached; set WANDB_MODE=offline (then `wandb sync` "
                              f"later) or check the network")
    if kind == "mlflow":
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if uri.startswith(("http://", "https://")) and not reachable(uri):
            raise ZoflatError(f"--logger mlflow: the tracking server {uri} cannot be reached; start it, or unset "
                              f"MLFLOW_TRACKING_URI to log into the run folder")


def metrics_of(row: dict) -> dict:
    """The row's finite numbers, but its step and settings."""
    out = {}
    for key, value in row.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoard:
    def __init__(self, folder: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))

    def log(self, rows: list):
        for row in rows:
            for key, value in metrics_of(row).items():
                self.writer.add_scalar(f"{row['run_id']}/{key}", value, int(row["step"]))
        self.writer.flush()

    def close(self):
        self.writer.close()


class Wandb:
    """One wandb run per zoflat run (named <folder>/<run_id>, grouped by folder), so that each
    has its own monotonic step; metric names as in metrics.csv."""

    def __init__(self, folder: Path, config: dict):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb, self.folder, self.config, self.runs = wandb, folder, config, {}

    def _run(self, row: dict):
        run_id = row["run_id"]
        if run_id not in self.runs:
            settings = {k: row[k] for k in RUN_COLUMNS if k in row}
            self.runs[run_id] = self.wandb.init(
                project=os.environ.get("WANDB_PROJECT", f"zoflat-{self.config['command']}"),
                name=f"{self.folder.name}/{run_id}", group=self.folder.name, dir=str(self.folder),
                config={**self.config, **settings}, mode=os.environ.get("WANDB_MODE", "offline"),
                reinit="create_new")
        return self.runs[run_id]

    def log(self, rows: list):
        for row in rows:
            self._run(row).log(metrics_of(row), step=int(row["step"]))

    def close(self):
        for run in self.runs.values():
            run.finish()


class MLflow:
    def __init__(self, folder: Path, config: dict):
        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a file store in the run folder: no server, no database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((folder / "mlruns").resolve().as_uri())
        mlflow.set_experiment(f"zoflat-{config['command']}")
        self.run = mlflow.start_run(run_name=folder.name)
        mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    def log(self, rows: list):
        for row in rows:
            metrics = {f"{row['run_id']}/{k}": v for k, v in metrics_of(row).items()}
            self.mlflow.log_metrics(metrics, step=int(row["step"]))

    def close(self):
        self.mlflow.end_run()


def open_tracker(kind, folder: Path, config: dict):
    """The tracker of a run folder, or None."""
    if not kind:
        return None
    return {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": MLflow}[kind](Path(folder), config)
