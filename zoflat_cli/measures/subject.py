"""What a flatness measure is taken of: a point (the trained tensors of one run at one step) and
the training loss around it, as the measures of this package ask for it.

A subject's tensors are the point. A measure that needs the loss elsewhere moves them only inside
`shifted`, which puts back the very same values (a copy, not a subtraction), so measuring never
changes the point, whatever the dtype.
"""

import contextlib
import re
from typing import Optional, Protocol

import torch

from zoflat_cli.optim.parameters import copy_into, dot


class Subject(Protocol):
    params: list  # the trained tensors at the point
    names: list  # each tensor's name: "<module path>.<parameter>", or a block's name (toy: y, z)

    def loss(self) -> float:
        """The training loss at the tensors' current values."""

    def gradient(self) -> list:
        """∇ of the training loss, one tensor per parameter."""

    def hvp(self, v: list) -> list:
        """∇²f · v of the training loss."""

    def examples(self) -> Optional[int]:
        """How many training examples the loss averages (None: the loss is no average, as the toy's)."""

    def restricted(self, indices: list):
        """The same point with the training loss over these examples only (a context manager), for
        m-sharpness."""


@contextlib.contextmanager
def shifted(params: list, delta: list):
    """The tensors moved to x + delta for the length of the block, then given back bit for bit."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, delta):
            p.add_(d.to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            copy_into(params, saved)


def module_of(name: str) -> str:
    """The per-module breakdown's unit: a transformer layer (the name cut after its first number,
    e.g. `bert.encoder.layer.3`), else the module that owns the tensor (`embeddings.word_embeddings`),
    else the tensor itself (a block of the toy or convex parameter vector)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if re.fullmatch(r"\d+", part):
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else name


def norm(tensors: list) -> float:
    return dot(tensors, tensors) ** 0.5


def flatten(tensors: list, dtype=None) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(dtype or t.dtype) for t in tensors])


def unflatten(vector: torch.Tensor, like: list) -> list:
    out, start = [], 0
    for p in like:
        out.append(vector[start:start + p.numel()].view_as(p).to(p.dtype))
        start += p.numel()
    return out


def rademacher(params: list, generator: torch.Generator) -> list:
    return [torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype) * 2 - 1 for p in params]


def gaussian(params: list, generator: torch.Generator) -> list:
    return [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) for p in params]
