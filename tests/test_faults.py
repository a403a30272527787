"""Reliability II (issue 28), through the real CLI: one signal policy (SIGINT, SIGTERM, SIGHUP, SIGQUIT
stop gracefully, also at start-up, at exit and in the sweep driver, which forwards them to its jobs);
resume validates every file against the run folder's fingerprint before it writes, and a refused or
failed resume loses nothing; sweep folders are locked and sweep.yaml checked; data folders are not
overwritten; a checkpoint's failed write is the one-line failed-write path; decoder-task data checked
per field; trackers checked before the folder; torchrun ranks share one config; output degrades on
a terminal that cannot encode it; table follows symlinked run folders; seed studies fit in memory.
Numbers in comments are the audit's defect causes."""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from zoflat_cli.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
TOY = ["toy", "--steps", "20", "--log-every", "5", "--dim", "5", "-o", "zo,gd", "--seeds", "2",
       "--checkpoint-every", "10", "-q"]
LONG_TOY = ["toy", "--steps", "400000", "--log-every", "1000", "--dim", "5", "-o", "zo", "--seeds", "1", "-q"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def toy_folder(tmp_path, *extra, out="o") -> Path:
    result = invoke(*TOY, *extra, "--out", tmp_path / out)
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip())


def snapshot(folder: Path) -> dict:
    """Every file of a run folder, byte for byte (but its lock)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def refused_unchanged(folder: Path, *resume_args, match: str, command: str = "toy"):
    """`--resume folder` is one error line matching `match`, and every file of the folder stays as it was."""
    before = snapshot(folder)
    line = one_error_line(invoke(command, "--resume", folder, *resume_args))
    assert match in line, line
    assert snapshot(folder) == before
    return line


def spawn(*args, cwd=None, env=None):
    return subprocess.Popen([sys.executable, "-m", "zoflat_cli", *map(str, args)], cwd=cwd, env={**ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    raise AssertionError("timed out")


def rows_of(folder: Path) -> int:
    path = folder / "metrics.csv"
    return path.read_text().count("\n") - 1 if path.is_file() else 0


# ---------------------------------------------------------------- 1: a failed or refused resume loses nothing

def test_a_refused_resume_keeps_every_row(tmp_path):
    folder = toy_folder(tmp_path)
    assert rows_of(folder) == 20
    (folder / "checkpoints" / "batched.pt").unlink()
    (folder / "checkpoints" / "batched.pt").mkdir()  # the audit's case: resume used to keep 8 of 20 rows
    refused_unchanged(folder, "--steps", 40, match="batched.pt is damaged")


def test_a_resume_that_fails_writing_keeps_every_row(tmp_path):
    """The checkpoint's temporary file is /dev/full (11): the resume fails on its first save, after
    its rows were due to be rewritten; nothing already logged is lost."""
    folder = toy_folder(tmp_path)
    before = (folder / "metrics.csv").read_text()
    (folder / "checkpoints" / "batched.pt.tmp").symlink_to("/dev/full")
    result = invoke("toy", "--resume", folder, "--steps", 40, "-q")
    line = one_error_line(result, code=1)
    assert "writing checkpoints/batched.pt failed: No space left on device" in line, line
    after = (folder / "metrics.csv").read_text()
    assert after.startswith(before[:before.index("\n") + 1])
    assert set(before.splitlines()) <= set(after.splitlines())  # the rows re-logged are the same rows
    assert json.loads((folder / "summary.json").read_text())["status"] == "failed"
    assert not (folder / "checkpoints" / "batched.pt.tmp").exists()


# ---------------------------------------------------------------- 3, 9: foreign, changed or damaged state

def test_a_checkpoint_of_another_folder_or_dim_is_refused(tmp_path):
    folder = toy_folder(tmp_path)
    other = toy_folder(tmp_path, "--seeds", "7,8", out="other")  # other seeds
    wider = toy_folder(tmp_path, "--dim", 6, out="wider")  # another --dim (9: a traceback before)
    for source in (other, wider):
        shutil.copy(source / "checkpoints" / "batched.pt", folder / "checkpoints" / "batched.pt")
        refused_unchanged(folder, "--steps", 40, match="batched.pt belongs to another run folder or config")


def test_an_edited_config_or_summary_is_refused(tmp_path):
    folder = toy_folder(tmp_path)
    config = folder / "config.yaml"
    original = config.read_text()
    config.write_text(yaml.safe_dump({**yaml.safe_load(original), "lr": 0.5}, sort_keys=False))  # a hand-edited lr
    refused_unchanged(folder, "--steps", 40, match="config.yaml was changed after its runs started")
    config.write_text(original)
    summary = json.loads((folder / "summary.json").read_text())
    next(iter(summary["runs"].values()))["steps_done"] = "abc"
    (folder / "summary.json").write_text(json.dumps(summary))
    refused_unchanged(folder, "--steps", 40, match="summary.json is damaged (run ")


@pytest.mark.parametrize("damage", ["deleted", "reordered", "cut before the checkpoint", "foreign run"])
def test_metrics_that_do_not_match_the_folder_are_refused(tmp_path, damage):
    folder = toy_folder(tmp_path)
    path = folder / "metrics.csv"
    header, *rows = path.read_text().splitlines(keepends=True)
    if damage == "deleted":
        path.unlink()
        match = "metrics.csv lacks rows summary.json records"
    elif damage == "reordered":
        path.write_text(header + "".join(reversed(rows)))
        match = "(rows reordered or repeated)"
    elif damage == "cut before the checkpoint":  # the summary still lags behind: only the checkpoint knows
        summary = json.loads((folder / "summary.json").read_text())
        for entry in summary["runs"].values():
            entry["final"]["step"], entry["steps_done"] = 5, 5
        (folder / "summary.json").write_text(json.dumps(summary))
        path.write_text(header + "".join(r for r in rows if int(r.split(",")[header.split(",").index("step")]) <= 5))
        match = "batched.pt is at step 20, but metrics.csv has 2 of the 4 rows"
    else:
        path.write_text(header + "".join(rows) + rows[-1].replace("-s1,", "-s9,", 1))
        match = "is not a run of this folder's config"
    refused_unchanged(folder, "--steps", 40, match=match)


def test_a_changed_data_file_is_refused(tmp_path):
    data = tmp_path / "data.svm"
    data.write_text("".join(f"{1 if i % 2 else -1} 1:{i / 10} 2:{(i * 7 % 5) / 5}\n" for i in range(40)))
    result = invoke("convex", "--data-file", data, "--train-size", 30, "--steps", 4, "--log-every", 2, "--eig-every", 2, "--seeds", 1,
                    "-o", "zo", "-q", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    folder = Path(result.stdout.strip())
    data.write_text(data.read_text().replace("1:0.1 ", "1:0.2 ", 1))
    refused_unchanged(folder, "--steps", 8, command="convex", match="is not the file the runs of")


def test_an_update_log_of_another_run_is_refused(tmp_path, tiny_mlm):
    args = ["finetune", "--model", tiny_mlm, "--task", "sst2", "--k", 2, "--steps", 4, "--log-every", 2,
            "--eval-every", 4, "--trace-every", 4, "--trace-probes", 1, "--max-length", 32, "-o", "zo", "--seeds", 2,
            "-q", "--out", tmp_path / "o"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    folder = Path(result.stdout.strip())
    logs = sorted((folder / "updates").iterdir())
    shutil.copy(logs[0], logs[1])
    refused_unchanged(folder, "--steps", 6, command="finetune", match="is the update log of another run or config")


# ---------------------------------------------------------------- 5-7: signals

# A Ctrl-C while the CLI imports torch (an import hook sends it then: no race with the start-up's speed).
AT_START_UP = """import os, signal, sys
class Hook:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, Hook())
sys.argv = ["zoflat", "toy", "--steps", "5", "-q", "--out", "o"]
from zoflat_cli.__main__ import main
main()
"""


def test_ctrl_c_at_start_up_is_one_line_and_version_is_instant(tmp_path):
    done = subprocess.run([sys.executable, "-c", AT_START_UP], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert done.returncode == 130 and done.stderr.strip().splitlines() == ["interrupted"], done
    assert not (tmp_path / "o").exists()
    done = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['zoflat', '--version']; "
                           "from zoflat_cli.__main__ import main; main(); print('torch' in sys.modules)"],
                          capture_output=True, text=True, env=ENV)
    assert done.stdout.split() == ["zoflat", "0.1.0", "False"], done


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT])
def test_every_stop_signal_stops_gracefully_and_resumes(tmp_path, signum):
    proc = spawn(*LONG_TOY, "--out", tmp_path, cwd=tmp_path)
    wait_for(lambda: any(rows_of(p.parent) >= 2 for p in tmp_path.glob("toy/*/metrics.csv")))
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    folder = Path(out.strip())
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert f"zoflat toy --resume {folder}" in err and signal.Signals(signum).name in err
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    # the checkpoint lies before the next logged step: two logs on is past it, however fast the toy ran
    done = max(run["steps_done"] for run in summary["runs"].values())
    early = invoke("toy", "--resume", folder, "--steps", done)  # refused unless it stopped right at a logged step
    assert early.exit_code == 0 or ("past --steps" in early.output and "or more" in early.output), early.output
    result = invoke("toy", "--resume", folder, "--steps", done + 2000)
    assert result.exit_code == 0, result.output
    with open(folder / "metrics.csv", newline="") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert steps == sorted(set(steps)) and steps[-1] == done + 2000  # (run_id, step) unique


def test_a_signal_while_exiting_is_acknowledged_not_a_traceback(tmp_path):
    """6: a stop signal during the interpreter's exit (atexit) used to print 'Exception ignored'."""
    code = ("import atexit, os, signal, sys, time\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))\n"
            f"sys.argv = ['zoflat', 'toy', '--steps', '5', '--dim', '3', '-q', '--out', {str(tmp_path)!r}]\n"
            "from zoflat_cli.__main__ import main\nmain()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0 and "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done
    assert "already stopping" in done.stderr


@pytest.mark.parametrize("launcher", [["local"], ["slurm", "--slurm-local"], ["ray"]])
def test_a_signal_to_the_sweep_driver_alone_reaches_its_jobs(tmp_path, launcher):
    """8: `kill` of the driver (not its process group): it forwards the stop, its jobs save and end,
    and it returns within seconds, every job cancelled and its run interrupted (resumable)."""
    pytest.importorskip({"local": "os", "slurm": "submitit", "ray": "ray"}[launcher[0]])
    proc = spawn("sweep", REPO / "recipes/toy/fig4.yaml", "-o", "zo", "--lambda", "0.1,0.05", "--seeds", 1,
                 "--steps", 400000, "--log-every", 1000, "--dim", 5, "--jobs", 2, "--out", tmp_path / "s", "-q",
                 "--launcher", *launcher)
    wait_for(lambda: sum(rows_of(p.parent) >= 2 for p in tmp_path.glob("s/sweep/*/jobs/*/toy/*/metrics.csv")) == 2)
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - began < 30 and proc.returncode == 130 and "Traceback" not in err, err
    folder, = tmp_path.glob("s/sweep/*")
    state = yaml.safe_load((folder / "sweep.yaml").read_text())
    assert {job["state"] for job in state["jobs"].values()} == {"cancelled"}
    for job in state["jobs"].values():
        assert json.loads((Path(job["folder"]) / "summary.json").read_text())["status"] == "interrupted"


# ---------------------------------------------------------------- 2, 10: sweep folders

def sweep_folder(tmp_path) -> Path:
    result = invoke("sweep", REPO / "recipes/toy/fig4.yaml", "-o", "zo", "--lambda", "0.1", "--seeds", 1, "--steps",
                    20, "--dim", 5, "--out", tmp_path / "s", "-q")
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip())


def test_a_sweep_folder_has_one_driver_and_a_checked_sweep_yaml(tmp_path):
    from zoflat_cli.runs.folder import lock_folder

    folder = sweep_folder(tmp_path)
    held = lock_folder(folder)
    assert "is being written by another zoflat process" in one_error_line(invoke("sweep", "--resume", folder))
    held.close()
    file = folder / "sweep.yaml"
    state = yaml.safe_load(file.read_text())
    for damaged, match in ((dict(state, command=None), "command None is not one of"),
                           ({k: v for k, v in state.items() if k != "cwd"}, "cwd None is not a folder"),
                           (dict(state, jobs={"x": 3}), "job 'x' is not a mapping"),
                           ([1, 2], "not a mapping")):
        file.write_text(yaml.safe_dump(damaged))
        assert match in one_error_line(invoke("sweep", "--resume", folder))
    file.write_text(yaml.safe_dump(state))


def test_sweep_resume_with_a_relative_path_from_another_folder(tmp_path, monkeypatch):
    folder = sweep_folder(tmp_path)
    state = yaml.safe_load((folder / "sweep.yaml").read_text())
    for job in state["jobs"].values():
        job["state"] = "queued"
        shutil.rmtree(job.pop("folder"))
    (folder / "sweep.yaml").write_text(yaml.safe_dump(state))
    monkeypatch.chdir(tmp_path / "s")
    result = invoke("sweep", "--resume", os.path.relpath(folder, tmp_path / "s"), "-q")
    assert result.exit_code == 0, result.output
    assert {j["state"] for j in yaml.safe_load((folder / "sweep.yaml").read_text())["jobs"].values()} == {"done"}


# ---------------------------------------------------------------- 4: data folders

def test_data_sample_refuses_to_overwrite_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    args = ["data", "sample", "--task", "sst2", "--num-train", 4, "--num-dev", 2, "--num-eval", 4, "--out", tmp_path]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    folder = Path(result.stdout.strip())
    (folder / "train.jsonl").write_text("edited by hand\n")
    assert "already holds files" in one_error_line(invoke(*args))
    assert (folder / "train.jsonl").read_text() == "edited by hand\n"
    assert invoke(*args, "--force").exit_code == 0 and (folder / "train.jsonl").read_text() != "edited by hand\n"

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    shutil.rmtree(folder)
    assert "No space left on device" in one_error_line(invoke(*args))
    assert not folder.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_data_kshot_refuses_to_overwrite(tmp_path):
    args = ["data", "kshot", "--task", "sst2", "--k", 2, "--seed", 13, "--out", tmp_path]
    assert invoke(*args).exit_code == 0
    assert "already holds files" in one_error_line(invoke(*args))
    assert invoke(*args, "--force").exit_code == 0


# ---------------------------------------------------------------- 12: decoder-task data, per field

RTE = {"premise": "A cat sat.", "hypothesis": "A cat exists.", "label": "entailment", "idx": 0}
COPA = {"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He sang.", "question": "cause", "label": 0,
        "idx": 0}
SQUAD = {"data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
    {"id": "1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]}]}]}]}


def squad_with(answers):
    document = json.loads(json.dumps(SQUAD))
    document["data"][0]["paragraphs"][0]["qas"][0]["answers"] = answers
    return json.dumps(document)


@pytest.mark.parametrize("task, file, text, match", [
    ("rte", "RTE/val.jsonl", json.dumps({**RTE, "hypothesis": None}) + "\n", "row 1: field 'hypothesis' is null"),
    ("rte", "RTE/val.jsonl", json.dumps({k: v for k, v in RTE.items() if k != "premise"}) + "\n", "no field"),
    ("rte", "RTE/val.jsonl", json.dumps([1, 2]) + "\n", "RTE/val.jsonl"),
    ("copa", "COPA/val.jsonl", json.dumps(RTE) + "\n" + json.dumps({**COPA, "label": 2}) + "\n", "row 1"),
    ("copa", "COPA/val.jsonl", json.dumps(COPA) + "\n" + json.dumps({**COPA, "label": 2}) + "\n",
     "row 2: label 2 is not one of its 2 options"),
    ("squad", "squad/dev-v1.1.json", squad_with([]), "row 1: no answer text (answers is empty)"),
    ("squad", "squad/dev-v1.1.json", squad_with([{"text": 5, "answer_start": 0}]), "row 1: a"),
])
def test_decoder_task_files_are_checked_per_field_before_any_folder(tmp_path, tiny_causal, task, file, text, match):
    (tmp_path / "d" / file).parent.mkdir(parents=True)
    (tmp_path / "d" / file).write_text(text)
    result = invoke("finetune", "--model", tiny_causal("gpt2"), "--task", task, "--data-dir", tmp_path / "d",
                    "--train-pool", "eval", "--num-train", 1, "--num-dev", 0, "--num-eval", 1, "--steps", 1,
                    "--out", tmp_path / "o")
    line = one_error_line(result)
    assert match in line and file in line, line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 13: trackers, before the folder

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once it is closed


@pytest.mark.parametrize("logger, env, match", [
    ("wandb", {"WANDB_MODE": "bogus"}, "WANDB_MODE=bogus is not one of"),
    ("wandb", {"WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:{port}"}, "cannot be reached"),
    ("mlflow", {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"}, "the tracking server"),
])
def test_a_tracker_that_cannot_work_is_one_line_in_seconds_before_the_folder(tmp_path, logger, env, match):
    pytest.importorskip(logger)
    port = closed_port()
    began = time.monotonic()
    result = invoke(*TOY, "--logger", logger, "--out", tmp_path, env={k: v.format(port=port) for k, v in env.items()})
    assert match in one_error_line(result) and time.monotonic() - began < 10
    assert not list(tmp_path.iterdir())


def test_a_broken_tracker_install_is_one_line(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "mlflow":
            raise RuntimeError("protobuf version mismatch")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    line = one_error_line(invoke(*TOY, "--logger", "mlflow", "--out", tmp_path))
    assert "mlflow is installed but fails to import (RuntimeError: protobuf version mismatch)" in line
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- 14: a terminal that cannot encode

@pytest.mark.parametrize("args", [["toy", "--help"], ["data", "list"], [*TOY, "--out", "runs-λ"]])
def test_output_degrades_on_an_ascii_terminal(tmp_path, args):
    done = subprocess.run([sys.executable, "-m", "zoflat_cli", *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**ENV, "PYTHONIOENCODING": "ascii", "ZOFLAT_DATA": str(tmp_path / "cache")})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    if "runs-λ" in args:
        assert done.stdout.strip().startswith("runs-\\u03bb/toy/")


# ---------------------------------------------------------------- 15: torchrun ranks share one config

def two_ranks(tmp_path, steps) -> list:
    """Rank 0 and rank 1 of a gloo group, as torchrun would start them, each with its --steps."""
    port = closed_port()
    procs = []
    for rank, n in enumerate(steps):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # a killed rank's folder
        procs.append(spawn("finetune", "--model", "tiny-gpt2", "--task", "rte", "--num-train", 16, "--num-dev", 2,
                           "--num-eval", 4, "--steps", n, "--log-every", 5, "--eval-every", 1000, "--trace-every", 1000,
                           "--device", "cpu", "-q", "--out", tmp_path / "o", env=env, cwd=tmp_path))
    return procs


def test_ranks_given_other_configs_stop_with_one_line(tmp_path):
    procs = two_ranks(tmp_path, [4, 6])
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2 and lines[-1].startswith("error: torchrun: rank 1 was given another config"), err
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_lost_peer_fails_the_run_with_one_line(tmp_path):
    first, second = two_ranks(tmp_path, [100000, 100000])
    wait_for(lambda: any(rows_of(p.parent) >= 2 for p in tmp_path.glob("o/finetune/*/metrics.csv")), timeout=180)
    second.kill()
    out, err = first.communicate(timeout=120)
    second.communicate()
    lines = [line for line in err.splitlines() if line.strip()]
    assert first.returncode == 1 and len(lines) == 1, err
    assert lines[0].startswith("error: data-parallel: a peer process was lost (") and "resumable" in lines[0]
    folder, = tmp_path.glob("o/finetune/*")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "failed"
    done = max(entry["steps_done"] for entry in summary["runs"].values())
    result = invoke("finetune", "--resume", folder, "--steps", done + 5, env={"WORLD_SIZE": "1"})  # resumable
    assert result.exit_code == 0, result.output
    assert json.loads((folder / "summary.json").read_text())["status"] == "completed"


# ---------------------------------------------------------------- 16: symlinked run folders

def test_table_follows_symlinked_run_folders(tmp_path):
    first, second = toy_folder(tmp_path, out="a"), toy_folder(tmp_path, out="b")
    (tmp_path / "both").mkdir()
    (tmp_path / "both" / "first").symlink_to(first)
    (tmp_path / "both" / "second").symlink_to(second)
    (tmp_path / "both" / "loop").symlink_to(tmp_path / "both")  # cut, not followed forever
    result = invoke("table", tmp_path / "both", "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(result.stdout.splitlines()))
    assert len(rows) == 2 and {row["loss_n"] for row in rows} == {"2"}, result.stdout  # 2 seeds
    # both folders were read: the second's runs are the first's (same settings and seeds), counted once
    assert "note: 4 runs repeat the settings and seed of a run in another folder: counted once" in result.stderr


# ---------------------------------------------------------------- memory: seed studies and the suite

# A command's peak resident memory: VmHWM of its own address space (ru_maxrss would count the parent's
# at fork, kept across exec by Linux: the test process's, not the command's).
PEAK = """import sys
sys.argv = {args!r}
from zoflat_cli.__main__ import main
try:
    main()
finally:
    status = open("/proc/self/status").read()
    print(status.split("VmHWM:")[1].split()[0], file=sys.stderr)
"""


def test_ten_thousand_toy_seeds_fit_in_a_gibibyte(tmp_path):
    """The direction stream draws blocks sized by bytes and by the steps asked for (it drew 2730 steps
    per block whatever --steps said: 3.4 GiB and 221 s)."""
    args = ["zoflat", "toy", "-o", "zo", "--seeds", "10000", "--dim", "6", "--steps", "20", "--log-every", "10", "-q",
            "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, "-c", PEAK.format(args=args)], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    peak = int(done.stderr.split()[-1]) * 1024
    assert peak < 1 << 30, peak
    assert rows_of(Path(done.stdout.strip())) == 10000 * 3
