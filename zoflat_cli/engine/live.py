"""What a run shows while it trains: a Rich live table on a terminal, plain lines otherwise."""

import os
import sys
import time

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from zoflat_cli.runs.spec import RUN_COLUMNS

PLAIN_EVERY_S = 10.0  # plain mode prints a block of lines at most this often
HIDDEN = {*RUN_COLUMNS, "wall_s", "n_evals"}


def say(text: str, err: bool = False) -> bool:
    """Print a line; a closed stdout (`zoflat ... | head -1`) silences further output instead of
    stopping the run. Returns whether the line went out."""
    stream = sys.stderr if err else sys.stdout
    try:
        print(text, file=stream, flush=True)
        return True
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # so that the interpreter's last flush cannot fail
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
        return False


def _fmt(value) -> str:
    if value is None:  # not evaluated at this step
        return "·"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class LiveView:
    def __init__(self, title: str, steps: int, quiet: bool = False, console: Console = None):
        self.console = console or Console(stderr=False)
        self.mode = "quiet" if quiet else ("live" if self.console.is_terminal else "plain")
        self.title, self.steps = title, steps
        self.latest, self.states = {}, {}
        self._live = None
        self._last_plain = -PLAIN_EVERY_S

    def __enter__(self):
        if self.mode == "live":
            self._live = Live(self, console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(*exc)
        elif self.mode == "plain" and self.latest:
            self._print_plain()
        return False

    def on_log(self, step: int, rows: list, states: dict):
        for row in rows:
            self.latest[row["run_id"]] = row
        self.states = states
        if self.mode == "plain" and time.monotonic() - self._last_plain >= PLAIN_EVERY_S:
            self._print_plain()

    def _metric_names(self, row):
        return [k for k in row if k not in HIDDEN and k != "step"]

    def _print_plain(self):
        self._last_plain = time.monotonic()
        for run_id, row in self.latest.items():
            metrics = " ".join(f"{k}={_fmt(row[k])}" for k in self._metric_names(row))
            rate = row["step"] / row["wall_s"] if row["wall_s"] > 0 else 0.0
            status = self.states[run_id].status
            if not say(f"[{row['step']}/{self.steps}] {run_id} {status} {metrics} ({rate:.0f} steps/s)"):
                self.mode = "quiet"
                return

    def __rich__(self) -> Table:
        table = Table(title=self.title, expand=False, box=box.SIMPLE_HEAD)
        rows = list(self.latest.values())
        names = self._metric_names(rows[0]) if rows else []
        table.add_column("run", no_wrap=True, min_width=max((len(r["run_id"]) for r in rows), default=3))
        for col in ["step", *names, "steps/s", "status"]:
            table.add_column(col.replace("_", " "), justify="left" if col == "status" else "right")
        for row in rows:
            rate = row["step"] / row["wall_s"] if row["wall_s"] > 0 else 0.0
            status = self.states[row["run_id"]].status
            style = {"diverged": "red", "interrupted": "yellow", "completed": "green"}.get(status)
            table.add_row(row["run_id"], f"{row['step']}/{self.steps}",
                          *[_fmt(row[n]) for n in names], f"{rate:.0f}", status, style=style)
        return table
