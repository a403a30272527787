"""Settings: each experiment's table of what it takes, and configs resolved from it: defaults <
recipe (YAML) < command-line flags, validated, expanded into runs, and typed.

A Setting is the one declaration of a config key and its flag: its kind, bounds, choices, default
and help. SHARED holds the keys every experiment has (the optimizers, their hyperparameters,
seeds, logging, device, output); an experiment adds its own table (experiments/*.py). The CLI's
options, the config's validation and the typed config (a frozen dataclass per experiment) are all
generated from these tables.

Settings that may differ per optimizer (`per_optimizer`) take a value, a list of values (a sweep),
or a mapping optimizer -> value(s): `lr: {gd: 0.01, zo: 0.001}` in YAML, `--lr gd=0.01` on the
command line. The resolved config is saved with the run (config.yaml) and is itself a valid recipe.
"""

import dataclasses
import itertools
import keyword
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zoflat_cli.errors import ZoflatError, suggestion
from zoflat_cli.measures.catalog import measure_names
from zoflat_cli.optim.presets import DIRECTIONS, HYPERPARAMETERS, LAWS, PRESETS, SAMPLES, get_preset, hyper_names
from zoflat_cli.optim.updates import UPDATES, get_update
from zoflat_cli.runs.spec import RunSpec
from zoflat_cli.runs.trackers import LOGGERS
from zoflat_cli.runs.trackers import require as require_tracker

NAMED = {"directions": LAWS, "update": tuple(UPDATES)}  # per-optimizer settings that take names
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
MAX_STEPS = 10**10
MAX_SEED = 2**32 - 1  # numpy's legacy seeding (the LM-BFF splits) takes no larger seed
MAX_SAMPLES = 10_000
MAX_SEED_COUNT = 10_000


KINDS = {"int": "an integer", "number": "a number", "text": "a text", "path": "a path", "flag": "true or false"}
PYTHON_TYPES = {"int": int, "number": float, "text": str, "path": str, "flag": bool, "names": list, "seeds": list,
                "name": str}


@dataclass(frozen=True)
class Setting:
    """One config key: `kind` int, number (finite), text, path or flag, or one that its own parser
    checks (names: a list of optimizers; seeds; name: a run folder's suffix); bounds (inclusive, or `low` exclusive with
    above=True); the allowed choices; whether None is allowed; its default (None: the experiment
    gives one), its help, and its flag (`flags`: the CLI's spellings, default --<key>).
    `per_optimizer`: a value, a sweep or a mapping optimizer -> value(s) (repeatable on the CLI)."""

    kind: str
    low: float = None
    high: float = None
    choices: tuple = ()
    optional: bool = False
    above: bool = False
    default: Any = None
    help: str = ""
    flags: tuple = ()
    per_optimizer: bool = False

    def check(self, key: str, value):
        """The value, normalised (an integral float for an int, a path as text), or a ZoflatError."""
        if value is None:
            if self.optional:
                return None
            raise ZoflatError(f"{key} needs a value, got null")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {"int": number and math.isfinite(value) and value == int(value),
              "number": number and math.isfinite(value),
              "text": isinstance(value, str), "path": isinstance(value, (str, Path)) and str(value) != "",
              "flag": isinstance(value, bool)}[self.kind]
        if not ok:
            raise ZoflatError(f"{key} must be {KINDS[self.kind]}, got {value!r}")
        if self.kind == "int":
            value = int(value)
        if self.kind == "path":
            value = str(value)
        if self.choices and value not in self.choices:
            hint = suggestion(value, self.choices)
            raise ZoflatError(f"{key} must be one of {', '.join(self.choices)}, got {value!r}{hint}")
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            raise ZoflatError(f"{key} must be {'>' if self.above else '>='} {self.low}, got {value!r}")
        if self.high is not None and value > self.high:
            raise ZoflatError(f"{key} must be <= {self.high}, got {value!r}")
        return value

    @property
    def checked_alone(self) -> bool:
        """Whether check() types it (the others have their own parsers in validate())."""
        return self.kind in KINDS and not self.per_optimizer


def per_optimizer(kind: str, help: str, default=None) -> Setting:
    return Setting(kind, default=default, help=help, per_optimizer=True)


# The settings every experiment has, in the order of their flags. An experiment may replace one
# (dataclasses.replace: another default or bound) and adds its own table before these.
SHARED = {
    "optimizer": Setting("names", help="Optimizers (repeatable or comma-separated), from: " + ", ".join(PRESETS) + ".",
                         flags=("--optimizer", "-o")),
    "steps": Setting("int", 1, MAX_STEPS, help="Iterations per run."),
    "lr": per_optimizer("number", "Step size: 0.01, a sweep 0.01,0.001, or per optimizer gd=0.01 (repeatable)."),
    "samples": per_optimizer("int", "Directions averaged per step by ZO-type optimizers (n independent estimates).",
                             SAMPLES),
    "directions": per_optimizer("text", "Direction law: " + ", ".join(LAWS) + " (a sweep, or zo=sphere).", DIRECTIONS),
    "update": per_optimizer("text", "Update rule instead of the optimizer's own: " + ", ".join(UPDATES)
                            + " (or zo=adam).", None),  # None: each optimizer's own rule
    **{name: per_optimizer("number", hyper.help, hyper.default) for name, hyper in HYPERPARAMETERS.items()},
    "seeds": Setting("seeds", help="A count n (seeds 0..n-1) or a list 13,21,42 (one seed: 13,)."),
    "log_every": Setting("int", 1, MAX_STEPS, help="Log metrics every N steps."),
    "checkpoint_every": Setting("int", 0, MAX_STEPS, default=0,
                                help="Save a checkpoint every N steps (0: only when a run stops or ends)."),
    "measure_every": Setting("int", 0, MAX_STEPS, default=0, help="Take --measures every N steps and at the last, "
                             "into flatness.csv (0: never; `zoflat flatness` takes them afterwards, at any step)."),
    "measures": Setting("text", default="trace", help="Flatness measures for --measure-every, comma-separated or "
                        "all: trace, eigenvalues, density, modules, sharpness, landscape (default settings)."),
    "device": Setting("text", choices=("auto", "cpu", "cuda"), default="auto", help="auto, cpu or cuda."),
    "dtype": Setting("text", choices=("float32", "float64"), help="float32 or float64; finetune also bfloat16, "
                     "float16."),
    "out": Setting("path", default="runs", help="Parent folder of run folders."),
    "name": Setting("name", help="Suffix of the run folder's name."),
    "logger": Setting("text", choices=LOGGERS, optional=True, help="Also stream metrics.csv's rows to wandb (offline "
                      "unless WANDB_MODE), tensorboard or mlflow (files in the run folder)."),
}
PER_OPTIMIZER = tuple(key for key, setting in SHARED.items() if setting.per_optimizer)


def field_name(key: str) -> str:
    """A config key as a Python name (`lambda` is a keyword: `lambda_`)."""
    return key + "_" if keyword.iskeyword(key) else key


def config_class(name: str, settings: dict):
    """The typed config of an experiment: a frozen dataclass with one field per setting (plus the
    command), made from its table. `to_dict()` gives config.yaml's mapping back."""
    fields = [("command", str)] + [(field_name(k), Any if s.per_optimizer else PYTHON_TYPES[s.kind])
                                   for k, s in settings.items()]  # per optimizer: a value, a sweep or a mapping

    def to_dict(self) -> dict:
        return {"command": self.command, **{k: getattr(self, field_name(k)) for k in settings}}

    cls = dataclasses.make_dataclass(f"{name.title()}Config", fields, frozen=True, namespace={"to_dict": to_dict})
    cls.__doc__ = f"The resolved config of `zoflat {name}` (experiments/settings.py makes it from its table)."
    return cls


def typed(cls, config: dict):
    """A resolved config mapping (a config.yaml) as the experiment's typed config."""
    return cls(**{field_name(k): v for k, v in config.items()})


# ---------------------------------------------------------------- reading recipes and flags

def load_recipe(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ZoflatError(f"recipe not found: {path}")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ZoflatError(f"recipe {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ZoflatError(f"cannot parse recipe {path}{where}: {getattr(err, 'problem', err)}")
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise ZoflatError(f"recipe {path} must be a mapping of settings, got {type(recipe).__name__}")
    return recipe


def _number(text: str, key: str):
    if key in NAMED:
        return text.strip()
    try:
        value = float(text)
    except ValueError:
        raise ZoflatError(f"--{key.replace('_', '-')}: {text!r} is not a number") from None
    return int(value) if key == "samples" and math.isfinite(value) and value == int(value) else value


def parse_flag(key: str, occurrences: list):
    """`--lr 0.01`, `--lambda 0.1,0.05`, `--lr gd=0.01 --lr zo=0.001` (or `--lr gd=0.01,zo=0.001`:
    a part with `=` starts the next optimizer's values), `--lr 0.001 --lr gd=0.01` (0.001 for every
    optimizer but gd) -> value, list or mapping."""
    flag = "--" + key.replace("_", "-")
    plain, per_opt = [], {}
    for text in occurrences:
        target = None
        for part in str(text).split(","):
            if "=" in part:
                target, _, part = part.partition("=")
                target = target.strip()
                if not target:
                    raise ZoflatError(f"{flag}: {text!r} has a value without its optimizer")
                if target in per_opt:
                    raise ZoflatError(f"{flag}: {text!r} gives {target} twice")
                per_opt[target] = []
            if part.strip():
                (per_opt[target] if target else plain).append(_number(part, key))
    for target, numbers in per_opt.items():
        if not numbers:
            raise ZoflatError(f"{flag}: give a value for {target}")
        per_opt[target] = numbers[0] if len(numbers) == 1 else numbers
    if not per_opt and not plain:
        raise ZoflatError(f"{flag}: give a value, got {occurrences!r}")
    value = plain[0] if len(plain) == 1 else plain
    if per_opt:  # plain values, if any, are the other optimizers'
        return {**({name: value for name in PRESETS} if plain else {}), **per_opt}
    return value


def parse_seeds(value):
    """An integer n means n seeds 0..n-1; a list (or '13,21', '13,') means those seeds."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            numbers = [int(p) for p in parts if p]
        except ValueError:
            numbers = []
        if not numbers:
            raise ZoflatError(f"--seeds: {value!r} is not a count or a comma-separated list of seeds")
        value = numbers if "," in value else numbers[0]
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise ZoflatError(f"seeds must be a count or a list of integers, got {value!r}")
    if isinstance(value, int):
        if not 1 <= value <= MAX_SEED_COUNT:
            raise ZoflatError(f"seeds: a count must be between 1 and {MAX_SEED_COUNT}, got {value}")
        return list(range(value))
    if not value or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in value):
        raise ZoflatError(f"seeds must be integers from 0 to {MAX_SEED}, got {value!r}")
    return list(dict.fromkeys(value))


def parse_list(value) -> list:
    """'a,b', ['a,b', 'c'] or ['a', 'b'] -> ['a', 'b', ...]."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


# ---------------------------------------------------------------- merging

def _as_mapping(value) -> dict:
    return value if isinstance(value, dict) else {name: value for name in PRESETS}


def merge(base: dict, override: dict, source: str) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if not isinstance(key, str):
            raise ZoflatError(f"{source}: a key must be a setting's name, got {key!r}")
        if key not in base:
            hint = suggestion(key, base)
            raise ZoflatError(f"{source}: unknown key {key!r}{hint}")
        if key in PER_OPTIMIZER and isinstance(value, dict):
            for name in value:  # a typo here would otherwise be silently ignored
                if not isinstance(name, str) or name not in PRESETS:
                    hint = suggestion(str(name), PRESETS)
                    raise ZoflatError(f"{source}: {key} names an unknown optimizer {name!r}{hint}")
            value = {**_as_mapping(base[key]), **value}
        merged[key] = value
    return merged


def resolve(defaults: dict, recipe_path, flags: dict, settings: dict, check=None) -> dict:
    """The full config for one invocation: defaults (with "command"), then the recipe, then the
    given flags. `settings` types every key; `check(config)`, if given, checks what depends on
    several keys, after every key has been checked alone."""
    config = dict(defaults)
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
        command = recipe.pop("command", defaults["command"])
        if command != defaults["command"]:
            raise ZoflatError(f"recipe {recipe_path} is for `zoflat {command}`, not `zoflat {defaults['command']}`")
        config = merge(config, recipe, str(recipe_path))
    config = merge(config, {k: v for k, v in flags.items() if v is not None}, "command line")
    config = validate(config, settings)
    return check(config) if check else config


# ---------------------------------------------------------------- validation and expansion

def values_for(config: dict, key: str, optimizer: str) -> list:
    value = config[key]
    if isinstance(value, dict):
        if optimizer not in value:
            raise ZoflatError(f"{key} has no value for optimizer {optimizer!r}")
        value = value[optimizer]
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ZoflatError(f"{key} is empty for optimizer {optimizer!r}")
    return list(dict.fromkeys(values))


def _check_positive(key: str, value, integer=False, zero_ok=False):
    kind = "an integer" if integer else "a number"
    bound = ">= 0" if zero_ok else "> 0"
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (integer and value != int(value))):
        raise ZoflatError(f"{key} must be {kind} {bound}, got {value!r}")
    if not (value >= 0 if zero_ok else value > 0):
        raise ZoflatError(f"{key} must be {bound}, got {value!r}")


def _check_value(key: str, value):
    if key in NAMED:  # update: None is each optimizer's own rule
        if not (value is None and key == "update") and value not in NAMED[key]:
            raise ZoflatError(f"unknown {key} {value!r}; choose from {', '.join(NAMED[key])}")
        return
    hyper = HYPERPARAMETERS.get(key)
    # lr = 0 is a drift check: the weights must not move (in any dtype)
    _check_positive(key, value, integer=key == "samples" or bool(hyper and hyper.integer),
                    zero_ok=key == "lr" or bool(hyper and hyper.zero_ok))
    if hyper and hyper.below_one and value >= 1:
        raise ZoflatError(f"{key} must be < 1, got {value!r}")
    if key == "samples" and value > MAX_SAMPLES:
        raise ZoflatError(f"samples must be <= {MAX_SAMPLES}, got {value!r}")


def validate(config: dict, settings: dict) -> dict:
    """Every key checked against its Setting, then the optimizers, seeds and per-optimizer values."""
    config = dict(config)
    for key, setting in settings.items():
        if key in config and setting.checked_alone:
            config[key] = setting.check(key, config[key])
    if config.get("logger"):
        require_tracker(config["logger"])
    measure_names(config["measures"], "measures")
    if config["measure_every"] and config["measure_every"] % config["log_every"]:
        raise ZoflatError(f"measure_every ({config['measure_every']}) must be a multiple of log_every "
                          f"({config['log_every']}): the measures are taken at logged steps")
    if not isinstance(config["name"], str) or not NAME_PATTERN.match(config["name"]):
        raise ZoflatError(f"name may hold 1 to 100 letters, digits, '.', '_' and '-', got {config['name']!r}")
    names = config["optimizer"] if isinstance(config["optimizer"], list) else [config["optimizer"]]
    if not all(isinstance(name, str) for name in names):
        raise ZoflatError(f"optimizer must be a name or a list of names, got {config['optimizer']!r}")
    config["optimizer"] = list(dict.fromkeys(parse_list(config["optimizer"])))
    if not config["optimizer"]:
        raise ZoflatError("optimizer: give at least one optimizer")
    presets = [get_preset(o) for o in config["optimizer"]]
    config["seeds"] = parse_seeds(config["seeds"])
    # Per-optimizer settings, reduced to the optimizers that use them (collapsed when all agree);
    # every value checked first (which hyperparameters a run reads depends on its update rule).
    for key in PER_OPTIMIZER:
        value = config[key]
        for v in itertools.chain.from_iterable(
            x if isinstance(x, list) else [x] for x in (value.values() if isinstance(value, dict) else [value])
        ):
            _check_value(key, v)
    for key in PER_OPTIMIZER:
        resolved = {}
        for preset in presets:
            if _uses(config, preset, key):
                values = values_for(config, key, preset.name)
                resolved[preset.name] = values[0] if len(values) == 1 else values
        if len({repr(v) for v in resolved.values()}) == 1:
            config[key] = next(iter(resolved.values()))
        elif resolved:
            config[key] = resolved
    for run in runs_from(config):
        if get_update(run.rule).conservative and run.value("weight_decay"):
            raise ZoflatError(f"{run.run_id}: the conservative update takes no weight decay")
        estimator = get_preset(run.optimizer).estimator
        if get_update(run.rule).conservative and estimator in ("hessian", "svrg"):
            raise ZoflatError(f"{run.run_id}: the conservative update cannot undo {run.optimizer}'s own state; "
                              f"choose another update")
    return config


def _updates(config: dict, preset) -> list:
    return [u or preset.update for u in values_for(config, "update", preset.name)]


def _uses(config: dict, preset, key: str) -> bool:
    if key in ("samples", "directions"):
        return preset.uses_directions
    if key in ("lr", "update"):
        return True
    laws = values_for(config, "directions", preset.name) if preset.uses_directions else ["gaussian"]
    return any(key in hyper_names(preset.name, u, law) for u in _updates(config, preset) for law in laws)


def runs_from(config: dict) -> list:
    runs = []
    for name in config["optimizer"]:
        preset = get_preset(name)
        samples = values_for(config, "samples", name) if preset.uses_directions else [1]
        laws = values_for(config, "directions", name) if preset.uses_directions else ["gaussian"]
        for update, law in itertools.product(_updates(config, preset), laws):
            grids = [values_for(config, "lr", name), config["seeds"], samples]
            grids += [[(h, float(v)) for v in values_for(config, h, name)] for h in hyper_names(name, update, law)]
            for lr, seed, n, *hyper in itertools.product(*grids):
                runs.append(RunSpec(name, float(lr), seed, int(n), tuple(hyper), law,
                                    None if update == preset.update else update))
    # settings vary slowest, seeds fastest: runs of one setting sit together
    return sorted(runs, key=lambda r: (config["optimizer"].index(r.optimizer), r.rule, r.directions, r.hyper, r.lr,
                                       r.samples, config["seeds"].index(r.seed)))


