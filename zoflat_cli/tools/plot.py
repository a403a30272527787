"""`zoflat plot`: paper-style figures from run folders, one panel per metric against step."""

import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from zoflat_cli.errors import ZoflatError  # noqa: E402
from zoflat_cli.measures.spectrum import density  # noqa: E402
from zoflat_cli.runs.folder import complete_metrics, read_summary  # noqa: E402
from zoflat_cli.runs.spec import NOT_METRICS  # noqa: E402
from zoflat_cli.optim.presets import HYPERPARAMETERS, PRESETS  # noqa: E402

REQUIRED_COLUMNS = ["run_id", "optimizer", "lr", "seed", "samples"]  # also in older folders
NOT_PLOTTED = NOT_METRICS | {"wall_s", "n_evals"}
FORMATS = ("png", "pdf")
PANELS_PER_ROW = 3


def find_run_folders(paths) -> list:
    folders = []
    for path in map(Path, paths):
        if not path.exists():
            raise ZoflatError(f"no such folder: {path}")
        path = path.resolve()  # "." is named after the folder it is
        found = [path] if (path / "metrics.csv").is_file() else _walk(path)
        if not found:
            raise ZoflatError(f"no run folders (with metrics.csv) under {path}")
        folders.extend(found)
    return list(dict.fromkeys(folders))


def _walk(root: Path) -> list:
    """The run folders under root, following symbolic links (each real folder once, loops cut)."""
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up, or a second link to the same folder
            subfolders[:] = []
            continue
        seen.add(real)
        if "metrics.csv" in files:
            found.append(Path(real))
        subfolders.sort()
    return sorted(found)


def method_label(row) -> str:
    parts = [row["optimizer"]]
    preset = PRESETS.get(row["optimizer"])
    if pd.notna(row.get("directions")) and row["directions"] != (preset.law if preset else "gaussian"):
        parts.append(row["directions"])
    if pd.notna(row.get("update")) and preset is not None and row["update"] != preset.update:
        parts.append(row["update"])
    for name, hyper in HYPERPARAMETERS.items():
        if pd.notna(row.get(name)) and (row[name] or not hyper.optional):
            parts.append(f"{hyper.symbol}={row[name]:g}")
    parts.append(f"lr={row['lr']:g}")
    if row.get("samples", 1) != 1:
        parts.append(f"n={row['samples']:g}")
    return " ".join(parts)


def y_scale(values: pd.Series, reference=None) -> tuple:
    """("linear" | "log" | "symlog", linthresh): log for metrics whose positive values span more than
    ~1.3 decades; symlog (linear below the smallest positive value) when zeros or a few small negative
    estimates (a λ_max) are among them, so they are drawn, not dropped. A signed metric (negatives
    beyond a tenth of the largest value: the toy's balance) stays linear."""
    finite = values[pd.notna(values) & (values.abs() != float("inf"))]
    if reference is not None:
        finite = pd.concat([finite, pd.Series([reference])])
    positive = finite[finite > 0]
    if len(positive) == 0 or positive.max() / positive.min() <= 20 or -finite.min() > 0.1 * positive.max():
        return "linear", None
    return ("log", None) if (finite > 0).all() else ("symlog", float(positive.min()))


def set_scale(ax, values: pd.Series, reference=None) -> str:
    """Sets the panel's y scale; returns what the title should say of it."""
    kind, linthresh = y_scale(values, reference)
    if kind == "symlog":
        ax.set_yscale("symlog", linthresh=linthresh)
        if values.min() >= 0:  # zeros, no negatives: the axis starts at 0
            ax.set_ylim(bottom=0)
        return f" (symlog: linear below {linthresh:.2g})"
    ax.set_yscale(kind)
    return ""


def read_frame(folder: Path) -> tuple:
    """(metrics as a frame with numeric columns, summary) of one run folder."""
    text = complete_metrics(folder)  # a torn last row is left out
    df = pd.read_csv(io.StringIO(text)) if text.count("\n") > 1 else pd.DataFrame()
    if df.empty or not set(REQUIRED_COLUMNS) <= set(df.columns):
        raise ZoflatError(f"{folder / 'metrics.csv'} has no rows or is not a zoflat metrics file")
    for column in df.columns:  # a cell that is not a number is a gap in its line, not an error
        if column not in ("run_id", "optimizer", "update", "directions"):
            df[column] = pd.to_numeric(df[column], errors="coerce")
    return df, read_summary(folder)


X_AXES = {"step": "step", "n_evals": "oracle calls (losses, gradients or JVPs)", "wall_s": "wall time (s)",
          "forward_passes": "forward passes (training-set units)"}
BANDS = {"std": "mean ± std over seeds (within their range)",
         "ci": "mean and 95% confidence interval over seeds (t, within their range)",
         "minmax": "mean, band min–max over seeds", "none": "mean over seeds"}
SPARSE = 30  # series with fewer points get markers


def plot_run(folder: Path, out_dir: Path = None, stem: str = None, x: str = "step", band: str = "std") -> list:
    """The figure of one run folder, as <folder>/figure.* or <out_dir>/<stem>.*."""
    df, summary = read_frame(folder)
    return _save(figure(df, summary, run_title(folder, summary), x, band), out_dir or folder,
                       "figure" if out_dir is None else stem or folder.name)


def plot_sweep(folder: Path, out_dir: Path = None, stem: str = None, x: str = "step", band: str = "std") -> list:
    """One figure of a sweep folder: every job's runs together, as if launched in one invocation."""
    frames = [read_frame(job) for job in find_run_folders([folder / "jobs"])]
    df = pd.concat([f for f, _ in frames], ignore_index=True)
    summary = frames[0][1]
    title = f"zoflat sweep of {summary.get('command', '')}: {folder.name}"
    return _save(figure(df, summary, title, x, band), out_dir or folder,
                       "figure" if out_dir is None else stem or folder.name)


def plot_overlay(folders: list, out_dir: Path, x: str = "step", band: str = "std") -> list:
    """One figure of the runs of several folders, each method's label prefixed by its folder's."""
    frames, commands = [], set()
    for folder in folders:
        df, summary = read_frame(folder)
        df["source"] = folder.name
        frames.append((df, summary))
        commands.add(summary.get("command"))
    if len(commands) > 1:
        raise ZoflatError(f"--overlay: these folders mix commands ({', '.join(sorted(map(str, commands)))})")
    df = pd.concat([f for f, _ in frames], ignore_index=True)
    panels = list(dict.fromkeys(m for _, summary in frames for m in summary.get("panels") or []))
    summary = {**frames[0][1], "panels": panels or None}
    title = f"zoflat {summary.get('command', '')}: {len(folders)} run folders overlaid"
    return _save(figure(df, summary, title, x, band), out_dir, "overlay")


def run_title(folder: Path, summary: dict) -> str:
    return f"zoflat {summary.get('command', '')}: {folder.name}"


def check_axes(x: str, band: str):
    if x not in X_AXES:
        raise ZoflatError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    if band not in BANDS:
        raise ZoflatError(f"--band must be one of {', '.join(BANDS)}, got {band!r}")


def spread(values, band: str) -> tuple:
    """(low, high) of the band around the per-step mean, or None; std and ci bands are clipped to the
    seeds' own range (a loss's mean − std below its smallest value says nothing)."""
    if band == "none":
        return None
    stats = values.agg(["mean", "std", "count", "min", "max"])
    if band == "minmax":
        return stats["min"], stats["max"]
    if band == "std":
        half = stats["std"]
    else:
        from scipy.stats import t

        half = stats["std"] / np.sqrt(stats["count"]) * t.ppf(0.975, np.maximum(stats["count"] - 1, 1))
    return (stats["mean"] - half).clip(lower=stats["min"]), (stats["mean"] + half).clip(upper=stats["max"])


def figure(df: pd.DataFrame, summary: dict, title: str, x: str = "step", band: str = "std"):
    """The paper-style figure of a frame of runs: a panel per metric against `x`, a line per method
    (its mean over seeds, with `band`), theory dashed, reference lines dotted, the legend below the
    panels (outside them) in as many columns as fit."""
    check_axes(x, band)
    if x not in df.columns or df[x].isna().all():
        raise ZoflatError(f"--x {x}: these runs did not log it (have: "
                          f"{', '.join(a for a in X_AXES if a in df.columns)})")
    metrics = [m for m in summary.get("panels") or df.columns
               if m in df.columns and m not in NOT_PLOTTED and not m.endswith(("_theory", "_stderr"))
               and pd.api.types.is_numeric_dtype(df[m])]
    if not metrics:
        raise ZoflatError("no metric columns to plot")
    df = df.copy()
    df["method"] = df.apply(method_label, axis=1)
    if "source" in df.columns:
        df["method"] = df["source"] + ": " + df["method"]
    methods = list(dict.fromkeys(df["method"]))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    seeds = df.groupby("method")["seed"].nunique()
    n_rows, n_cols = -(-len(metrics) // PANELS_PER_ROW), min(len(metrics), PANELS_PER_ROW)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.6 * n_cols, 3.4 * n_rows + 1.0), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    drawn = set()
    for ax, metric in zip(axes.flat, metrics):
        for method in methods:
            per_step = df[df["method"] == method].dropna(subset=[metric]).groupby("step")
            if not len(per_step):
                continue
            means, xs = per_step[metric].mean(), per_step[x].mean()
            n_seeds = int(seeds[method])
            ax.plot(xs, means, color=colours[method], lw=1.5, marker="o" if len(means) < SPARSE else None, ms=3,
                    label=f"{method} ({n_seeds} seed{'s' if n_seeds > 1 else ''})")
            bounds = spread(per_step[metric], band) if n_seeds > 1 else None
            if bounds is not None:
                ax.fill_between(xs, bounds[0], bounds[1], color=colours[method], alpha=0.2, lw=0)
                drawn.add("band")
            elif f"{metric}_stderr" in df.columns and per_step[f"{metric}_stderr"].mean().notna().any():
                ax.errorbar(xs, means, yerr=per_step[f"{metric}_stderr"].mean(), color=colours[method],
                            fmt="none", capsize=2, lw=0.8)  # an estimate: ± one standard error
                drawn.add("stderr")
            theory = f"{metric}_theory"
            predicted = per_step[theory].mean() if theory in df.columns else None
            if predicted is not None and predicted.notna().any():  # NaN: no theory for this method
                ax.plot(xs, predicted, color=colours[method], ls="--", lw=1, label=f"{method}: theory")
        ref = summary.get("references", {}).get(metric)
        if ref:
            ax.axhline(ref["value"], color="0.3", ls=":", lw=1, label=ref["label"])
        scale = set_scale(ax, df[metric], ref["value"] if ref else None)
        ax.set_title(metric.replace("_", " ") + scale, fontsize=10)
        ax.set_xlabel(X_AXES[x])
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    longest = max(map(len, handles), default=1)
    columns = max(1, min(len(handles), int(4.6 * n_cols * 13 / (longest + 5))))  # ~13 characters an inch at 8 pt
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=columns, fontsize=8, frameon=False)
    what = [BANDS[band] if "band" in drawn else "mean over seeds" if seeds.max() > 1 else "one seed a line"]
    if "stderr" in drawn:
        what.append("bars: ± standard error of an estimate")
    fig.suptitle(f"{title}\n{'; '.join(what)}", fontsize=10)
    return fig


def find_sweep_folders(paths) -> list:
    """The sweep folders (with sweep.yaml) at or below the paths."""
    found = []
    for path in map(Path, paths):
        for folder, subfolders, files in os.walk(path, followlinks=True) if path.is_dir() else ():
            if "sweep.yaml" in files:
                found.append(Path(folder).resolve())
                subfolders[:] = []  # its jobs are drawn with it
            subfolders.sort()
    return list(dict.fromkeys(found))


def plot_paths(paths, out: Path = None, x: str = "step", band: str = "std", overlay: bool = False) -> list:
    """A figure per run folder and one per sweep folder (not one per job) found at or below the paths;
    with `overlay`, one figure of every run folder's runs (in --out, default the current folder)."""
    check_axes(x, band)
    sweeps = find_sweep_folders(paths)
    runs = [f for f in find_run_folders(paths) if not any(s in f.parents for s in sweeps)]
    if overlay:
        if sweeps:
            raise ZoflatError("--overlay draws run folders; give a sweep's jobs/ folder instead of the sweep")
        return plot_overlay(runs, Path(out) if out else Path.cwd(), x, band)
    written, stems = [], set()
    for folder in sweeps + runs:
        # same-named folders under different parents: one figure each, never one over another
        base = folder.name if folder.name not in stems else f"{folder.parent.name}-{folder.name}"
        stem, n = base, 2
        while stem in stems:
            stem, n = f"{base}-{n}", n + 1
        stems.add(stem)
        written.extend((plot_sweep if folder in sweeps else plot_run)(folder, out, stem, x, band))
        if (folder / "flatness.csv").is_file():
            written.extend(plot_flatness(folder, out, stem))
    return written


# ---------------------------------------------------------------- flatness.csv (zoflat flatness)

def read_flatness(folder: Path) -> pd.DataFrame:
    """flatness.csv as a frame, with each run's method label (from metrics.csv)."""
    df = pd.read_csv(folder / "flatness.csv")
    for column in ("step", "index", "x", "y", "value", "stderr"):
        df[column] = pd.to_numeric(df[column], errors="coerce")
    runs, _ = read_frame(folder)
    labels = runs.drop_duplicates("run_id").set_index("run_id").apply(method_label, axis=1)
    df["label"] = df["run_id"].map(lambda r: f"{labels.get(r, r)} (seed {runs.loc[runs.run_id == r, 'seed'].iloc[0]})"
                                   if r in labels else r)
    return df


STYLES = ("-", "--", ":", "-.")  # a measure's methods (hutchinson, hutchpp, ...), in order


def _scalar_panel(ax, df: pd.DataFrame, colours: dict, styles: dict):
    """A measure's values against step: a line per run (colour) and method (style); eigenvalues
    past the first are thinner. Returns what the title says of the y scale."""
    for (label, method, index), part in df.groupby(["label", "method", "index"], sort=False):
        part = part.sort_values("step")
        ax.errorbar(part["step"], part["value"], yerr=part["stderr"].fillna(0), color=colours[label],
                    ls=styles[method], marker="o", ms=3 if index == 0 else 1.5, capsize=2, lw=1.3 if index == 0 else 0.7)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    return set_scale(ax, df["value"])


def plot_flatness(folder: Path, out_dir: Path = None, stem: str = None) -> list:
    """flatness.png/pdf: trace, eigenvalues, sharpness against step; the per-module traces and the
    spectral density at the measured steps; the 1d landscapes. landscape.png/pdf: the 2d and plane
    slices as contour plots, a row per run, a column per step and slice."""
    df = read_flatness(folder)
    labels = list(dict.fromkeys(df["label"]))
    colours = {lab: f"C{i % 10}" for i, lab in enumerate(labels)}
    panels = [m for m in ("trace", "eigenvalues", "sharpness", "modules", "density") if m in set(df["measure"])]
    one_d = df[(df["measure"] == "landscape") & (df["method"] == "1d")]
    if not one_d.empty:
        panels.append("landscape")
    written = []
    target = out_dir if out_dir is not None else folder
    name = "flatness" if out_dir is None else f"{stem or folder.name}-flatness"
    if panels:
        n_cols = min(len(panels), PANELS_PER_ROW)
        n_rows = -(-len(panels) // PANELS_PER_ROW)
        fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.8 * n_cols, 3.6 * n_rows + 1.0), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, panel in zip(axes.flat, panels):
            part = df[df["measure"] == panel]
            if panel in ("trace", "eigenvalues", "sharpness"):
                methods = list(dict.fromkeys(part["method"]))
                styles = {m: STYLES[i % len(STYLES)] for i, m in enumerate(methods)}
                scale = _scalar_panel(ax, part, colours, styles)
                title = {"trace": "Hessian trace (± stderr)", "eigenvalues": "top eigenvalues (thin: #1, #2, ...)",
                         "sharpness": "worst-case loss rise in the ρ-ball"}[panel]
                ax.set_title(title + scale + ("\n" + ", ".join(f"{m} {styles[m]}" for m in methods) if len(methods) > 1
                                      else ""), fontsize=9)
            elif panel == "modules":
                last = part[part["step"] == part.groupby("run_id")["step"].transform("max")]
                modules = list(dict.fromkeys(last["module"]))
                width = 0.8 / max(1, len(labels))
                for k, label in enumerate(labels):
                    mine = last[last["label"] == label].set_index("module").reindex(modules)
                    ax.bar([i + k * width for i in range(len(modules))], mine["value"], width,
                           yerr=mine["stderr"].fillna(0), color=colours[label], capsize=2)
                ax.set_xticks([i + 0.4 - width / 2 for i in range(len(modules))])
                ax.set_xticklabels([m.split(".")[-2] + "." + m.split(".")[-1] if m.count(".") else m
                                    for m in modules], rotation=60, ha="right", fontsize=7)
                ax.set_title("trace per module (last measured step)")
                ax.grid(alpha=0.3, axis="y")
            elif panel == "density":
                low, high = part["x"].min(), part["x"].max()
                pad = 0.05 * (high - low or 1.0)
                grid = np.linspace(low - pad, high + pad, 400)
                sigma = 0.01 * (high - low or 1.0)
                for (label, step), mine in part.groupby(["label", "step"], sort=False):
                    values = density([(mine["x"].to_numpy(), mine["value"].to_numpy())], grid, sigma)
                    ax.semilogy(grid, np.maximum(values, 1e-12), color=colours[label], lw=1,
                                alpha=0.4 + 0.6 * step / max(1, part["step"].max()))
                ax.set_ylim(bottom=1e-6)
                ax.set_title("spectral density (SLQ; darker: later)")
                ax.set_xlabel("eigenvalue")
                ax.grid(alpha=0.3)
            else:
                for (label, step), mine in one_d.groupby(["label", "step"], sort=False):
                    ax.plot(mine["x"], mine["value"], color=colours[label],
                            alpha=0.4 + 0.6 * step / max(1, one_d["step"].max()), lw=1.2)
                ax.set_title("loss along a filter-normalised direction (darker: later)")
                ax.set_xlabel("α")
                ax.grid(alpha=0.3)
        handles = {label: plt.Line2D([], [], color=colours[label]) for label in labels}  # a colour per run
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(3, len(handles)), fontsize=7,
                   frameon=False)
        fig.suptitle(f"zoflat flatness: {folder.name}", fontsize=10)
        fig.tight_layout(rect=(0, min(0.45, 0.035 * (-(-len(handles) // 3)) / n_rows + 0.03), 1, 1))
        written += _save(fig, target, name)
    slices = df[(df["measure"] == "landscape") & df["method"].isin(["2d", "plane"])]
    if not slices.empty:
        cells = list(dict.fromkeys(zip(slices["step"], slices["method"])))
        fig, axes = plt.subplots(len(labels), len(cells), figsize=(3.6 * len(cells), 3.2 * len(labels) + 0.5),
                                 squeeze=False)
        for r, label in enumerate(labels):
            for c, (step, method) in enumerate(cells):
                ax = axes[r][c]
                mine = slices[(slices["label"] == label) & (slices["step"] == step) & (slices["method"] == method)]
                if mine.empty:
                    ax.set_visible(False)
                    continue
                grid = mine.pivot_table(index="y", columns="x", values="value")
                levels = ax.contour(grid.columns, grid.index, grid.to_numpy(), levels=15, cmap="viridis")
                ax.clabel(levels, fontsize=6)
                if method == "plane":
                    ax.plot([0, 1], [0, 0], "o-", color="C3", ms=4)
                    ax.annotate("start", (0, 0), fontsize=7)
                    ax.annotate(f"step {int(step)}", (1, 0), fontsize=7)
                ax.set_title(f"{label}\n{method}, step {int(step)}", fontsize=8)
        fig.suptitle(f"zoflat flatness: loss landscapes, {folder.name}", fontsize=10)
        fig.tight_layout()
        written += _save(fig, target, name.replace("flatness", "landscape"))
    return written


def _save(fig, target: Path, stem: str) -> list:
    target.mkdir(parents=True, exist_ok=True)
    paths = [target / f"{stem}.{fmt}" for fmt in FORMATS]
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths
