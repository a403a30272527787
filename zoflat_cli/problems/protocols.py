"""The two kinds of problem and everything the engine asks of each (engine/batched.py, engine/model.py).

A batched problem (toy, convex) is a function of a (runs, dim) tensor: all runs of an invocation
advance together. A model problem (encoder.py, decoder.py, through pretrained.py) is one
nn.Module trained in place, one run at a time. The run folder (runs/folder.py) reads the
attributes both share: `best`, `references`, `description`, `panels`.
"""

from typing import Callable, Optional, Protocol

import torch


class Described(Protocol):
    best: dict  # metric -> "min" | "max": its best value over a run goes in summary.json
    references: dict  # metric -> (value, label): a reference line in the figures
    description: dict  # what summary.json records of the problem
    panels: Optional[list]  # the figure's panels, in order (None: every metric)


class BoundProblem(Protocol):
    """A batched problem as one group of runs sees it (their seeds' data, features, ...)."""

    # optional, False if absent: loss and grad also take numpy arrays (written with arrays.py's
    # operations), so the batched runner may step its small groups on numpy (engine/batched.py's fast path)
    numpy: bool

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """f at x (..., runs, dim): (..., runs)."""

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """∇f at x (runs, dim): (runs, dim)."""

    def hvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """∇²f(x) v for x (runs, dim), v (runs, dim, k): (runs, dim, k) (the flatness measures')."""

    def metrics(self, x: torch.Tensor, step: int = None) -> dict:
        """{name: (runs,) tensor} at a logged step; "loss" among them."""

    # The theory's prediction from the initial metrics (None: the problem has none):
    # theory(step, initial metrics, lr (runs,), λ (runs,), direction law) -> {name: (runs,)}
    theory: Optional[Callable]

    def has_theory(self, run) -> bool:
        """Whether the prediction covers this run's method (else its columns are NaN)."""


class BatchedProblem(Described, Protocol):
    blocks: dict  # name -> slice of the parameter vector: the "modules" of the flatness measures
    def memory_bytes(self, runs, itemsize: int) -> int:
        """About what training `runs` holds, checked against free memory before anything starts."""

    def init(self, generator: torch.Generator, dtype, device) -> torch.Tensor:
        """A run's initial point (dim,), from its seed's "init" stream."""

    def bind(self, runs) -> BoundProblem:
        """The problem for one group of runs."""


class ModelProblem(Described, Protocol):
    """A model trained in place. `params` are the trained tensors (their order is the directions'),
    `model` the nn.Module whose forward uses them, `group` the data-parallel process group
    (process_group.py) given to its constructor."""

    params: list
    model: torch.nn.Module
    device: torch.device
    group: object
    forward_passes: float  # over the training split, in full-batch units, since the counter was reset

    def draw_batch(self, batch_size: int, seed: int, step: int):
        """Make the step's "batch" split: the whole training set, or batch_size examples of it."""

    def batch_fraction(self, batch_size: int) -> float:
        """The batch's share of the training set (counts replayed forward passes)."""

    def loss(self, split: str = "batch") -> float:
        """What the optimizer minimises on a split."""

    def gradient(self, split: str = "batch") -> list:
        """∇ of the split's loss, one tensor per parameter."""

    def jvp(self, tangents) -> float:
        """uᵀ∇f of the batch's loss by forward-mode AD."""

    def hvp(self, v) -> list:
        """∇²f · v of the training loss."""

    def metrics(self, seed: int, step: int) -> dict:
        """The metrics row of a logged step ("loss" among them)."""

    def state(self) -> dict:
        """The trained parameters by name (a checkpoint)."""

    def load_state(self, state: dict):
        ...

    def load_base(self):
        """Back to the pretrained weights (the next run of the config starts there)."""
