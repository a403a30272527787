"""`zoflat table`: the paper-style results table of run folders or sweep folders.

Each run contributes one value per metric: its last logged value (`--at final`), its best over
the run (`--at best`: the lowest, or the highest for accuracy, F1 and EM), or its value at a step.
Only like is compared with like: by default runs are grouped by every setting that differs among
them (the run's columns of metrics.csv: optimizer, update, direction law, hyperparameters, lr,
samples; and every config key: steps, task, model, dataset, dim, ...), so a group holds a setting's
seeds only. `--by` picks the grouping instead (any of those columns or config keys); a setting that
then differs within a group is pooled, and a note says which. Each cell is mean ± standard deviation
over the group's runs, with n. The best cell of each metric column is marked (bold in markdown and
LaTeX, a `best` column in csv) among the rows of the same task, model and data set only.
"""

import io
import math
from pathlib import Path

import pandas as pd
import yaml

from zoflat_cli.errors import ZoflatError
from zoflat_cli.runs.folder import complete_metrics, read_summary
from zoflat_cli.runs.spec import RUN_COLUMNS
from zoflat_cli.tools.plot import find_run_folders

FORMATS = ("markdown", "csv", "latex")
HIGHER_IS_BETTER = ("accuracy", "f1", "em")  # metric names ending so; the rest: lower is better
# config keys that do not change what a run computes (where it is written, how often it logs or is
# measured, memory): never a reason to keep runs apart
NOT_SETTINGS = ("command", "out", "name", "logger", "log_every", "checkpoint_every", "device", "device_map",
                "measure_every", "measures", "eval_every", "trace_every", "trace_probes", "eig_every", "eig_iters",
                "micro_batch")
CONTEXT = ("task", "model", "dataset", "data_file")  # "best" is marked within each of these only


def higher_is_better(metric: str) -> bool:
    return metric.endswith(HIGHER_IS_BETTER)


def _config(folder: Path) -> dict:
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        config = None
    return config if isinstance(config, dict) else {}


def load_runs(paths) -> tuple:
    """(command, one frame of every logged row of every run folder with the config's single values
    added, the settings: the run's columns of metrics.csv and those config keys)."""
    frames, commands, config_keys = [], set(), {}
    for folder in find_run_folders(paths):
        text = complete_metrics(folder)
        if text.count("\n") < 2:
            continue  # a folder with no rows yet: nothing to tabulate
        frame = pd.read_csv(io.StringIO(text))
        config = _config(folder)
        commands.add(read_summary(folder).get("command") or config.get("command"))
        for key, value in config.items():  # the config's single values: steps, task, model, dim, ...
            if key not in frame.columns and not isinstance(value, (dict, list)):
                frame[key] = value
                config_keys[key] = None
        frame["folder"] = str(folder)
        frames.append(frame)
    if not frames:
        raise ZoflatError("no logged runs under " + ", ".join(map(str, paths)))
    if len(commands) > 1:
        raise ZoflatError(f"these folders mix commands ({', '.join(sorted(map(str, commands)))}): tabulate one "
                          f"command at a time")
    rows = pd.concat(frames, ignore_index=True)
    settings = [c for c in (*RUN_COLUMNS, *config_keys) if c in rows.columns and c not in ("run_id", "seed")
                and c not in NOT_SETTINGS]
    return commands.pop(), rows, settings


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


def differing(runs: pd.DataFrame, columns: list) -> list:
    return [c for c in columns if runs[c].astype(str).nunique() > 1]


def pooled(runs: pd.DataFrame, by: list, settings: list) -> dict:
    """{setting: its values} of the settings not in `by` that differ within some group."""
    found = {}
    for column in settings:
        if column in by:
            continue
        spread = runs.groupby(by, sort=False, dropna=False)[column].agg(lambda v: v.astype(str).nunique())
        if (spread > 1).any():
            found[column] = list(dict.fromkeys(_number(v) for v in runs[column].dropna()))
    return found


def summarise(runs: pd.DataFrame, metrics: list, by: list) -> pd.DataFrame:
    """mean, std and n of each metric per group, groups in first-seen order."""
    grouped = runs.groupby(by, sort=False, dropna=False)
    table = grouped[metrics].agg(["mean", "std", "count"])
    table.columns = [f"{m}_{stat.replace('count', 'n')}" for m, stat in table.columns]
    return table.reset_index()


def best_rows(table: pd.DataFrame, metrics: list, by: list) -> dict:
    """metric -> the indices of its best mean (ties: the first) within each block of rows of one task,
    model and data set."""
    blocks = [c for c in CONTEXT if c in by]
    groups = [part.index for _, part in table.groupby(blocks, sort=False, dropna=False)] if blocks else [table.index]
    best = {metric: set() for metric in metrics}
    for index in groups:
        for metric in metrics:
            means = table.loc[index, f"{metric}_mean"]
            if means.notna().any():
                best[metric].add(means.idxmax() if higher_is_better(metric) else means.idxmin())
    return best


def _number(value) -> str:
    """4 significant digits for numbers (an lr of 1e-4, not 9.999999999999998e-05), — where unset."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(table, row, metric) -> str:
    mean, std, n = (table.at[row, f"{metric}_{s}"] for s in ("mean", "std", "n"))
    spread = "" if pd.isna(std) else f" ± {_number(std)}"
    return f"{_number(mean)}{spread} ({int(n)})"


def render(table: pd.DataFrame, metrics: list, by: list, fmt: str) -> str:
    best = best_rows(table, metrics, by)
    if fmt == "csv":
        out = table.copy()
        for metric in metrics:
            out[f"{metric}_best"] = [i in best[metric] for i in out.index]
        return out.to_csv(index=False)
    header = [*by, *metrics]
    lines = []
    for row in table.index:
        cells = [_number(table.at[row, key]) for key in by]
        for metric in metrics:
            cell = _cell(table, row, metric)
            if row in best[metric]:
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


def make_table(paths, metrics=None, at: str = "final", by=None, fmt: str = "markdown") -> tuple:
    """(the table's text, notes: what was pooled)."""
    if fmt not in FORMATS:
        raise ZoflatError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if at not in ("final", "best") and not str(at).isdigit():
        raise ZoflatError(f"--at must be final, best or a step number, got {at!r}")
    _command, rows, settings = load_runs(paths)
    unknown = [k for k in by or [] if k not in rows.columns]
    if unknown:
        raise ZoflatError(f"--by {unknown[0]}: not a column of these runs (have: "
                          f"{', '.join(c for c in rows.columns if c != 'folder')})")
    numeric = [c for c in rows.columns if c not in (*settings, "run_id", "folder", "step", "seed") and
               pd.to_numeric(rows[c], errors="coerce").notna().any()]
    metrics = list(metrics or [m for m in ("loss", "test_accuracy", "test_f1", "hessian_trace") if m in rows.columns]
                   or numeric[:3])
    missing = [m for m in metrics if m not in rows.columns]
    if missing:
        raise ZoflatError(f"--metric {missing[0]}: not a column of these runs (have: {', '.join(numeric)})")
    runs = run_values(rows, metrics, at)
    identity = [*settings, "seed"]
    repeated = runs.astype({c: str for c in identity}).duplicated(subset=identity)  # the same run in two folders
    notes = [f"{int(repeated.sum())} runs repeat the settings and seed of a run in another folder: counted once"
             ] if repeated.any() else []
    runs = runs[~repeated.to_numpy()]
    by = list(by or ["optimizer", *(c for c in differing(runs, settings) if c != "optimizer")])
    notes += [f"pooled within a row: {key} ({', '.join(values)}); add it to --by to keep them apart"
              for key, values in pooled(runs, by, settings).items()]
    return render(summarise(runs, metrics, by), metrics, by, fmt), notes
