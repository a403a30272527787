"""The LM-claim table (README, "The paper's LM claim, tested"): per run folder, run and measured
step, the training loss and test accuracy logged there, the flatness measures of flatness.csv, and
the smoothing term λ²/2 · Tr H that ZO's implicit objective adds (with the run's λ; for dd and gd
the λ of the zo run beside them, as a yardstick).

    python recipes/flatness/lm_claim_table.py RUN_FOLDER... [--lambda 0.05]
"""

import argparse
from pathlib import Path

import pandas as pd


def rows_of(folder: Path, lam: float) -> list:
    metrics = pd.read_csv(folder / "metrics.csv")
    flat = pd.read_csv(folder / "flatness.csv")
    out = []
    for (run_id, step), part in flat.groupby(["run_id", "step"], sort=False):
        logged = metrics[(metrics.run_id == run_id) & (metrics.step == step)].iloc[0]

        def value(measure, method, index=0):
            hit = part[(part.measure == measure) & (part.method == method) & (part["index"] == index)]
            return (hit.value.iloc[0], hit.stderr.iloc[0]) if len(hit) else (float("nan"), float("nan"))

        trace, trace_se = value("trace", "hutchpp")
        out.append({
            "run": run_id.split("-")[0], "step": step, "train loss": f"{logged.loss:.3f}",
            "test acc.": f"{100 * logged.get('test_accuracy'):.1f}" if pd.notna(logged.get("test_accuracy")) else "",
            "Tr H (Hutch++)": f"{trace:.1f} ± {trace_se:.1f}",
            "Tr H (Hutchinson)": "{:.1f} ± {:.1f}".format(*value("trace", "hutchinson")),
            "λ₁, λ₂": f"{value('eigenvalues', 'lanczos', 0)[0]:.2f}, {value('eigenvalues', 'lanczos', 1)[0]:.2f}",
            "adaptive sharpness": f"{value('sharpness', 'adaptive')[0]:.4f}",
            "plain sharpness": f"{value('sharpness', 'plain')[0]:.4f}",
            "λ²/2·Tr H": f"{lam**2 / 2 * trace:.4f}",
        })
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--lambda", dest="lam", type=float, default=0.05)
    args = parser.parse_args()
    rows = [r for folder in args.folders for r in rows_of(folder, args.lam)]
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join(str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
