"""`zoflat flatness RUN_FOLDER`: the flatness measures (measures/registry.py) of a run folder's runs
at chosen steps, after the fact.

Each chosen run is brought back to each chosen step by its experiment (engine/points.py: toy and
convex re-run from the seed; finetune replays the update log on the base weights), measured, and
its rows are written to <folder>/flatness.csv (after each run and step, so an interrupted
measurement keeps what it finished). Rows of the same run, step and measure measured again replace
the old ones; everything else in the file is kept. The folder's other files are never written.
"""

from pathlib import Path

from zoflat_cli.errors import ZoflatError
from zoflat_cli.experiments import registry
from zoflat_cli.measures.catalog import Settings, measure_names
from zoflat_cli.measures.registry import take
from zoflat_cli.runs.flatness import FILE, write_rows
from zoflat_cli.runs.folder import FolderReader, read_summary


def split_list(text: str) -> list:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def parse_steps(text: str, last: int) -> list:
    """`0,mid,end,1500` for a run whose last logged step is `last`: sorted, unique."""
    steps = set()
    for token in split_list(text):
        named = {"start": 0, "mid": last // 2, "end": last}
        if token in named:
            steps.add(named[token])
            continue
        try:
            step = int(token)
        except ValueError:
            raise ZoflatError(f"--at {text!r}: {token!r} is not a step (give numbers, start, mid or end)") from None
        if not 0 <= step <= last:
            raise ZoflatError(f"--at {text!r}: step {step} is outside the run's logged steps 0..{last}")
        steps.add(step)
    if not steps:
        raise ZoflatError("--at names no step")
    return sorted(steps)


def plan(folder: Path, runs: str = None, at: str = "0,end", measures: str = "trace", device: str = None) -> tuple:
    """Everything checked before anything loads: (experiment, config, runs, {run_id: steps}, measures)."""
    folder = Path(folder)
    summary = read_summary(folder)
    if not summary or not (folder / "config.yaml").is_file():
        raise ZoflatError(f"{folder}: not a run folder (no summary.json and config.yaml)")
    experiment = registry().get(summary.get("command"))
    if experiment is None or experiment.points is None:
        raise ZoflatError(f"{folder}: `zoflat {summary.get('command')}` runs have no flatness measures")
    names = measure_names(measures)
    config = experiment.resolve({"device": device} if device else {}, folder / "config.yaml")
    rows = FolderReader(folder).logged_rows()
    logged = {}
    for row in rows:
        logged[row["run_id"]] = max(logged.get(row["run_id"], 0), int(row["step"]))
    every = [r for r in experiment.runs(config) if r.run_id in logged]
    wanted = split_list(runs)
    chosen = [r for r in every if not wanted or r.run_id in wanted or r.optimizer in wanted]
    missing = [w for w in wanted if not any(w in (r.run_id, r.optimizer) for r in every)]
    if missing or not chosen:
        raise ZoflatError(f"--runs: no logged run {', '.join(missing) or 'at all'} in {folder}; its runs: "
                          f"{', '.join(r.run_id for r in every) or 'none'}")
    steps = {r.run_id: parse_steps(at, logged[r.run_id]) for r in chosen}
    return experiment, config, chosen, steps, names


def measure_folder(folder: Path, runs: str = None, at: str = "0,end", measures: str = "trace",
                   settings: Settings = Settings(), device: str = None, report=None) -> Path:
    """Measure and write <folder>/flatness.csv; report(text) hears of each measure taken."""
    settings.check()
    folder = Path(folder)
    experiment, config, chosen, steps, names = plan(folder, runs, at, measures, device)
    restore = {run_id: sorted({0, *s}) if "landscape" in names else s for run_id, s in steps.items()}
    starts = {}
    for run, step, subject in experiment.points(config, chosen, restore, folder):
        if step == 0:
            starts[run.run_id] = [p.detach().clone() for p in subject.params]
        if step not in steps[run.run_id]:
            continue
        rows = take(subject, names, settings, run, step, starts.get(run.run_id), report)
        write_rows(folder, rows)
    return folder / FILE
