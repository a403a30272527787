"""Recipes + flags -> one validated config -> the grid of runs."""

from pathlib import Path

import pytest

from zoflat_cli.errors import ZoflatError
from zoflat_cli.experiments import registry
from zoflat_cli.experiments.settings import load_recipe, parse_flag, parse_seeds, runs_from
from zoflat_cli.experiments.toy import EXPERIMENT as TOY
from zoflat_cli.optim.presets import PRESETS

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


def test_per_optimizer_pairs_in_one_flag():
    assert parse_flag("lr", ["zo=1e-3,2e-3,gd=0.01"]) == {"zo": [1e-3, 2e-3], "gd": 0.01}
    assert parse_flag("lr", ["zo=1e-3", "gd=0.01"]) == parse_flag("lr", ["zo=1e-3,gd=0.01"])


def test_flag_forms():
    assert parse_flag("lr", ["0.01"]) == 0.01
    assert parse_flag("lambda", ["0.1,0.05"]) == [0.1, 0.05]
    assert parse_flag("lambda", ["0.1", "0.05"]) == [0.1, 0.05]
    assert parse_flag("lr", ["gd=0.01", "zo=0.001,0.002"]) == {"gd": 0.01, "zo": [0.001, 0.002]}
    with pytest.raises(ZoflatError, match="not a number"):
        parse_flag("lr", ["fast"])
    mixed = parse_flag("lr", ["0.1", "gd=0.2"])  # a plain value is every other optimizer's
    assert mixed["gd"] == 0.2 and mixed["zo"] == mixed["sam"] == 0.1 and set(mixed) == set(PRESETS)


def test_optimizers_are_repeatable_or_comma_separated():
    assert TOY.resolve_mapping({"optimizer": ["sam,zo", "gd"]})["optimizer"] == ["sam", "zo", "gd"]


def test_seeds_are_a_count_or_a_list():
    assert parse_seeds(3) == [0, 1, 2]
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("13,21") == [13, 21]
    assert parse_seeds("13,") == [13]
    assert parse_seeds([13, 13, 4]) == [13, 4]
    for bad in (0, "-1,", [1.5], [], True):
        with pytest.raises(ZoflatError):
            parse_seeds(bad)


def test_defaults_are_the_papers_setting():
    config = TOY.resolve_mapping({})
    assert (config["dim"], config["steps"], config["lambda"]) == (100, 100_000, 0.1)
    assert config["lr"] == {"gd": 0.01, "zo": 0.001, "dd": 0.001}
    assert [r.run_id for r in runs_from(config)] == ["gd-lr0.01-s13", "zo-lam0.1-lr0.001-s13", "dd-lr0.001-s13"]


def test_an_evaluation_baseline_takes_no_trace_unless_asked(tmp_path):
    from zoflat_cli.experiments.finetune import EXPERIMENT as FINETUNE

    recipe = tmp_path / "r.yaml"
    recipe.write_text("command: finetune\nsteps: 0\n")
    assert [FINETUNE.resolve_mapping(flags, r)["trace"] for flags, r in (
        ({"steps": 0}, None), ({}, recipe), ({"steps": 0, "trace": "fd"}, None), ({"steps": 5}, recipe), ({}, None),
    )] == ["none", "none", "fd", "hutchinson", "hutchinson"]


def test_per_optimizer_flags_merge_into_the_recipe_and_grid_expands(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: {gd: 0.02}\nlambda: [0.1, 0.01]\nseeds: 2\n")
    config = TOY.resolve_mapping({"lr": {"zo": [0.001, 0.003]}, "optimizer": ["zo", "gd"]}, recipe)
    assert config["lr"] == {"zo": [0.001, 0.003], "gd": 0.02}
    runs = runs_from(config)
    assert len(runs) == 2 * 2 * 2 + 2  # zo: λ x lr x seeds; gd: seeds only
    assert {r.value("lambda") for r in runs if r.optimizer == "gd"} == {None}


def test_a_plain_flag_replaces_a_per_optimizer_value():
    config = TOY.resolve_mapping({"lr": 0.005})
    assert config["lr"] == 0.005


@pytest.mark.parametrize("recipe, message", [
    ("command: convex\n", "is for `zoflat convex`"),
    ("- 1\n", "must be a mapping"),
    ("lr: {zo: -1}\n", "lr must be >= 0"),
    ("steps: 1.5\n", "steps must be an integer"),
    ("optimizer: []\n", "at least one optimizer"),
])
def test_bad_recipes(tmp_path, recipe, message):
    path = tmp_path / "bad.yaml"
    path.write_text(recipe)
    with pytest.raises(ZoflatError, match=message.replace("(", r"\(").replace("`", ".")):
        TOY.resolve_mapping({}, path)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_recipes_are_valid(recipe):
    command = load_recipe(recipe)["command"]
    assert runs_from(registry()[command].resolve_mapping({}, recipe))
