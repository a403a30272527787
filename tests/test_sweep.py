"""`zoflat sweep` (local, Ray, submitit), `zoflat table`, and the trackers, through the real CLI."""

import csv
import io
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from zoflat_cli.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
FIG4 = str(REPO / "recipes" / "toy" / "fig4.yaml")
TOY_GRID = ["-o", "zo,zest", "--lambda", "0.1,0.05", "--seeds", "3", "--steps", "300", "--log-every", "100",
            "--dim", "10"]
CONVEX_RECIPE = ["--dataset", "a8a", "--train-size", "300", "--features", "20", "--steps", "40", "--log-every",
                 "10", "--seeds", "2", "-o", "gd,zo"]


def timeless(rows) -> list:
    """Rows in (run, step) order without wall_s, the one column that depends on the machine."""
    rows = sorted(rows, key=lambda r: (r["run_id"], int(r["step"])))
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def csv_rows(paths) -> list:
    out = []
    for path in paths:
        with open(path) as f:
            out.extend(csv.DictReader(f))
    return out


def sweep_rows(folder: Path) -> list:
    return csv_rows(sorted(folder.glob("jobs/*/*/*/metrics.csv")))


def direct_rows(tmp_path: Path, command: str, *args) -> list:
    result = runner.invoke(app, [command, *args, "--out", str(tmp_path / "direct"), "-q"])
    assert result.exit_code == 0, result.output
    return csv_rows((tmp_path / "direct").glob(f"{command}/*/metrics.csv"))


def sweep(tmp_path: Path, *args, name="sweeps"):
    result = runner.invoke(app, ["sweep", *args, "--out", str(tmp_path / name), "-q"])
    folders = sorted((tmp_path / name / "sweep").glob("*")) if (tmp_path / name / "sweep").is_dir() else []
    return result, folders


def states(folder: Path) -> dict:
    return {r: e["state"] for r, e in yaml.safe_load((folder / "sweep.yaml").read_text())["jobs"].items()}


# ---------------------------------------------------------------- launchers

def test_local_sweep_equals_the_runs_launched_directly(tmp_path):
    result, (folder,) = sweep(tmp_path, FIG4, *TOY_GRID, "--jobs", "2")
    assert result.exit_code == 0, result.output
    assert set(states(folder).values()) == {"done"} and len(states(folder)) == 12  # 2 optimizers × 2 λ × 3 seeds
    assert timeless(sweep_rows(folder)) == timeless(direct_rows(tmp_path, "toy", "--config", FIG4, *TOY_GRID))
    state = yaml.safe_load((folder / "sweep.yaml").read_text())
    assert state["command"] == "toy" and state["grid"]["lambda"] == [0.1, 0.05] and state["launcher"]["jobs"] == 2


def test_ray_sweep_equals_the_runs_launched_directly(tmp_path):
    pytest.importorskip("ray")
    result, (folder,) = sweep(tmp_path, FIG4, *TOY_GRID, "--launcher", "ray", "--jobs", "2")
    assert result.exit_code == 0, result.output
    assert set(states(folder).values()) == {"done"} and len(states(folder)) == 12
    assert timeless(sweep_rows(folder)) == timeless(direct_rows(tmp_path, "toy", "--config", FIG4, *TOY_GRID))


def job_pid(job_dir: Path):
    """The pid of the zoflat process running a job (its command line names the job's folder)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"zoflat_cli" in cmdline and any(str(job_dir).encode() in part for part in cmdline):
            return int(proc.name)
    return None


def test_submitit_local_sweep_resumes_a_killed_job_to_the_uninterrupted_result(tmp_path):
    pytest.importorskip("submitit")
    recipe = tmp_path / "convex.yaml"
    recipe.write_text("command: convex\n")
    grid = ["--dataset", "a8a", "--train-size", "300", "--features", "20", "--steps", "10000", "--log-every", "500",
            "--checkpoint-every", "2000", "--seeds", "2", "-o", "zo", "--eig-every", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "zoflat_cli", "sweep", str(recipe), *grid, "--launcher", "slurm",
                             "--slurm-local", "--out", str(tmp_path / "s"), "-q"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, killed = time.monotonic() + 120, None
    while time.monotonic() < deadline and killed is None:
        for metrics in tmp_path.glob("s/sweep/*/jobs/*/convex/*/metrics.csv"):
            if metrics.read_text().count("\n") > 8:  # past its first checkpoint, short of its end
                job_dir = metrics.parents[2]
                pid = job_pid(job_dir)
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed = job_dir.name
                    break
        time.sleep(0.05)
    assert killed, "no job was caught mid-run"
    _, err = proc.communicate(timeout=300)
    folder, = tmp_path.glob("s/sweep/*")
    assert proc.returncode == 1 and "1 of 2 jobs failed" in err, err
    assert states(folder)[killed] == "failed"
    result = runner.invoke(app, ["sweep", "--resume", str(folder), "--launcher", "slurm", "--slurm-local", "-q"])
    assert result.exit_code == 0, result.output
    assert set(states(folder).values()) == {"done"}
    assert timeless(sweep_rows(folder)) == timeless(direct_rows(tmp_path, "convex", "--config", str(recipe), *grid))


def test_ctrl_c_cancels_cleanly_and_resume_finishes_only_the_unfinished(tmp_path):
    grid = ["-o", "zo", "--lambda", "0.1,0.05", "--seeds", "2", "--steps", "40000", "--log-every", "1000",
            "--dim", "10"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "zoflat_cli", "sweep", FIG4, *grid, "--jobs", "2", "--out",
                             str(tmp_path / "s"), "-q"], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(tmp_path.glob("s/sweep/*/jobs/*/toy/*/metrics.csv"))) < 2:
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the sweep and its jobs
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "zoflat sweep --resume" in err and "Traceback" not in err
    folder, = tmp_path.glob("s/sweep/*")
    assert "done" not in states(folder).values() and set(states(folder).values()) <= {"cancelled", "queued"}
    result = runner.invoke(app, ["sweep", "--resume", str(folder), "-q"])
    assert result.exit_code == 0, result.output
    assert set(states(folder).values()) == {"done"}
    assert timeless(sweep_rows(folder)) == timeless(direct_rows(tmp_path, "toy", "--config", FIG4, *grid))


def test_a_crashing_job_is_marked_failed_with_its_stderr_and_the_others_go_on(tmp_path):
    result, (folder,) = sweep(tmp_path, FIG4, "-o", "zo", "--lambda", "0.1,0.05", "--seeds", "1", "--steps", "100",
                              "--dim", "5")
    assert result.exit_code == 0
    broken = folder / "jobs" / "zo-lam0.05-lr0.001-s0"
    for child in broken.iterdir():
        if child.is_dir():
            import shutil

            shutil.rmtree(child)
    (broken / "job.yaml").write_text("command: toy\nlambda: [oops\n")
    state = yaml.safe_load((folder / "sweep.yaml").read_text())
    state["jobs"]["zo-lam0.05-lr0.001-s0"]["state"] = "queued"
    (folder / "sweep.yaml").write_text(yaml.safe_dump(state))
    result = runner.invoke(app, ["sweep", "--resume", str(folder), "-q"])
    assert result.exit_code == 1 and "1 of 2 jobs failed" in result.output
    entry = yaml.safe_load((folder / "sweep.yaml").read_text())["jobs"]["zo-lam0.05-lr0.001-s0"]
    assert entry["state"] == "failed" and "error:" in entry["error"]
    assert states(folder)["zo-lam0.1-lr0.001-s0"] == "done"


@pytest.mark.parametrize("args,message", [
    ([FIG4, "--launcher", "pbs"], "--launcher must be one of local, ray, slurm"),
    ([FIG4, "--launcher", "slurm"], "sbatch is not on this machine's PATH"),
    ([FIG4, "--launcher", "ray", "--address", "127.0.0.1:1"], "the Ray head cannot be reached"),
    ([FIG4, "--lambda", "zoo=1"], "unknown optimizer 'zoo'"),
    ([FIG4, "--bogus", "3"], "No such option"),
    ([FIG4, "--jobs", "0"], "--jobs must be >= 1"),
    ([], "give a recipe"),
    (["--resume", "nowhere"], "not a sweep folder"),
])
def test_sweep_bad_input_is_one_line_and_makes_no_folder(tmp_path, args, message):
    if args[:1] == ["--resume"]:  # a resumed sweep takes no experiment flags, --out neither
        result, folders = runner.invoke(app, ["sweep", *args]), []
    else:
        result, folders = sweep(tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not folders


@pytest.mark.parametrize("launcher,package,extra", [("ray", "ray", "ray"), ("slurm", "submitit", "slurm")])
def test_a_launcher_that_is_not_installed_is_one_line(tmp_path, monkeypatch, launcher, package, extra):
    import builtins

    real = builtins.__import__

    def missing(name, *args, **kwargs):
        if name == package:
            raise ImportError(name)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", missing)
    result, folders = sweep(tmp_path, FIG4, "--launcher", launcher, "--slurm-local")
    assert result.exit_code == 2 and f"pip install 'zoflat[{extra}]'" in result.output and not folders


def test_a_recipe_without_a_command_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 10\n")
    result, folders = sweep(tmp_path, str(recipe))
    assert result.exit_code == 2 and "needs `command: toy|convex|finetune`" in result.output and not folders


# ---------------------------------------------------------------- table and plot

@pytest.fixture(scope="module")
def toy_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("table")
    result, (folder,) = sweep(tmp, FIG4, "-o", "gd,zo", "--lambda", "0.1,0.05", "--seeds", "3", "--steps", "200",
                              "--log-every", "100", "--dim", "5", "--jobs", "2")
    assert result.exit_code == 0, result.output
    return folder


def test_table_equals_pandas_on_the_csvs(toy_sweep):
    result = runner.invoke(app, ["table", str(toy_sweep), "--metric", "loss,hessian_trace", "--format", "csv"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.output))
    rows = pd.concat([pd.read_csv(p) for p in toy_sweep.glob("jobs/*/toy/*/metrics.csv")])
    final = rows.sort_values("step").groupby("run_id").tail(1).fillna({"lambda": -1.0})  # gd has no λ
    keys, metrics = ["optimizer", "lambda"], ["loss", "hessian_trace"]  # lr is one value: not a column
    assert "lr" not in table.columns
    expected = final.groupby(keys)[metrics].agg(["mean", "std", "count"])
    expected.columns = [f"pandas_{m}_{stat}" for m, stat in expected.columns]
    merged = table.fillna({"lambda": -1.0}).merge(expected.reset_index(), on=keys)
    assert len(merged) == len(table) == 3  # gd, and zo at two λ
    for metric in metrics:
        assert merged[f"{metric}_mean"].tolist() == pytest.approx(merged[f"pandas_{metric}_mean"].tolist())
        assert merged[f"{metric}_std"].tolist() == pytest.approx(merged[f"pandas_{metric}_std"].tolist())
        assert merged[f"{metric}_n"].tolist() == merged[f"pandas_{metric}_count"].tolist() == [3, 3, 3]
    assert table["loss_best"].sum() == 1 and table.loc[table["loss_best"], "loss_mean"].item() == table["loss_mean"].min()


def test_table_markdown_and_latex_parse(toy_sweep):
    md = runner.invoke(app, ["table", str(toy_sweep), "--by", "optimizer,lambda", "--at", "best"]).output
    lines = md.strip().splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0][:2] == ["optimizer", "lambda"] and set(cells[1]) == {"---"} and len(lines) == 2 + 3
    assert all(len(c) == len(cells[0]) for c in cells) and sum("**" in c for row in cells for c in row) == 2
    tex = runner.invoke(app, ["table", str(toy_sweep), "--format", "latex", "--at", "100"]).output
    assert tex.startswith("\\begin{tabular}") and tex.strip().endswith("\\end{tabular}") and "$\\pm$" in tex
    assert tex.count("\\textbf") == 2


def test_table_keeps_runs_of_different_settings_apart_unless_folded(tmp_path):
    for steps, law in ((20, "gaussian"), (40, "gaussian"), (20, "rademacher")):
        args = ["toy", "--dim", "4", "--steps", steps, "--log-every", 10, "--seeds", 2, "-o", "gd,zo", "--lr", "1e-4",
                "--directions", law, "--out", tmp_path, "-q"]
        assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    result = runner.invoke(app, ["table", str(tmp_path), "--format", "csv"])
    table = pd.read_csv(io.StringIO(result.stdout))
    assert list(table.columns[:3]) == ["optimizer", "directions", "steps"] and "pooled" not in result.output
    # gd at 20 and 40 steps (gd draws no directions: the two 20-step folders hold the same gd runs, counted
    # once); zo at three settings
    assert table["loss_n"].tolist() == [2] * 5 and len(set(zip(table["optimizer"], table["steps"]))) == 4
    assert "note: 2 runs repeat the settings and seed of a run in another folder" in result.output
    folded = runner.invoke(app, ["table", str(tmp_path), "--by", "optimizer"])
    assert "note: pooled within a row: directions (gaussian, rademacher)" in folded.output
    assert "note: pooled within a row: steps (20, 40)" in folded.output
    assert "| zo | " in folded.stdout and "(6)" in folded.stdout
    md = runner.invoke(app, ["table", str(tmp_path), "--by", "optimizer,steps,lr"]).stdout
    assert "| 0.0001 |" in md and "e-05" not in md  # lr 1e-4 at 4 significant digits


def test_best_is_marked_within_a_task_only():
    from zoflat_cli.tools.table import render

    table = pd.DataFrame({"task": ["rte", "rte", "copa", "copa"], "optimizer": ["zo", "gd", "zo", "gd"],
                          "test_accuracy_mean": [0.6, 0.5, 0.7, 0.9], "test_accuracy_std": [0.1] * 4,
                          "test_accuracy_n": [3] * 4})
    md = render(table, ["test_accuracy"], ["task", "optimizer"], "markdown")
    assert [line.split("|")[2].strip() for line in md.splitlines() if "**" in line] == ["zo", "gd"]


def test_table_bad_input_is_one_line(toy_sweep, tmp_path):
    convex = tmp_path / "convex"
    assert runner.invoke(app, ["convex", *CONVEX_RECIPE, "--out", str(convex), "-q"]).exit_code == 0
    (tmp_path / "empty").mkdir()
    for args, message in [([str(toy_sweep), str(convex)], "mix commands"),
                          ([str(tmp_path / "empty")], "no run folders"),
                          ([str(toy_sweep), "--metric", "acc"], "--metric acc: not a column"),
                          ([str(toy_sweep), "--by", "colour"], "--by colour: not a column"),
                          ([str(toy_sweep), "--format", "html"], "--format must be one of"),
                          ([str(toy_sweep), "--at", "9999"], "logged no loss at step 9999"),
                          ([str(toy_sweep), "--at", "last"], "--at must be final, best or a step")]:
        result = runner.invoke(app, ["table", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1


def test_plot_draws_a_sweep_folder_as_one_figure(toy_sweep):
    result = runner.invoke(app, ["plot", str(toy_sweep)])
    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(toy_sweep / "figure.png"), str(toy_sweep / "figure.pdf")]


# ---------------------------------------------------------------- trackers

def tracked_run(tmp_path, logger):
    result = runner.invoke(app, ["toy", "-o", "gd,zo", "--steps", "200", "--log-every", "50", "--dim", "5",
                                 "--seeds", "2", "--out", str(tmp_path), "--logger", logger, "-q"])
    assert result.exit_code == 0, result.output
    folder, = tmp_path.glob("toy/*")
    rows = pd.read_csv(folder / "metrics.csv")
    from zoflat_cli.runs.trackers import metrics_of

    expected = {(r["run_id"], k, int(r["step"])): v for r in rows.to_dict("records") for k, v in metrics_of(r).items()}
    return folder, expected


def test_tensorboard_events_hold_every_logged_metric(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, expected = tracked_run(tmp_path, "tensorboard")
    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    got = {(tag.split("/")[0], tag.split("/", 1)[1], e.step): e.value
           for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())  # tensorboard keeps float32


def wandb_records(path: Path) -> tuple:
    """(the run's name, its history records) of an offline .wandb file: a LevelDB-style log of
    protobuf records."""
    from wandb.proto import wandb_internal_pb2

    data, name, history, chunk = path.read_bytes(), None, [], b""
    block, pos = 32768, 7  # the file starts with ':W&B', a 2-byte magic and a version byte
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "run":
                name = record.run.display_name
            elif record.WhichOneof("record_type") == "history":
                history.append({".".join(item.nested_key) or item.key: item.value_json for item in record.history.item})
        elif kind == 0:
            break
    return name, history


def test_wandb_offline_runs_hold_every_logged_metric(tmp_path):
    pytest.importorskip("wandb")
    folder, expected = tracked_run(tmp_path, "wandb")
    got = {}
    for run_file in folder.glob("wandb/offline-run-*/run-*.wandb"):
        name, history = wandb_records(run_file)
        run_id = name.split("/")[1]  # <folder>/<run_id>
        for record in history:
            for key, value in record.items():
                if not key.startswith("_"):
                    got[(run_id, key, int(record["_step"]))] = float(value)
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v) for k, v in expected.items())


def test_mlflow_run_holds_every_logged_metric(tmp_path):
    pytest.importorskip("mlflow")
    folder, expected = tracked_run(tmp_path, "mlflow")
    got = {}
    for metric_file in folder.glob("mlruns/*/*/metrics/*/*"):
        run_id, name = metric_file.parent.name, metric_file.name
        for line in metric_file.read_text().splitlines():
            _, value, step = line.split()
            got[(run_id, name, int(step))] = float(value)
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v) for k, v in expected.items())


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def missing(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError(name)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", missing)
    result = runner.invoke(app, ["toy", "--steps", "10", "--logger", "wandb", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "pip install 'zoflat[trackers]'" in result.output
    assert not (tmp_path / "o").exists()
