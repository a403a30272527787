"""The real `zoflat` command, end to end, on tiny inputs."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from zoflat_cli.cli import app
from zoflat_cli.optim.presets import HYPERPARAMETERS

REPO = Path(__file__).resolve().parents[1]
# README: the settings, one column per hyperparameter of the optimizer table, then the metrics
DOCUMENTED_COLUMNS = ["run_id", "optimizer", "update", "directions", *HYPERPARAMETERS, "lr", "seed", "samples", "step",
                      "wall_s", "n_evals", "loss", "hessian_trace", "lambda_max", "grad_norm", "balance", "balance_theory"]
runner = CliRunner()


def zoflat(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def only_run_folder(parent: Path) -> Path:
    (folder,) = (parent / "toy").iterdir()
    return folder


def test_toy_writes_the_documented_run_folder(tmp_path):
    zoflat("toy", "--dim", 10, "--steps", 200, "--log-every", 50, "--seeds", 2,
           "--lambda", "0.1,0.05", "--lr", "gd=0.01", "--out", tmp_path, "--name", "smoke")
    folder = only_run_folder(tmp_path)
    assert folder.name.endswith("Z-smoke")
    df = pd.read_csv(folder / "metrics.csv")
    assert list(df.columns) == DOCUMENTED_COLUMNS
    # gd x 2 seeds, zo x 2 λ x 2 seeds, dd x 2 seeds; logged at 0, 50, ..., 200
    assert df["run_id"].nunique() == 8 and sorted(df["step"].unique()) == [0, 50, 100, 150, 200]
    assert set(df.loc[df.optimizer == "gd", "lr"]) == {0.01}
    assert set(df.loc[df.optimizer == "zo", "lr"]) == {0.001}
    assert df.loc[df.optimizer == "gd", "lambda"].isna().all()
    assert (df.loc[(df.optimizer == "zo") & (df.step == 200), "n_evals"] == 400).all()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert {r["status"] for r in summary["runs"].values()} == {"completed"}
    assert summary["references"]["hessian_trace"]["value"] == 2.0
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["lambda"] == [0.1, 0.05] and config["lr"] == {"gd": 0.01, "zo": 0.001, "dd": 0.001}


def test_saved_config_reruns_to_the_same_csv(tmp_path):
    zoflat("toy", "--dim", 6, "--steps", 100, "--log-every", 20, "--seeds", "3,4",
           "--out", tmp_path / "a", "--quiet")
    first = only_run_folder(tmp_path / "a")
    zoflat("toy", "--config", first / "config.yaml", "--out", tmp_path / "b", "--quiet")
    second = only_run_folder(tmp_path / "b")
    a, b = (pd.read_csv(f / "metrics.csv").drop(columns="wall_s") for f in (first, second))
    pd.testing.assert_frame_equal(a, b)


def test_recipe_then_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("command: toy\ndim: 4\nsteps: 30\nlog_every: 10\noptimizer: [zo]\n"
                      "lambda: [0.1, 0.2]\nseeds: [5]\n")
    zoflat("toy", "--config", recipe, "--lambda", "0.3", "--out", tmp_path, "--quiet")
    df = pd.read_csv(only_run_folder(tmp_path) / "metrics.csv")
    assert set(df["lambda"]) == {0.3} and set(df["seed"]) == {5} and df["step"].max() == 30


def test_plot_writes_figures_for_a_parent_folder(tmp_path):
    zoflat("toy", "--dim", 6, "--steps", 60, "--log-every", 20, "--seeds", 2, "--out", tmp_path, "--quiet")
    result = zoflat("plot", tmp_path)
    folder = only_run_folder(tmp_path)
    assert (folder / "figure.png").stat().st_size > 10_000 and (folder / "figure.pdf").is_file()
    assert str(folder / "figure.png") in result.output
    zoflat("plot", folder, "--out", tmp_path / "figs")
    assert (tmp_path / "figs" / f"{folder.name}.png").is_file()


def test_plot_of_the_current_folder_is_named_after_it(tmp_path, monkeypatch):
    zoflat("toy", "--dim", 6, "--steps", 20, "--log-every", 10, "--out", tmp_path, "--quiet")
    folder = only_run_folder(tmp_path)
    monkeypatch.chdir(folder)
    zoflat("plot", ".", "--out", tmp_path / "figs")
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [f"{folder.name}.pdf", f"{folder.name}.png"]


def test_a_damaged_summary_is_a_one_line_error_and_the_metrics_stay(tmp_path):
    zoflat("toy", "--dim", 3, "--steps", 5, "--log-every", 5, "--out", tmp_path, "--quiet")
    folder = only_run_folder(tmp_path)
    (folder / "summary.json").write_text("{cut off")
    metrics = (folder / "metrics.csv").read_bytes()
    result = runner.invoke(app, ["plot", str(folder)])
    assert result.exit_code == 2 and "summary.json is damaged" in result.output
    assert len(result.output.strip().splitlines()) == 1 and (folder / "metrics.csv").read_bytes() == metrics


def test_run_folders_are_never_reused(tmp_path):
    for _ in range(2):
        zoflat("toy", "--dim", 3, "--steps", 5, "--log-every", 5, "--out", tmp_path, "--name", "same", "--quiet")
    assert len(list((tmp_path / "toy").iterdir())) == 2


def test_version():
    assert "zoflat 0.1.0" in zoflat("--version").output


HEAVY = ("torch", "transformers", "pandas", "matplotlib", "scipy", "numpy")


@pytest.mark.parametrize("args", [["--help"], ["toy", "--help"], ["convex", "--help"], ["finetune", "--help"],
                                  ["flatness", "--help"], ["toy", "--optimizer", "zoo"], ["convex", "--model", "x"],
                                  ["finetune", "--steps", "-1"], ["toy", "--measures", "nope"]])
def test_help_and_bad_input_import_no_heavy_module(args):
    """Start-up stays fast (README: under 0.5 s): the help and a refusal never import torch, numpy, pandas,
    matplotlib or transformers (`python -X importtime -m zoflat_cli --help` shows the rest)."""
    code = (f"import sys\nsys.argv = ['zoflat', *{args!r}]\nfrom zoflat_cli.__main__ import main\n"
            f"try:\n    main()\nexcept SystemExit:\n    pass\n"
            f"print('loaded:', *sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.splitlines()[-1] == "loaded:", result.stdout[-300:] + result.stderr
    assert ("error:" in result.stderr) != ("--help" in args)


def test_every_option_of_every_command_is_in_a_help_panel_and_shows_its_default():
    from zoflat_cli.cli import EXPERIMENTS, INVOCATION, PANEL_OF

    for experiment in EXPERIMENTS.values():
        assert not set(experiment.settings) - set(PANEL_OF), experiment.name
    assert not set(INVOCATION) - set(PANEL_OF)
    text = runner.invoke(app, ["toy", "--help"], env={"COLUMNS": "200"}).output
    for panel in ("Model", "Optimizer", "Run control", "Output", "Flatness measures"):
        assert f"─ {panel} ─" in text
    assert "[default: 100000]" in text and "[default: gd=0.01, zo=0.001, dd=0.001, ...]" in text
    assert "<list[str]>" not in text and "[OPT=]NUMBER" in text


def test_print_config_and_dry_run_write_nothing(tmp_path):
    out = zoflat("toy", "--lr", "0.001", "--lr", "gd=0.01", "--optimizer", "gd,zo,lozo", "--seeds", 2,
                 "--steps", 30, "--out", tmp_path, "--print-config").output
    config = yaml.safe_load(out)
    assert config["lr"] == {"gd": 0.01, "zo": 0.001, "lozo": 0.001}  # README: a plain value for the others
    assert config["steps"] == 30 and config["seeds"] == [0, 1]
    plan = zoflat("toy", "--optimizer", "gd,zo,mezo-svrg", "--steps", 100, "--period", 10, "--out", tmp_path,
                  "--dry-run").output.splitlines()
    assert [line.split()[0] for line in plan[:-1]] == ["gd-lr0.01-s13", "zo-lam0.1-lr0.001-s13",
                                                        "mezo-svrg-lam0.1-T10-lr0.001-s13"]
    # by hand: gd one gradient a step; zo two losses; SVRG 2 at each of 10 anchors, 4 at the 90 other steps
    assert [line.split()[1] for line in plan[:-1]] == ["100", "200", "380"]
    assert "680 oracle calls in all" in plan[-1]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["toy", "--lambda", "-1"], "lambda must be > 0"),
        (["toy", "--optimizer", "nope"], "unknown optimizer 'nope'"),
        (["toy", "--config", "missing.yaml"], "recipe not found: missing.yaml"),
        (["toy", "--config", "{recipe}"], "unknown key 'lamda' (did you mean 'lambda'?)"),
        (["toy", "--lr", "zo=-1"], "lr must be >= 0"),
        (["toy", "--seeds", "x"], "--seeds"),
        (["plot", "{empty}"], "no run folders"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("lamda: 0.1\n")
    (tmp_path / "empty").mkdir()
    args = [a.format(recipe=recipe, empty=tmp_path / "empty") for a in args]
    proc = subprocess.run([sys.executable, "-m", "zoflat_cli", *args, "--out", str(tmp_path / "runs")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "runs").exists()  # nothing is created for a rejected config


def test_composing_an_optimizer_from_flags(tmp_path):
    """A preset plus --update, --directions and the rule's hyperparameters, per optimizer and as sweeps."""
    zoflat("toy", "--dim", 4, "--steps", 20, "--log-every", 10, "-o", "zo,gd", "--update", "zo=adam",
           "--betas", "0.8,0.99", "--directions", "rademacher,sphere", "--weight-decay", "gd=0,0.1",
           "--out", tmp_path)
    df = pd.read_csv(only_run_folder(tmp_path) / "metrics.csv")
    assert set(df["run_id"]) == {"zo-rademacher-adam-lam0.1-b10.8-b20.99-lr0.001-s13",
                                 "zo-sphere-adam-lam0.1-b10.8-b20.99-lr0.001-s13",
                                 "gd-lr0.01-s13", "gd-wd0.1-lr0.01-s13"}
    zo = df[df.optimizer == "zo"]
    assert set(zo["update"]) == {"adam"} and set(zo["beta1"]) == {0.8} and set(zo["directions"]) == {"rademacher", "sphere"}
    assert df[df.optimizer == "gd"]["directions"].isna().all() and set(df["weight_decay"].dropna()) == {0.0, 0.1}


@pytest.mark.parametrize("args, message", [
    (["--update", "nesterov"], "unknown update 'nesterov'"),
    (["--momentum", "1.5", "-o", "zo-momentum"], "momentum must be < 1"),
    (["--betas", "0.9"], "--betas: give 2 numbers"),
    (["-o", "zo-cons", "--weight-decay", "0.1"], "the conservative update takes no weight decay"),
    (["--lr", "zoo=0.5"], "lr names an unknown optimizer 'zoo' (did you mean 'fzoo' or 'zo'?)"),
])
def test_bad_optimizer_flags_are_one_line(tmp_path, args, message):
    result = runner.invoke(app, ["toy", "--steps", "2", "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "toy").exists()


def on_a_terminal(columns: int, *args) -> tuple:
    """(exit code, the text shown) of `zoflat args` on a pseudo-terminal `columns` wide."""
    import fcntl
    import os
    import pty
    import re
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, "-m", "zoflat_cli", *map(str, args)], stdin=slave, stdout=slave,
                            stderr=slave, env={**env, "TERM": "xterm-256color"}, cwd=REPO)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # the command ended and closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))
    return proc.wait(), text.replace("\r", "\n")


@pytest.mark.parametrize("columns", [80, 200])
def test_the_live_view_fits_the_terminal_and_lists_every_run(tmp_path, columns):
    code, text = on_a_terminal(columns, "toy", "--dim", 5, "--steps", 2000, "--log-every", 100, "--seeds", 2,
                               "-o", "gd,zo,zo-adam,mezo-svrg", "--lambda", "0.05", "--out", tmp_path)
    assert code == 0, text
    lines = [line for line in text.splitlines() if not line.startswith("completed: ")]  # the view's, not the path
    assert max(map(len, lines)) <= columns and lines[0].startswith("zoflat toy · ")
    header = [line.split() for line in lines if line.strip().startswith("run ")][-1]
    assert header[:4] == ["run", "step", "status", "loss"] and ("ETA" in header) == (columns == 200)
    rows = [line.split() for line in lines if line.strip().startswith(("gd-", "zo-", "mezo-svrg-"))][-8:]
    assert len({row[0] for row in rows}) == 8 and all(row[1] == "2000/2000" and row[2] == "completed" for row in rows)
    assert not any("…" in cell for row in rows for cell in row[1:])  # cells are whole numbers, never cut
    assert any(line.startswith("elapsed ") and " · ETA " in line for line in lines)


def test_the_live_view_lists_every_run_before_the_first_log_and_says_what_is_being_evaluated():
    import io

    from rich.console import Console

    from zoflat_cli.engine.live import LiveView
    from zoflat_cli.engine.loop import RunState

    console = Console(width=80, file=io.StringIO(), force_terminal=True, color_system=None)
    states = {"zo-lam0.002-lr1e-05-s0": RunState("running"), "gd-lr5e-05-s0": RunState("queued")}
    view = LiveView("zoflat finetune · runs/finetune/x", 1000, console=console, sequential=True, states=states)
    view.activity("step 0: Hessian trace, probe 3/10: train 2/4")
    console.print(view)
    shown = console.file.getvalue().splitlines()
    rows = [line.split() for line in shown if line.strip().startswith(("zo-", "gd-"))]
    assert [row[:3] for row in rows] == [["zo-lam0.002-lr1e-05-s0", "0/1000", "running"],
                                         ["gd-lr5e-05-s0", "0/1000", "queued"]]
    assert shown[-1].startswith("elapsed 0:00 · ETA ? · step 0: Hessian trace, probe 3/10: train 2/4")
    row = {"run_id": "zo-lam0.002-lr1e-05-s0", "step": 0, "wall_s": 1.0, "n_evals": 0, "loss": 0.69,
           "hessian_trace": 790.8}
    view.on_log(0, [row], states)
    view.on_log(10, [{**row, "step": 10, "wall_s": 6.0, "hessian_trace": None}], states)
    assert view._cell("zo-lam0.002-lr1e-05-s0", "hessian_trace") == "790.8@0"  # carried with its step
    assert view.rate("zo-lam0.002-lr1e-05-s0") == 2.0 and view.eta("zo-lam0.002-lr1e-05-s0") == 495.0
    assert view.invocation_eta() == 495.0 + 1 * 1000 / 2.0  # the queued run at the same speed
