"""Reliability through the real CLI: bad input is one `error:` line before any run folder exists;
the run folder's contract (append-only rows, strict JSON, a lock, a failed write that keeps every
earlier byte); numerical failures and closed pipes stay local; faults (kill -9, disk full) lose no
row. The numbers in comments refer to the audit's defect causes (issue 15)."""

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from zoflat_cli.cli import app
from zoflat_cli.runs import folder as runfolder

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
TOY = ["toy", "--steps", "20", "--log-every", "10", "--dim", "5", "--seeds", "1"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def folders(root: Path) -> list:
    return sorted(p.parent for p in Path(root).rglob("config.yaml"))


def one_error_line(result) -> str:
    """The result is a refusal: exit 2, exactly one `error:` line, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def strict_summary(folder: Path) -> dict:
    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    return json.loads((folder / "summary.json").read_text(), parse_constant=refuse)


# ---------------------------------------------------------------- bad input: one line, no folder

BAD = [
    (["--lr", "inf"], "lr must be a number"),  # 10
    (["--lambda", "inf"], "lambda must be a number"),
    (["--tilt", "inf"], "tilt must be a number"),
    (["--seeds", ""], "not a count"),  # tracebacks
    (["--seeds", "1099511627776,"], "seeds must be integers from 0"),
    (["--lr", "zoo=0.5"], "unknown optimizer 'zoo'"),  # 7
    (["--samples", "1000000000"], "samples must be <= 10000"),  # 16
    (["--dim", "1000000000"], "GiB of memory needed"),
    (["--steps", "abc"], "Invalid value for '--steps'"),  # Typer's usage errors
    (["--bogus"], "No such option: --bogus"),
    (["--name", "n" * 240], "name may hold 1 to 100"),
    (["--samples", "inf"], "samples must be an integer"),
    (["--rho", ""], "--rho: give a value"),  # also for a setting no optimizer of the run reads
    (["--lr", "gd="], "give a value for gd"),
    (["--lr", "zo=1,zo=2"], "gives zo twice"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a)[:30] for a, _ in BAD])
def test_bad_flags_are_one_line_before_any_folder(tmp_path, args, message):
    line = one_error_line(invoke(*TOY, "--out", tmp_path, *args))
    assert message in line
    assert not folders(tmp_path)


RECIPES = [
    (b"\x00\x01\xff\xfe", "not UTF-8"),
    ("name: caf\xe9\n".encode("latin-1"), "not UTF-8"),
    (b"1: 2\n", "a key must be a setting's name"),
    (b"dtype: [float32]\n", "dtype must be a text"),
    (b"out: 5\n", "out must be a path"),
    (b"name: null\n", "name may hold"),  # no folder ending in -None
    (b"lr: {zoo: 0.5}\n", "unknown optimizer 'zoo'"),  # 7
    (b"checkpoint_every: .inf\n", "checkpoint_every must be an integer"),
    (b"directions: null\n", "unknown directions None"),
]


@pytest.mark.parametrize("text,message", RECIPES, ids=[m for _, m in RECIPES])
def test_bad_recipes_are_one_line(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(text)
    out = [] if text.startswith(b"out:") else ["--out", tmp_path / "runs"]  # the flag would override it
    assert message in one_error_line(invoke(*TOY, "--config", recipe, *out))
    assert not folders(tmp_path)


def test_convex_cross_checks(tmp_path):
    data = tmp_path / "d.svm"
    data.write_text("+1 1:1\n-1 2:1\n" * 20)
    base = ["convex", "--features", 10, "--steps", 2, "--out", tmp_path]
    assert "--test-file needs --data-file" in one_error_line(invoke(*base, "--test-file", data))  # 6
    assert "multiple of log_every" in one_error_line(invoke(*base, "--eig-every", 3, "--log-every", 5))
    assert "GiB of memory needed" in one_error_line(invoke(*base, "--features", 10**8))  # 16
    assert not folders(tmp_path)


@pytest.mark.parametrize("line,message", [
    ("+1 1:nan", "not finite"),  # 8
    ("+1 1:inf", "not finite"),
    ("+1 2000000000:1", "beyond the 1,000,000 features"),  # 15
])
def test_svmlight_values_are_checked(tmp_path, line, message):
    data = tmp_path / "d.svm"
    data.write_text("+1 1:1\n-1 2:1\n" * 20 + line + "\n")
    result = invoke("convex", "--data-file", data, "--train-size", 20, "--steps", 2, "--out", tmp_path)
    assert message in one_error_line(result)


@pytest.mark.parametrize("name", ["../../x", "", "a/b", ".hidden"])
def test_import_names_are_plain(tmp_path, monkeypatch, name):  # 14
    monkeypatch.setenv("ZOFLAT_DATA", str(tmp_path / "cache"))
    data = tmp_path / "d.svm"
    data.write_text("+1 1:1\n-1 2:1\n" * 20)
    assert "data set name" in one_error_line(invoke("data", "import", data, "--name", name))
    assert not any(p.is_file() for p in tmp_path.rglob("*") if p != data)


def test_an_imported_set_is_usable_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOFLAT_DATA", str(tmp_path / "cache"))
    data = tmp_path / "d.svm"
    data.write_text("+1 1:1 3:0.5\n-1 2:1\n+1 1:0.5\n-1 3:1\n" * 10)
    assert invoke("data", "import", data, "--name", "mydata").exit_code == 0
    assert "mydata" in invoke("data", "list").output
    result = invoke("convex", "--dataset", "mydata", "--train-size", 30, "--features", 10, "--steps", 2,
                    "--log-every", 1, "--eig-every", 0, "--out", tmp_path, "-q")
    assert result.exit_code == 0, result.output
    assert "no imported test file" in one_error_line(invoke("convex", "--dataset", "mydata", "--out", tmp_path))


@pytest.mark.parametrize("train,message", [
    ("1,good\n0,\n", "line 2: empty sentence"),  # 9: never the text "nan"
    ("1,good\n7,bad\n", "line 2: label '7' is not one of"),
    ("1,good\njust text\n", "line 2: label 'just text' is not one of"),
    ("", "not a label,sentence csv"),
])
def test_text_data_is_checked(tmp_path, tiny_mlm, train, message):
    (tmp_path / "d" / "trec").mkdir(parents=True)
    (tmp_path / "d" / "trec" / "train.csv").write_text(train * 3 if train else "")
    (tmp_path / "d" / "trec" / "test.csv").write_text("1,test\n")
    result = invoke("finetune", "--task", "trec", "--model", tiny_mlm, "--data-dir", tmp_path / "d", "--out", tmp_path)
    assert message in one_error_line(result)
    assert not folders(tmp_path)


def test_max_length_beyond_the_model_is_refused_before_the_folder(tmp_path, tiny_mlm):
    result = invoke("finetune", "--model", tiny_mlm, "--k", 2, "--max-length", 5000, "--out", tmp_path)
    assert "beyond the 138 positions" in one_error_line(result)
    assert not folders(tmp_path)


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_out_that_cannot_hold_folders(tmp_path, where):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    out = blocker if where == "file" else blocker / "sub"
    assert "cannot make a run folder there" in one_error_line(invoke(*TOY, "--out", out))


def test_kshot_seed_range(tmp_path):
    result = invoke("data", "kshot", "--task", "trec", "--out", tmp_path, "--seed", 1099511627776)
    assert "--seed must be <= 4294967295" in one_error_line(result)


# ---------------------------------------------------------------- property-based fuzz

VALUES = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                   st.sampled_from(["inf", "-1", "0", "1e400", "nan", "zo=1", "gd=", ",", "1,2", "zo,gd"]))
FLAGS = ["--steps", "--log-every", "--dim", "--seeds", "--lr", "--lambda", "--rho", "--tilt", "--samples",
         "--momentum", "--beta1", "--beta2", "--weight-decay", "--betas", "--directions", "--update", "--optimizer",
         "--dtype", "--device", "--name", "--checkpoint-every", "--pairs"]
KEYS = ["steps", "log_every", "dim", "seeds", "lr", "lambda", "samples", "optimizer", "dtype", "name", "directions",
        "update", "momentum", "checkpoint_every", "device", "pairs"]
SMALL = ["--steps", "4", "--log-every", "2", "--dim", "3"]
SIZES = ("steps", "dim", "seeds", "samples", "pairs")  # a valid large value would only make the test slow


def _small_enough(key: str, value) -> bool:
    try:
        return key.strip("-").replace("-", "_") not in SIZES or float(str(value).split(",")[0]) <= 50
    except ValueError:
        return True


def _fuzz_check(tmp_path, result):
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 2), result.output
    made = folders(tmp_path)
    if result.exit_code == 2:
        one_error_line(result)
        assert not made
    for folder in made:
        assert strict_summary(folder)["status"] != "running"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(FLAGS), value=VALUES)
def test_fuzz_flags_never_trace_back_or_leave_half_folders(tmp_path_factory, flag, value):
    assume(_small_enough(flag, value))
    tmp = tmp_path_factory.mktemp("fuzz")
    _fuzz_check(tmp, invoke("toy", *SMALL, "--out", tmp, "-q", flag, value))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=st.one_of(VALUES, st.lists(VALUES, max_size=3), st.none(), st.booleans(),
                                                   st.dictionaries(st.text(max_size=4), VALUES, max_size=2)))
def test_fuzz_recipes_never_trace_back_or_leave_half_folders(tmp_path_factory, key, value):
    import yaml

    assume(all(_small_enough(key, v) for v in (value if isinstance(value, list) else [value])))
    tmp = tmp_path_factory.mktemp("fuzz")
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump({"steps": 4, "dim": 3, "log_every": 2, key: value}))
    _fuzz_check(tmp, invoke("toy", "--config", recipe, "--out", tmp, "-q"))


# ---------------------------------------------------------------- the run-folder contract

def test_summary_is_strict_json_when_runs_diverge(tmp_path):  # 2, 12
    result = invoke("toy", "-o", "gd,zo", "--lr", "gd=0.3", "--steps", 2000, "--seeds", 2, "--out", tmp_path, "-q")
    assert result.exit_code == 0, result.output
    summary = strict_summary(folders(tmp_path)[0])
    statuses = {run_id: entry["status"] for run_id, entry in summary["runs"].items()}
    assert {s for r, s in statuses.items() if r.startswith("gd")} == {"diverged"}
    assert {s for r, s in statuses.items() if r.startswith("zo")} == {"completed"}  # the others go on


def test_a_numerical_exception_marks_only_its_run_diverged(tmp_path, monkeypatch):
    import torch

    from zoflat_cli.problems.toy import ToyProblem

    original = ToyProblem.lambda_max

    def fragile(self, x):  # a solver that fails on one run's large values
        if (x.abs() > 1e3).any():
            raise torch.linalg.LinAlgError("did not converge")
        return original(self, x)

    monkeypatch.setattr(ToyProblem, "lambda_max", fragile)
    result = invoke("toy", "-o", "gd,zo", "--lr", "gd=0.3", "--steps", 2000, "--seeds", 2, "--out", tmp_path, "-q")
    assert result.exit_code == 0, result.output
    runs = strict_summary(folders(tmp_path)[0])["runs"]
    assert {r: e["status"] for r, e in runs.items() if r.startswith("gd")} == {
        "gd-lr0.3-s0": "diverged", "gd-lr0.3-s1": "diverged"}
    assert all(e["status"] == "completed" for r, e in runs.items() if r.startswith("zo"))


def test_a_run_folder_has_one_writer(tmp_path):  # 13
    folder = tmp_path / "f"
    folder.mkdir()
    held = runfolder.lock_folder(folder)
    try:
        with pytest.raises(runfolder.ZoflatError, match="another zoflat process"):
            runfolder.lock_folder(folder)
    finally:
        held.close()
    runfolder.lock_folder(folder).close()  # free again once the first writer is gone


class FullDisk:
    """metrics.csv's file, failing with ENOSPC once `limit` bytes have gone through it."""

    def __init__(self, file, limit: int):
        self.file, self.left = file, limit

    def write(self, data):
        self.left -= len(data)
        if self.left < 0:
            self.file.write(data[: len(data) // 2])  # a partial write, as a full disk leaves it
            self.file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


@pytest.mark.parametrize("limit", [3_000, 20_000, 60_000])
def test_disk_full_keeps_every_whole_row_and_marks_the_folder_failed(tmp_path, monkeypatch, limit):  # 3
    """A patched writer raising ENOSPC at several points (test_fault_disk_full_on_tmpfs does it
    on a real full file system where it can mount one)."""
    original_log = runfolder.RunFolder.on_log
    state = {"armed": False}

    def on_log(self, step, rows, states):
        if not state["armed"] and self._writer is not None:
            self._csv_file = FullDisk(self._csv_file, limit)
            self._writer = csv.DictWriter(self._csv_file, fieldnames=self._writer.fieldnames, extrasaction="ignore")
            state["armed"] = True
        return original_log(self, step, rows, states)

    monkeypatch.setattr(runfolder.RunFolder, "on_log", on_log)
    result = invoke("toy", "--steps", 100000, "--log-every", 10, "--dim", 5, "--seeds", 2, "--out", tmp_path)
    monkeypatch.undo()
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith("error: writing metrics.csv "
                                                                                        "failed: No space left")
    folder = folders(tmp_path)[0]
    summary = strict_summary(folder)
    assert summary["status"] == "failed" and "No space left" in summary["error"]
    text = (folder / "metrics.csv").read_text()
    assert text.endswith("\n") and all(line.count(",") == text.splitlines()[0].count(",") for line in text.splitlines())
    assert invoke("plot", folder).exit_code == 0
    resumed = invoke("toy", "--resume", folder, "--steps", 3000, "-q")
    assert resumed.exit_code == 0, resumed.output
    assert strict_summary(folder)["status"] == "completed"


def test_fault_disk_full_on_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", mount], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        done = _zoflat("toy", "--steps", 100000, "--log-every", 10, "--dim", 5, "--seeds", 3, "--out", mount)
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("error: writing") and "Traceback" not in done.stderr
        folder = folders(mount)[0]
        assert strict_summary(folder)["status"] == "failed"
        assert (folder / "metrics.csv").read_bytes().endswith(b"\n")
    finally:
        subprocess.run(["umount", mount], capture_output=True)


def test_resume_keeps_the_rows_of_runs_that_finished_before_a_kill(tmp_path):  # 1
    folder = Path(invoke("toy", "-o", "zo,gd", "--steps", 40, "--log-every", 10, "--dim", 5, "--out", tmp_path,
                         "-q").output.strip())
    lines = (folder / "metrics.csv").read_text().splitlines(keepends=True)
    zo_rows = [line for line in lines if line.startswith("zo-")]
    # as if killed after zo finished and before gd logged: gd's rows gone, summary still running
    (folder / "metrics.csv").write_text("".join(line for line in lines if not line.startswith("gd-")))
    summary = json.loads((folder / "summary.json").read_text())
    summary["status"] = "running"
    summary["runs"] = {k: v for k, v in summary["runs"].items() if k.startswith("zo")}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "checkpoints" / "batched.pt").unlink()
    assert invoke("toy", "--resume", folder, "-q").exit_code == 0
    after = (folder / "metrics.csv").read_text()
    wall = lines[0].split(",").index("wall_s")  # the one column that depends on the machine's load

    def timeless(row):
        return [v for i, v in enumerate(row.rstrip("\n").split(",")) if i != wall]
    assert all(timeless(row) in map(timeless, after.splitlines()) for row in zo_rows[:1])  # step 0 never vanishes
    assert sum(line.startswith("gd-") for line in after.splitlines()) == 5


def test_readers_tolerate_a_torn_last_row(tmp_path):
    folder = Path(invoke("toy", "-o", "zo", "--steps", 40, "--log-every", 10, "--dim", 5, "--out", tmp_path, "-q",
                         "--checkpoint-every", 20).output.strip())
    whole = (folder / "metrics.csv").read_bytes()
    with open(folder / "metrics.csv", "ab") as f:
        f.write(b"zo-lr0.001-s13,zo,sg")  # killed mid-row
    assert invoke("plot", folder).exit_code == 0
    assert runfolder.complete_metrics(folder).encode() == whole
    with open(folder / "metrics.csv", "ab") as f:
        f.write(b"\nzo,1\n" + whole.splitlines(keepends=True)[-1])  # damage before the last row
    assert "damaged at line" in one_error_line(invoke("plot", folder))


@pytest.mark.parametrize("name,content,message", [
    ("summary.json", b"[]", "not a zoflat summary"),
    ("summary.json", b"{\"runs\": ", "is damaged"),
    ("metrics.csv", bytes(range(256)), "not UTF-8"),
    ("checkpoints/batched.pt", b"not a checkpoint", "batched.pt is damaged"),
])
def test_resume_and_plot_on_damaged_folders_are_one_line(tmp_path, name, content, message):
    folder = Path(invoke("toy", "-o", "zo", "--steps", 40, "--log-every", 10, "--dim", 5, "--out", tmp_path,
                         "-q").output.strip())
    (folder / name).write_bytes(content)
    assert message in one_error_line(invoke("toy", "--resume", folder, "--steps", 80))
    if name != "checkpoints/batched.pt":
        assert message in one_error_line(invoke("plot", folder))


def test_plot_with_out_keeps_same_named_folders_apart(tmp_path):
    for parent in ("a", "b"):
        folder = Path(invoke("toy", "-o", "zo", "--steps", 20, "--log-every", 10, "--dim", 5, "--out", tmp_path / parent,
                             "-q", "--name", "same").output.strip())
        folder.rename(folder.with_name("same"))
    result = invoke("plot", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "figs")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "figs").glob("*.png"))) == 2


# ---------------------------------------------------------------- signals, pipes, kill -9

def _zoflat(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "zoflat_cli", *map(str, args)], capture_output=True, text=True,
                          env=env, **kwargs)


def _start(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "zoflat_cli", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def _wait_for_rows(folder_root: Path, rows: int, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(folder_root.rglob("metrics.csv"))
        if found and found[0].read_text().count("\n") > rows:
            return found[0].parent
        time.sleep(0.1)
    raise AssertionError("no rows logged")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_mark_toy_runs_interrupted(tmp_path, sig):  # 11
    proc = _start("toy", "--steps", 10**7, "--dim", 5, "--out", tmp_path, "-q")
    folder = _wait_for_rows(tmp_path, 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err
    assert strict_summary(folder)["status"] == "interrupted"


def test_a_closed_stdout_never_stops_training(tmp_path):  # 5
    proc = _start("toy", "--seeds", 40, "--steps", 3000, "--log-every", 10, "--dim", 5, "--out", tmp_path)
    proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and b"Traceback" not in err and b"Exception ignored" not in err
    summary = strict_summary(folders(tmp_path)[0])
    assert summary["status"] == "completed" and len(summary["runs"]) == 120


def _rows_without_wall(folder: Path) -> list:
    lines = (folder / "metrics.csv").read_text().splitlines()
    wall = lines[0].split(",").index("wall_s")
    return sorted(",".join(c for i, c in enumerate(line.split(",")) if i != wall) for line in lines)


@pytest.mark.parametrize("command,seed", [("toy", 0), ("toy", 1), ("convex", 0)])
def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, command, seed):
    args = {"toy": ["toy", "--steps", 15000, "--log-every", 250, "--dim", 20, "--seeds", 2, "-o", "gd,zo-adam",
                    "--checkpoint-every", 1500],
            "convex": ["convex", "--dataset", "a8a", "--train-size", 2000, "--features", 300, "--steps", 1000,
                       "--log-every", 50, "--eig-every", 250, "--checkpoint-every", 75, "-o", "gd,zo"]}[command]
    straight = _zoflat(*args, "--out", tmp_path / "a", "-q")
    assert straight.returncode == 0, straight.stderr
    proc = _start(*args, "--out", tmp_path / "b", "-q")
    folder = _wait_for_rows(tmp_path / "b", 3 + 5 * seed)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    summary = folder / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] == "running"  # killed mid-run
    before = (folder / "metrics.csv").read_text()
    whole = before[: before.rfind("\n") + 1].splitlines()
    assert _zoflat("plot", folder).returncode == 0
    resumed = _zoflat(command, "--resume", folder, "-q")
    assert resumed.returncode == 0, resumed.stderr
    after = (folder / "metrics.csv").read_text().splitlines()
    assert whole[0] == after[0] and len(after) >= len(whole)
    assert _rows_without_wall(folder) == _rows_without_wall(folders(tmp_path / "a")[0])
