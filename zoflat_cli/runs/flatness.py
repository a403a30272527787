"""flatness.csv: the flatness measures' rows of a run folder (README, "Run folders"), written by
`zoflat flatness` and by runs with --measure-every. Rows of a run, step and measure measured
again replace the old ones; the file is rewritten atomically, so a reader never sees half of it."""

import csv
import io
from pathlib import Path

from zoflat_cli.runs.folder import atomic_write

FILE = "flatness.csv"
COLUMNS = ["run_id", "step", "measure", "method", "index", "module", "x", "y", "value", "stderr"]


def read_rows(folder: Path) -> list:
    path = Path(folder) / FILE
    if not path.is_file():
        return []
    return list(csv.DictReader(io.StringIO(path.read_text())))


def write_rows(folder: Path, rows: list):
    """Merge rows into flatness.csv: the same (run, step, measure) replaced, the rest kept."""
    replaced = {(r["run_id"], str(r["step"]), r["measure"]) for r in rows}
    kept = [r for r in read_rows(folder) if (r["run_id"], r["step"], r["measure"]) not in replaced]
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in kept + rows:
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS})
    atomic_write(Path(folder) / FILE, out.getvalue())
