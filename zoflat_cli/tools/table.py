"""`zoflat table`: the paper-style results table of run folders or sweep folders.

Each run contributes one value per metric: its last logged value (`--at final`), its best over
the run (`--at best`: the lowest, or the highest for accuracy, F1 and EM), or its value at a step.
Runs are grouped by `--by` (settings columns of metrics.csv, or config keys such as task, model,
dataset); each cell is mean ± standard deviation over the group's runs (its seeds), with n. The
best cell of each metric column is marked (bold in markdown and LaTeX, a `best` column in csv).
"""

import io
import math
from pathlib import Path

import pandas as pd
import yaml

from zoflat_cli.errors import ZoflatError
from zoflat_cli.runs.folder import complete_metrics, read_summary
from zoflat_cli.tools.plot import find_run_folders

FORMATS = ("markdown", "csv", "latex")
HIGHER_IS_BETTER = ("accuracy", "f1", "em")  # metric names ending so; the rest: lower is better
DEFAULT_BY = ("optimizer", "lambda", "lr")


def higher_is_better(metric: str) -> bool:
    return metric.endswith(HIGHER_IS_BETTER)


def _config(folder: Path) -> dict:
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        config = None
    return config if isinstance(config, dict) else {}


def load_runs(paths) -> tuple:
    """(command, one frame of every logged row of every run folder, with the config keys added)."""
    frames, commands = [], set()
    for folder in find_run_folders(paths):
        text = complete_metrics(folder)
        if text.count("\n") < 2:
            continue  # a folder with no rows yet: nothing to tabulate
        frame = pd.read_csv(io.StringIO(text))
        config = _config(folder)
        commands.add(read_summary(folder).get("command") or config.get("command"))
        for key in ("task", "model", "dataset", "k", "features"):
            if key in config and key not in frame.columns:
                frame[key] = config[key]
        frame["folder"] = str(folder)
        frames.append(frame)
    if not frames:
        raise ZoflatError("no logged runs under " + ", ".join(map(str, paths)))
    if len(commands) > 1:
        raise ZoflatError(f"these folders mix commands ({', '.join(sorted(map(str, commands)))}): tabulate one "
                          f"command at a time")
    return commands.pop(), pd.concat(frames, ignore_index=True)


def run_values(rows: pd.DataFrame, metrics: list, at: str) -> pd.DataFrame:
    """One row per run (folder, run_id): each metric's value at --at, and the run's settings."""
    out = []
    for (_, run_id), run in rows.groupby(["folder", "run_id"], sort=False):
        run = run.sort_values("step")
        entry = run.iloc[0].to_dict()
        for metric in metrics:
            logged = run.dropna(subset=[metric])
            values = pd.to_numeric(logged[metric], errors="coerce")
            if at == "final":
                entry[metric] = values.iloc[-1] if len(values) else math.nan
            elif at == "best":
                entry[metric] = values.max() if higher_is_better(metric) else values.min()
            else:
                at_step = values[logged["step"] == int(at)]
                if at_step.empty:
                    raise ZoflatError(f"run {run_id} logged no {metric} at step {at} (--at final or best, or a "
                                      f"logged step)")
                entry[metric] = at_step.iloc[0]
        out.append(entry)
    return pd.DataFrame(out)


def summarise(runs: pd.DataFrame, metrics: list, by: list) -> pd.DataFrame:
    """mean, std and n of each metric per group, groups in first-seen order."""
    grouped = runs.groupby(by, sort=False, dropna=False)
    table = grouped[metrics].agg(["mean", "std", "count"])
    table.columns = [f"{m}_{stat.replace('count', 'n')}" for m, stat in table.columns]
    return table.reset_index()


def best_rows(table: pd.DataFrame, metrics: list) -> dict:
    """metric -> the index of its best mean (ties: the first)."""
    best = {}
    for metric in metrics:
        means = table[f"{metric}_mean"]
        if means.notna().any():
            best[metric] = means.idxmax() if higher_is_better(metric) else means.idxmin()
    return best


def _number(value) -> str:
    return "—" if pd.isna(value) else f"{value:.4g}"


def _cell(table, row, metric) -> str:
    mean, std, n = (table.at[row, f"{metric}_{s}"] for s in ("mean", "std", "n"))
    spread = "" if pd.isna(std) else f" ± {_number(std)}"
    return f"{_number(mean)}{spread} ({int(n)})"


def render(table: pd.DataFrame, metrics: list, by: list, fmt: str) -> str:
    best = best_rows(table, metrics)
    if fmt == "csv":
        out = table.copy()
        for metric in metrics:
            out[f"{metric}_best"] = [i == best.get(metric) for i in out.index]
        return out.to_csv(index=False)
    header = [*by, *metrics]
    lines = []
    for row in table.index:
        cells = [str(table.at[row, key]) for key in by]
        for metric in metrics:
            cell = _cell(table, row, metric)
            if best.get(metric) == row:
                cell = f"**{cell}**" if fmt == "markdown" else f"\\textbf{{{cell}}}"
            cells.append(cell)
        lines.append(cells)
    if fmt == "markdown":
        rows = [header, ["---"] * len(header), *lines]
        return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"

    def tex(text: str) -> str:
        return text.replace("_", "\\_").replace("±", "$\\pm$").replace("—", "--")
    body = [" & ".join(tex(c) for c in r) + " \\\\" for r in lines]
    return "\n".join(["\\begin{tabular}{" + "l" * len(by) + "r" * len(metrics) + "}", "\\toprule",
                      " & ".join(tex(h) for h in header) + " \\\\", "\\midrule", *body, "\\bottomrule",
                      "\\end{tabular}"]) + "\n"


def make_table(paths, metrics=None, at: str = "final", by=None, fmt: str = "markdown") -> str:
    if fmt not in FORMATS:
        raise ZoflatError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if at not in ("final", "best") and not str(at).isdigit():
        raise ZoflatError(f"--at must be final, best or a step number, got {at!r}")
    _command, rows = load_runs(paths)
    by = list(by or [k for k in DEFAULT_BY if k in rows.columns])
    unknown = [k for k in by if k not in rows.columns]
    if unknown:
        raise ZoflatError(f"--by {unknown[0]}: not a column of these runs (have: "
                          f"{', '.join(c for c in rows.columns if c != 'folder')})")
    numeric = [c for c in rows.columns if c not in by and c not in ("run_id", "folder", "step", "seed") and
               pd.to_numeric(rows[c], errors="coerce").notna().any()]
    metrics = list(metrics or [m for m in ("loss", "test_accuracy", "test_f1", "hessian_trace") if m in rows.columns]
                   or numeric[:3])
    missing = [m for m in metrics if m not in rows.columns]
    if missing:
        raise ZoflatError(f"--metric {missing[0]}: not a column of these runs (have: {', '.join(numeric)})")
    return render(summarise(run_values(rows, metrics, at), metrics, by), metrics, by, fmt)
