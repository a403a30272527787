"""An experiment is data: a name, a settings table, how its problem is built and how it runs.

The CLI makes one command per experiment (its options from the table), `zoflat sweep` plans a
recipe's grid with it, and the tests drive it without the CLI:

    config = EXPERIMENT.resolve({"steps": 10})   # defaults < recipe < flags, checked, typed
    EXPERIMENT.start(config, quiet=True)         # -> (run folder, status)
"""

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

from zoflat_cli.experiments.settings import SHARED, Setting, config_class, load_recipe, resolve, runs_from, typed


def table(own: dict, **replaced) -> dict:
    """An experiment's settings: its own, then SHARED's, where `replaced` gives a shared setting
    another default (a value) or replaces it whole (a Setting)."""
    unknown = set(replaced) - set(SHARED)
    if unknown:
        raise ValueError(f"not shared settings: {', '.join(sorted(unknown))}")
    shared = {}
    for key, setting in SHARED.items():
        if key in replaced:
            value = replaced[key]
            setting = value if isinstance(value, Setting) else dataclasses.replace(setting, default=value)
        shared[key] = setting
    return {**own, **shared}


@dataclass(frozen=True)
class Experiment:
    """One `zoflat <name>` command.

    settings  the table (experiments/settings.py): every key of the config, its flag and default
    run       run(config, runs, quiet, resume) -> (run folder, or None on a data-parallel rank
              other than 0; overall status)
    check     check(config mapping) -> mapping: what depends on several settings
    defaults_for  defaults_for(chosen) -> {key: default}: defaults that depend on what the recipe
              and flags chose (convex: the model sets λ and step sizes)
    position  where `zoflat --help` lists it (the paper's experiments first, in its order)
    points    points(config, runs, steps, folder) -> iterator of (run, step, subject): the runs
              of a run folder brought back to steps {run_id: [step, ...]} (engine/points.py), the
              subjects of `zoflat flatness` (measures/subject.py)
    """

    name: str
    help: str
    settings: dict
    run: Callable
    check: Callable = None
    defaults_for: Callable = None
    position: int = 100
    points: Callable = None

    @functools.cached_property
    def config_class(self):
        return config_class(self.name, self.settings)

    def defaults(self, chosen: dict = None) -> dict:
        values = {"command": self.name, **{key: s.default for key, s in self.settings.items()}}
        if self.defaults_for is not None:
            values.update(self.defaults_for(chosen or {}))
        return values

    def resolve_mapping(self, flags: dict = None, recipe=None) -> dict:
        """The resolved config as config.yaml holds it: defaults < recipe < flags, every key checked."""
        flags = flags or {}
        chosen = {**(load_recipe(recipe) if recipe and self.defaults_for else {}), **flags}
        return resolve(self.defaults(chosen), recipe, flags, self.settings, self.check)

    def resolve(self, flags: dict = None, recipe=None):
        """The typed config of these flags over that recipe."""
        return self.typed(self.resolve_mapping(flags, recipe))

    def typed(self, config: dict):
        return typed(self.config_class, config)

    def runs(self, config) -> list:
        """The runs (RunSpec) of a typed config, in the order they are trained and logged."""
        return runs_from(config.to_dict())

    def start(self, config, quiet: bool = False, resume=None) -> tuple:
        """Runs (or, with resume, continues) every run of the config: (run folder, status)."""
        return self.run(config, self.runs(config), quiet, resume)
