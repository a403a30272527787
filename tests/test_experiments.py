"""Experiments as data: the registry, settings declared once, typed configs, the generated CLI, and
the one step-driving loop both runners use."""

import dataclasses
import sys
import textwrap

import pytest
import typer

from zoflat_cli import experiments
from zoflat_cli.cli import app, planned_config
from zoflat_cli.engine.loop import drive
from zoflat_cli.errors import ZoflatError
from zoflat_cli.experiments import registry
from zoflat_cli.experiments.experiment import table
from zoflat_cli.experiments.settings import SHARED, Setting


def test_the_registry_finds_the_paper_experiments_in_its_order():
    assert list(registry())[:3] == ["toy", "convex", "finetune"]


def test_a_new_module_with_an_experiment_is_found(tmp_path, monkeypatch):
    (tmp_path / "quadratic_demo.py").write_text(textwrap.dedent('''
        from zoflat_cli.experiments.experiment import Experiment, table
        from zoflat_cli.experiments.settings import Setting
        SETTINGS = table({"dim": Setting("int", 1, 10, default=3, help="d.")}, name="q", dtype="float64",
                         steps=5, log_every=1, seeds=[0], optimizer=["zo"], lr=0.1, **{"lambda": 0.1})
        EXPERIMENT = Experiment("quadratic-demo", "A demo.", SETTINGS, run=None)
    '''))
    monkeypatch.setattr(experiments, "__path__", [*experiments.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "zoflat_cli.experiments.quadratic_demo", raising=False)
    found = registry()
    assert list(found)[-1] == "quadratic-demo" and found["quadratic-demo"].resolve({}).dim == 3


@pytest.mark.parametrize("name", ["toy", "convex", "finetune"])
def test_every_setting_is_an_option_of_its_command_and_nothing_else_is(name):
    experiment = registry()[name]
    command = typer.main.get_command(app).commands[name]
    options = {p.name.rstrip("_") for p in command.params}
    invocation = {"config", "pairs", "betas", "resume", "quiet", "print_config", "dry_run"}
    assert options == set(experiment.settings) | invocation


@pytest.mark.parametrize("name", ["toy", "convex", "finetune"])
def test_typed_configs_are_frozen_and_round_trip_to_the_saved_mapping(name):
    experiment = registry()[name]
    mapping = experiment.resolve_mapping({})
    config = experiment.typed(mapping)
    assert config.to_dict() == mapping and config.command == name
    assert config.lambda_ == mapping["lambda"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 1


def test_a_shared_setting_replaced_keeps_its_place_and_help():
    steps = dataclasses.replace(SHARED["steps"], low=0)
    settings = table({"dim": Setting("int", default=1)}, steps=steps, seeds=[3])
    assert list(settings) == ["dim", *SHARED] and settings["steps"].low == 0
    assert settings["seeds"].default == [3] and settings["seeds"].help == SHARED["seeds"].help
    with pytest.raises(ValueError, match="not shared settings: dims"):
        table({}, dims=3)


def test_defaults_that_depend_on_the_choice():
    convex = registry()["convex"]
    assert convex.resolve({}).lambda_ == 0.005 and convex.resolve({"model": "logreg"}).lambda_ == 0.01
    own = convex.resolve({"data_file": "x.svm", "train_size": 10})
    assert own.dataset is None and own.train_size == 10


def test_bounds_come_from_the_table():
    finetune = registry()["finetune"]
    assert finetune.resolve({"steps": 0}).steps == 0  # finetune's own bound: evaluation only
    with pytest.raises(ZoflatError, match="steps must be >= 1"):
        registry()["toy"].resolve({"steps": 0})
    with pytest.raises(ZoflatError, match="trace_probes must be >= 1"):
        finetune.resolve({"trace_probes": 0})


def test_planning_a_sweep_runs_nothing(tmp_path):
    config = planned_config("toy", ["--steps", "7", "--lambda", "0.1,0.05", "--out", str(tmp_path)])
    assert config["steps"] == 7 and config["lambda"] == [0.1, 0.05] and config["command"] == "toy"
    assert not any(tmp_path.iterdir())


class Recorder:
    """A Stepper that records what drive() asks of it."""

    def __init__(self, stop_at=None, done_at=None):
        self.calls, self.stop_at, self.done_at = [], stop_at, done_at

    def log(self, step):
        self.calls.append(("log", step))
        return step != self.done_at

    def stopped(self, stop):
        return stop == "ask" and self.calls[-1][1] == self.stop_at

    def advance(self, step):
        self.calls.append(("advance", step))

    def checkpoint(self, step):
        self.calls.append(("checkpoint", step))


def test_drive_logs_steps_checkpoints_and_ends_at_the_last_step():
    runner = Recorder()
    assert drive(runner, 0, 5, log_every=2, checkpoint_every=3, stop=None) == (5, False)
    assert [c for c in runner.calls if c[0] == "log"] == [("log", 0), ("log", 2), ("log", 4), ("log", 5)]
    assert [c for c in runner.calls if c[0] == "checkpoint"] == [("checkpoint", 3)]
    assert [c[1] for c in runner.calls if c[0] == "advance"] == [0, 1, 2, 3, 4]


def test_drive_stops_on_request_before_stepping_and_when_no_run_goes_on():
    runner = Recorder(stop_at=2)
    assert drive(runner, 0, 10, 1, 0, stop="ask") == (2, True)
    assert runner.calls[-1] == ("log", 2)
    runner = Recorder(done_at=3)  # every run diverged at step 3
    assert drive(runner, 0, 10, 1, 0, stop=None) == (3, False) and runner.calls[-1] == ("log", 3)
    resumed = Recorder()
    assert drive(resumed, 4, 4, 1, 0, stop=None) == (4, False) and resumed.calls == [("log", 4)]
