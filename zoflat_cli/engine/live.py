"""What a run shows while it trains: a Rich live table on a terminal, plain lines otherwise.

The table fits the terminal: every run (queued ones too) is a row; columns are kept by priority
(run, step, status, the loss, the test metric and the Hessian trace first; then speed, ETA, the
other metrics) and the lowest go when the width runs out, never a column of `…`. A long run id is
shortened in its middle. A metric not evaluated at the last logged step shows its last value with
the step it is from (`0.6931@200`). Under the table: the invocation's elapsed time, its ETA and what
is happening now (`step 200: Hessian trace, probe 3/10: train 2/4`, `checkpointing`, `training`).
"""

import time

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from zoflat_cli.output import say
from zoflat_cli.runs.spec import RUN_COLUMNS

PLAIN_EVERY_S = 10.0  # plain mode prints a block of lines at most this often
HIDDEN = {*RUN_COLUMNS, "wall_s", "n_evals", "forward_passes"}
FIRST = ("loss", "test_accuracy", "test_f1", "test_em", "hessian_trace")  # kept longest after run/step/status
STYLES = {"diverged": "red", "interrupted": "yellow", "completed": "green", "failed": "red", "queued": "dim"}


def _fmt(value) -> str:
    """A compact number: 4 significant digits (0.6931, 1.2e-05, 7.906e+04)."""
    if value is None:  # not evaluated at this step
        return "·"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def duration(seconds) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def shorten(text: str, width: int) -> str:
    """text in at most `width` characters, cut in the middle (a run id keeps its optimizer and seed)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


class LiveView:
    """on_log(step, rows, states) after each logged step; `states` ({run_id: RunState}): every run,
    listed from the start; `sequential`: runs train one after another (the model runner), else all at
    once (the batched runner), which decides the invocation's ETA."""

    def __init__(self, title: str, steps: int, quiet: bool = False, console: Console = None,
                 sequential: bool = False, states: dict = None):
        self.console = console or Console(stderr=False)
        self.mode = "quiet" if quiet else ("live" if self.console.is_terminal else "plain")
        self.title, self.steps, self.sequential = title, steps, sequential
        self.latest, self.states, self.carried = {}, states or {}, {}  # carried: run -> metric -> (value, step)
        self.first = {}  # run -> (step, wall_s) first seen in this process: speed counts this process's steps
        self.began = time.monotonic()
        self.now = None  # what a run's logged step is doing (activity), None: training
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
            run_id = row["run_id"]
            self.latest[run_id] = row
            self.first.setdefault(run_id, (row["step"], row["wall_s"]))
            carried = self.carried.setdefault(run_id, {})
            for name in self._metric_names(row):
                if row[name] is not None:
                    carried[name] = (row[name], row["step"])
        self.states = states
        if self.mode == "plain" and time.monotonic() - self._last_plain >= PLAIN_EVERY_S:
            self._print_plain()

    def activity(self, text):
        """What is happening now (`step 200: evaluating: test 3/20`; None: training), on the status line."""
        self.now = text

    def _metric_names(self, row):
        return [k for k in row if k not in HIDDEN and k != "step"]

    def rate(self, run_id) -> float:
        """Steps per second of this run in this process (0 before its second log)."""
        if run_id not in self.latest:
            return 0.0
        row, (step0, wall0) = self.latest[run_id], self.first[run_id]
        spent = (row["wall_s"] or 0) - (wall0 or 0)
        return (row["step"] - step0) / spent if spent > 0 else 0.0

    def eta(self, run_id):
        """Seconds a running run has left (None: not known yet)."""
        row, rate = self.latest.get(run_id), self.rate(run_id)
        return (self.steps - row["step"]) / rate if row and rate > 0 else None

    def invocation_eta(self):
        """Seconds until every run is done: queued runs of a sequential runner take as long as the
        last measured run's whole length."""
        running = [r for r, s in self.states.items() if s.status == "running"]
        queued = [r for r, s in self.states.items() if s.status == "queued"]
        etas = [self.eta(r) for r in running]
        if None in etas:
            return None
        if not self.sequential or not queued:
            return (sum(etas) if self.sequential else max(etas, default=0.0))
        rate = next((self.rate(r) for r in reversed(list(self.latest)) if self.rate(r) > 0), 0.0)
        return sum(etas) + len(queued) * self.steps / rate if rate else None

    def _cell(self, run_id, name) -> str:
        row = self.latest[run_id]
        if row.get(name) is not None:
            return _fmt(row[name])
        value = self.carried.get(run_id, {}).get(name)
        return f"{_fmt(value[0])}@{value[1]}" if value else "·"

    def _print_plain(self):
        self._last_plain = time.monotonic()
        for run_id, row in self.latest.items():
            metrics = " ".join(f"{k}={_fmt(row[k])}" for k in self._metric_names(row))
            status = self.states[run_id].status
            if not say(f"[{row['step']}/{self.steps}] {run_id} {status} {metrics} ({self.rate(run_id):.3g} steps/s)"):
                self.mode = "quiet"
                return

    def columns(self) -> dict:
        """{header: [cell per run]} of every column, in priority order (run, step, status first)."""
        runs = list(self.states) or list(self.latest)
        names = list(dict.fromkeys(n for r in self.latest.values() for n in self._metric_names(r)))
        names = [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]
        seen = [r in self.latest for r in runs]
        cols = {"run": runs,
                "step": [f"{self.latest[r]['step']}/{self.steps}" if s else f"0/{self.steps}" for r, s in zip(runs, seen)],
                "status": [self.states[r].status if r in self.states else "running" for r in runs]}
        for i, name in enumerate(names):
            if i == 3:  # speed and ETA after the first three metrics
                cols.update(self._timing(runs, seen))
            cols[name.replace("_", " ")] = [self._cell(r, name) if s else "" for r, s in zip(runs, seen)]
        if len(names) <= 3:
            cols.update(self._timing(runs, seen))
        return cols

    def _timing(self, runs, seen) -> dict:
        return {"steps/s": [f"{self.rate(r):.3g}" if s else "" for r, s in zip(runs, seen)],
                "ETA": [duration(self.eta(r)) if self.states.get(r) and self.states[r].status == "running" else ""
                        for r in runs]}

    def fit(self, width: int) -> dict:
        """The columns that fit `width` characters: the lowest-priority columns go down to run, step,
        status and two metrics, then the run id is shortened (to 20), then more columns go."""
        cols = self.columns()
        need = {h: max([len(h), *(len(c) for c in cells)]) for h, cells in cols.items()}
        padding = 3  # a column's separator and padding in box.SIMPLE_HEAD

        def over(keys):
            return sum(need[k] + padding for k in keys) - width

        keys = list(cols)
        for floor, run_width in ((5, 20), (3, 10)):
            while len(keys) > floor and over(keys) > 0:
                keys.pop()  # the lowest priority goes
            if over(keys) > 0:
                need["run"] = max(run_width, need["run"] - over(keys))
        cols["run"] = [shorten(r, need["run"]) for r in cols["run"]]
        return {k: (cols[k], need[k]) for k in keys}

    def __rich__(self):
        width = self.console.width
        table = Table(expand=False, box=box.SIMPLE_HEAD, pad_edge=False)
        fitted = self.fit(width)
        for header, (_, size) in fitted.items():
            table.add_column(header, justify="left" if header in ("run", "status") else "right", no_wrap=True,
                             min_width=size, max_width=size, overflow="crop")
        for i in range(len(next(iter(fitted.values()))[0]) if fitted else 0):
            status = fitted["status"][0][i]
            table.add_row(*(cells[i] for cells, _ in fitted.values()), style=STYLES.get(status))
        line = (f"elapsed {duration(time.monotonic() - self.began)} · ETA {duration(self.invocation_eta())} · "
                f"{self.now or 'training'}")
        return Group(Text(shorten(self.title, width), style="bold"), table, Text(shorten(line, width), style="dim"))
