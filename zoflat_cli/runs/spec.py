"""A run of a config: its settings (RunSpec), the settings columns every metrics row starts with,
and the schedule of periodic events (logs, evaluations, traces)."""

import functools
from dataclasses import dataclass

from zoflat_cli.optim.presets import HYPERPARAMETERS, get_preset


@dataclass(frozen=True)
class RunSpec:
    optimizer: str  # a preset (optim/presets.py)
    lr: float
    seed: int
    samples: int = 1
    hyper: tuple = ()  # ((name, value), ...) for the hyperparameters it reads, in HYPERPARAMETERS order
    directions: str = None  # None: the preset's own law
    update: str = None  # None: the preset's own rule

    def __post_init__(self):
        if self.directions is None:
            object.__setattr__(self, "directions", get_preset(self.optimizer).law)

    @property
    def rule(self) -> str:
        return self.update or get_preset(self.optimizer).update

    def value(self, name: str):
        return dict(self.hyper).get(name)

    @functools.cached_property  # rows are built for every run at every log: compute once
    def run_id(self) -> str:
        preset = get_preset(self.optimizer)
        parts = [self.optimizer]
        if preset.uses_directions and self.directions != preset.law:
            parts.append(self.directions)
        if self.rule != preset.update:
            parts.append(self.rule)
        parts += [f"{HYPERPARAMETERS[k].tag}{v:g}" for k, v in self.hyper if v or not HYPERPARAMETERS[k].optional]
        parts.append(f"lr{self.lr:g}")
        if self.samples != 1:
            parts.append(f"n{self.samples}")
        parts.append(f"s{self.seed}")
        return "-".join(parts)

    def columns(self) -> dict:
        return dict(self._columns)

    @functools.cached_property
    def _columns(self) -> dict:
        uses = get_preset(self.optimizer).uses_directions
        return {
            "run_id": self.run_id,
            "optimizer": self.optimizer,
            "update": self.rule,
            "directions": self.directions if uses else None,
            **{name: self.value(name) for name in HYPERPARAMETERS},
            "lr": self.lr,
            "seed": self.seed,
            "samples": self.samples,
        }


RUN_COLUMNS = list(RunSpec("gd", 0.1, 0).columns())  # the settings columns of metrics.csv
NOT_METRICS = {*RUN_COLUMNS, "step"}  # a row's columns that are not metrics (a run's settings are in its config)



def due(step: int, every: int, steps: int) -> bool:
    """Whether a periodic event (a log, an evaluation, a trace) happens at `step`: every `every`
    steps and at the last one."""
    return step % every == 0 or step == steps
