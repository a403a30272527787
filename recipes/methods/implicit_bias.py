"""Which of the 2024–26 ZO methods keep ZO's drift to flat minima (README, "The newer ZO methods and
the flat-minimum bias"): every method at an equal number of oracle calls (n_evals), its lr picked on a
small grid (toy: the largest stable lr; convex, MiniLM: the lowest final loss), beside ZO-SGD, its
λ → 0 twin dd and GD; then the table (stdout, markdown) and the figure.

    python recipes/methods/implicit_bias.py [--parts toy,convex,minilm] [--out runs/methods]
        [--figure docs/methods_bias.png]

  toy      Example 2.1, d = 100, λ = 0.1, 50 seeds, 100,000 oracle calls; the exact Tr H and λ_max at the
           end (flattest minimum: 2) and the balance B (0 at the flattest minima)
  convex   the random-feature SVM on the offline w8a re-split (recipes/convex/zo_family.yaml), 3 seeds,
           4,000 oracle calls; Tr H and λ_max of the training loss (exact), test accuracy
  minilm   MiniLM LoRA on SST-2 K=16 (recipes/flatness/lm_claim_zo.yaml), 1 seed, 1,000 oracle calls,
           lr 3e-3 for all (not tuned: CPU time); Tr H (Hutch++) and λ₁ (Lanczos) by `zoflat flatness`
Each invocation is named bias-<part>-<method>; one that exists under --out is resumed (zoflat ... --resume),
so the script can be stopped and run again. One CPU thread per invocation (OMP_NUM_THREADS=1).
"""

import argparse
import os
import subprocess
from pathlib import Path

import pandas as pd

from zoflat_cli.optim.presets import PRESETS, evals_until
from zoflat_cli.runs.spec import RunSpec

METHODS = ["zo", "hizoo", "lozo", "subzero", "sparse-mezo", "mezo-svrg", "fzoo"]
REFERENCES = ["dd", "gd"]  # zo's steps: dd is zo's λ → 0 twin (same directions), gd the exact gradient
PERIOD = 50  # the default --period (LOZO's V, SubZero's subspace, MeZO-SVRG's anchor)
PARTS = {
    "toy": dict(budget=100_000, args=["toy", "--dim", 100, "--seeds", 50, "--lambda", 0.1],
                lrs={"fzoo": [1e-4, 3e-4, 1e-3], "mezo-svrg": [3e-5, 1e-4, 3e-4], "gd": [1e-2], "dd": [1e-3],
                     None: [3e-4, 1e-3, 3e-3]}, pick="fastest"),
    "convex": dict(budget=4_000, args=["convex", "--config", "recipes/convex/zo_family.yaml", "--lambda", 0.005],
                   lrs={"fzoo": [3e-4, 1e-3, 3e-3], "mezo-svrg": [3e-6, 1e-5, 3e-5], "subzero": [3e-5, 1e-4, 3e-4],
                        "hizoo": [1e-4, 3e-4, 1e-3], "sparse-mezo": [1e-4, 3e-4, 1e-3], "gd": [1e-3], "dd": [1e-4],
                        None: [1e-4, 3e-4]}, pick="loss"),
    "minilm": dict(budget=1_000, args=["finetune", "--config", "recipes/flatness/lm_claim_zo.yaml",
                                       "--checkpoint-every", 0], lrs={"gd": [6e-3], "mezo-svrg": [1e-3], None: [3e-3]},
                   pick="loss"),
}


def steps_for(method: str, budget: int, reference_steps: int) -> int:
    """The most steps whose oracle calls fit the budget (gd, dd: ZO-SGD's steps)."""
    if method in REFERENCES:
        return reference_steps
    run = RunSpec(method, 1e-3, 0, PRESETS[method].samples, (("period", PERIOD),))
    low, high = 0, budget
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if evals_until(run, mid) <= budget else (low, mid - 1)
    return low


def invoke(part: str, method: str, out: Path) -> Path:
    """Run (or resume) one method's invocation of a part; returns its run folder."""
    spec = PARTS[part]
    name = f"bias-{part}-{method}"
    found = sorted((out / spec["args"][0]).glob(f"*-{name}")) if (out / spec["args"][0]).is_dir() else []
    if found:
        args = [spec["args"][0], "--resume", found[-1]]
    else:
        steps = steps_for(method, spec["budget"], steps_for("zo", spec["budget"], 0))
        lrs = spec["lrs"].get(method, spec["lrs"][None])
        log_every = max(1, steps // 20)
        args = [*spec["args"], "-o", method, "--steps", steps, "--log-every", log_every, "--lr",
                ",".join(map(str, lrs)), "--name", name, "--out", out]
        if part == "convex":
            args += ["--eig-every", 4 * log_every]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(["zoflat", *map(str, args), "--quiet"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[0])


def measure_minilm(folders: dict):
    """Tr H (Hutch++) and λ₁ at the end of every MiniLM run, and once at step 0 (the same base weights)."""
    settings = ["--measures", "trace,eigenvalues", "--probes", "4", "--hutchpp", "12", "--top-k", "1"]
    for method, folder in folders.items():
        if not (folder / "flatness.csv").is_file():
            at = "0,end" if method == "zo" else "end"
            subprocess.run(["zoflat", "flatness", str(folder), "--at", at, *settings], check=True, capture_output=True)


def final_rows(part: str, folder: Path, method: str) -> tuple:
    """Each run's last row (plus, for MiniLM, its measured Tr H and λ₁), and its first."""
    rows = pd.read_csv(folder / "metrics.csv")
    first = rows.sort_values("step").groupby("run_id").head(1)
    last = rows.sort_values("step").groupby("run_id").tail(1).copy()
    last["method"] = method
    if part == "minilm" and (folder / "flatness.csv").is_file():
        flat = pd.read_csv(folder / "flatness.csv")
        for run_id in last.run_id:
            end = flat[(flat.run_id == run_id) & (flat.step == last.loc[last.run_id == run_id, "step"].iloc[0])]
            last.loc[last.run_id == run_id, "hessian_trace"] = end[end.method == "hutchpp"].value.mean()
            last.loc[last.run_id == run_id, "lambda_max"] = end[end.measure == "eigenvalues"].value.max()
    return last, first


def tuned(last: pd.DataFrame, first: pd.DataFrame, pick: str) -> pd.DataFrame:
    """The runs of one lr among those at which no seed diverged: pick "fastest", the largest whose median
    loss at least halved (the toy: every stable lr reaches loss ≈ 0, so the loss cannot choose, and how
    far a method drifts along the minima depends on how fast it steps), or "loss", the one with the
    lowest median final training loss (none if no lr lowered it)."""
    start = first.loss.median()
    ok = last.groupby("lr").filter(lambda g: g.loss.notna().all() and (g.loss < 1e6).all() and g.loss.median()
                                   < (start / 2 if pick == "fastest" else start))
    if ok.empty:
        return ok
    return ok[ok.lr == (ok.lr.max() if pick == "fastest" else ok.groupby("lr").loss.median().idxmin())]


def table(part: str, folders: dict) -> pd.DataFrame:
    out = []
    for method, folder in folders.items():
        runs = tuned(*final_rows(part, folder, method), PARTS[part]["pick"])
        if runs.empty:
            out.append({"method": method, "lr": "no lr trained (loss " + ("not halved)" if PARTS[part]["pick"] ==
                                                                         "fastest" else "not lowered)")})
            continue
        row = {"method": method, "lr": f"{runs.lr.iloc[0]:g}", "steps": int(runs.step.iloc[0]),
               "n_evals": int(runs.n_evals.iloc[0]), "loss": runs.loss.median()}
        se = runs.hessian_trace.std() / len(runs) ** 0.5 if len(runs) > 1 else float("nan")
        row["Tr H"] = f"{runs.hessian_trace.mean():.3g}" + (f" ± {se:.2g}" if se == se else "")
        row["λ_max"] = f"{runs.lambda_max.mean():.3g}"
        if "balance" in runs:
            row["|B|"] = f"{runs.balance.abs().mean():.3g}"
        if "test_accuracy" in runs and runs.test_accuracy.notna().any():
            row["test acc."] = f"{100 * runs.test_accuracy.mean():.1f}"
        out.append(row)
    return pd.DataFrame(out)


def markdown(frame: pd.DataFrame) -> str:
    cells = [[f"{v:.4g}" if isinstance(v, float) else ("" if pd.isna(v) else str(v)) for v in row]
             for row in frame.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in [list(frame.columns), ["---"] * frame.shape[1], *cells])


def figure(curves: dict, path: Path):
    """Tr H against oracle calls per part and method (each at its chosen lr; mean over seeds); for MiniLM
    λ₁ (Lanczos), steadier than a 12-product trace estimate on one seed, at the start and the end."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(METHODS + REFERENCES, plt.cm.tab10.colors))
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 4.2), squeeze=False)
    for ax, (part, per_method) in zip(axes[0], curves.items()):
        column = "lambda_max" if part == "minilm" else "hessian_trace"
        for method, rows in per_method.items():
            mean = rows.groupby("n_evals")[column].mean().dropna()
            ax.plot(mean.index, mean.values, "o-" if part == "minilm" else "-", color=colors[method], label=method,
                    lw=2 if method in ("zo", "gd") else 1.2)
        ax.set_yscale("log")
        ax.set_xlabel("oracle calls (n_evals; gd, dd: at zo's for the same step)")
        ax.set_ylabel("λ₁ (Lanczos)" if part == "minilm" else "Tr ∇²f (mean over seeds)")
        ax.set_title({"toy": "toy (flattest: 2)", "convex": "convex SVM (3 seeds)",
                      "minilm": "MiniLM LoRA, SST-2 (1 seed; start: zo's step 0)"}[part])
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="toy,convex,minilm")
    parser.add_argument("--out", type=Path, default=Path("runs/methods"))
    parser.add_argument("--figure", type=Path, default=Path("docs/methods_bias.png"))
    parser.add_argument("--scale", type=float, default=1.0, help="budgets × this (a quick look: 0.01)")
    args = parser.parse_args()
    for spec in PARTS.values():
        spec["budget"] = max(10, int(spec["budget"] * args.scale))
    os.chdir(Path(__file__).resolve().parents[2])
    curves = {}
    for part in args.parts.split(","):
        methods = METHODS + (REFERENCES if part != "minilm" else ["gd"])
        folders = {method: invoke(part, method, args.out) for method in methods}
        if part == "minilm":
            measure_minilm(folders)
        print(f"\n### {part}\n")
        print(markdown(table(part, folders)))
        curves[part] = {}
        for method, folder in folders.items():
            runs = tuned(*final_rows(part, folder, method), PARTS[part]["pick"])
            rows = pd.read_csv(folder / "metrics.csv")
            if part == "minilm":
                flat = pd.read_csv(folder / "flatness.csv") if (folder / "flatness.csv").is_file() else None
                if flat is None:
                    continue
                rows = rows.drop(columns=["lambda_max"], errors="ignore").merge(
                    flat[flat.measure == "eigenvalues"].groupby(["run_id", "step"]).value.max().rename("lambda_max")
                    .reset_index(), on=["run_id", "step"])
                if method != "zo":  # every run starts at zo's step 0 (the same base weights and adapters)
                    rows = pd.concat([curves[part]["zo"].iloc[:1].assign(run_id=rows.run_id.iloc[0]), rows])
            rows = rows[rows.run_id.isin(runs.run_id)].copy()
            if method in REFERENCES:  # drawn at zo's oracle calls for the same step
                rows["n_evals"] = rows.step * evals_until(RunSpec("zo", 1e-3, 0), 1)
            curves[part][method] = rows
    figure(curves, args.figure)
    print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
