"""Structured direction laws: each weight matrix perturbed by a low-rank or subspace matrix.

  lowrank    LOZO (Chen et al., ICLR 2025): Z = U Vᵀ/√r per matrix, U (a×r) drawn every step, V (b×r)
             kept for `period` steps (LOZO's lazy ν). E[uuᵀ] = I over V; given V the covariance is
             I_a ⊗ VVᵀ/r. LOZO itself has no 1/√r (its λ and lr are ours/√r and ours/r; equal at r = 1).
  subspace   SubZero (Yu et al., ICCV 2025): Z = √(ab)/r · U S Vᵀ per matrix, S (r×r) drawn every step,
             U (a×r) and V (b×r) orthonormal (QR of Gaussians) refreshed every `period` steps (T₀);
             given U, V the covariance is (ab/r²)·(P_U ⊗ P_V), on average I.
A tensor that is not a matrix (biases, norms) gets plain Gaussian numbers, as in both papers.

The numbers come from two flat Gaussian draws made by the seed convention of directions.py: the
step's ("fast": U or S per matrix, the vectors' own numbers) keyed (base, step), and the period's
("slow": V, or the Gaussians behind U and V) keyed (slow_base(base), step // period). A matrix is
assembled from its factors by elementwise products summed in a fixed order (`outer_sum`), never a
matmul, so any block of its rows comes out bit for bit the same as in the whole: the batched path
assembles whole directions over (steps, samples, runs), the in-place path the rows of one chunk.

The toy and convex problems have vectors, not matrices: each block of their parameter vector
(toy: y and z; convex: bias and weights) is viewed as the most nearly square a×b matrix with
a·b = its length (SubZero's own reshape for LoRA factors), `balanced()`.
"""

import math
import threading
from typing import NamedTuple

import torch

from zoflat_cli.optim import directions as laws  # UNIT, CHUNK read at use (tests shrink them)
from zoflat_cli.optim.directions import fill, layout
from zoflat_cli.streams import mix

SLOW_TAG = 0x51_0F  # slow_base(base) = mix(base, SLOW_TAG): the period's stream beside the step's


def balanced(n: int) -> tuple:
    """(a, b), a ≤ b, a·b = n, a as large as possible."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def matrix_view(shape) -> tuple:
    """(rows, columns) of a tensor perturbed as a matrix, or (numel,) for a vector."""
    shape = tuple(shape)
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (math.prod(shape),)


def slow_base(base: int) -> int:
    return mix(base, SLOW_TAG)


class Structure(NamedTuple):
    """A structured law over tensors with these matrix views (in parameter order)."""
    law: str  # lowrank | subspace
    views: tuple  # per tensor (a, b) or (n,)
    rank: int
    period: int

    def rank_of(self, view) -> int:
        return min(self.rank, *view) if self.law == "subspace" else self.rank

    def fast_sizes(self) -> list:
        """Numbers drawn per step, per tensor: U (a·r), S (r·r), or the vector's own."""
        return [view[0] if len(view) == 1 else
                view[0] * self.rank if self.law == "lowrank" else self.rank_of(view) ** 2 for view in self.views]

    def slow_sizes(self) -> list:
        """Numbers drawn per period, per tensor: V (b·r), or the Gaussians behind U and V ((a + b)·r)."""
        return [0 if len(view) == 1 else
                view[1] * self.rank if self.law == "lowrank" else sum(view) * self.rank_of(view) for view in self.views]

    @property
    def numel(self) -> int:
        return sum(math.prod(v) for v in self.views)

    def scale(self, view) -> float:
        r = self.rank_of(view)
        return 1 / math.sqrt(r) if self.law == "lowrank" else math.sqrt(view[0] * view[1]) / r

    def assemble_steps(self, fast: torch.Tensor, first: int, bases: list, device) -> torch.Tensor:
        """The batched stream's directions (steps, samples, runs, numel) from their step numbers (steps,
        samples, runs, fast total), steps first, first + 1, ...; bases[sample][run] are the keys' bases."""
        out, steps = [], torch.arange(first, first + fast.shape[0])
        for p in range(first // self.period, (first + fast.shape[0] - 1) // self.period + 1):
            at = (steps // self.period == p).nonzero().squeeze(1)
            per_sample = [period_factors(self, row, p, device) for row in bases]  # each (runs, ...)
            stacked = [tuple(torch.stack([sample[j][k] for sample in per_sample]) for k in range(len(per_sample[0][j])))
                       for j in range(len(self.views))]
            out.append(assemble(self, fast[at], stacked))
        return torch.cat(out)


_UNITS, _UNITS_LOCK = {}, threading.Lock()  # (base, unit, m, per) -> a drawn unit of short vectors, kept a while


def draw_flat(base: int, step: int, m: int, gen: torch.Generator, out: torch.Tensor) -> torch.Tensor:
    """The m Gaussian numbers of key (base, step) by the seed convention of directions.py, in out[:m]
    (out holds at least max(m, UNIT) numbers when m <= UNIT). A unit of short vectors (per = UNIT // m
    keys) is kept after its first draw: the periods of one run use it in turn."""
    units, per = layout(m)
    if m <= laws.UNIT:
        offset, unit = (step % per) * m, (base, step // per, m, per)
        with _UNITS_LOCK:
            kept = _UNITS.get(unit)
        if kept is None:
            gen.manual_seed(mix(base, step // per))
            kept = fill(out[:per * m], "gaussian", gen).clone()
            with _UNITS_LOCK:
                if len(_UNITS) >= 512:
                    _UNITS.clear()
                _UNITS[unit] = kept
        return out[:m].copy_(kept[offset:offset + m])
    for k in range(units):
        gen.manual_seed(mix(base, step * units + k))
        fill(out[k * laws.CHUNK:min((k + 1) * laws.CHUNK, m)], "gaussian", gen)
    return out[:m]


def flat_buffer(m: int, device) -> torch.Tensor:
    return torch.empty(max(m, laws.UNIT if m <= laws.UNIT else 0), dtype=torch.float32, device=device)


def split(numbers: torch.Tensor, sizes: list) -> list:
    return list(numbers.split(sizes, dim=-1))


def slow_factors(structure: Structure, slow: torch.Tensor) -> list:
    """Per tensor the period's factors from its flat numbers (..., slow total): lowrank (V,), subspace
    (U, V) orthonormal (a batched QR: one LAPACK call per matrix, as for a single one); () for a vector."""
    out = []
    for view, numbers in zip(structure.views, split(slow, structure.slow_sizes())):
        if len(view) == 1:
            out.append(())
        elif structure.law == "lowrank":
            out.append((numbers.unflatten(-1, (view[1], structure.rank)),))
        else:
            a, b = view
            r = structure.rank_of(view)
            out.append((torch.linalg.qr(numbers[..., :a * r].unflatten(-1, (a, r)))[0],
                        torch.linalg.qr(numbers[..., a * r:].unflatten(-1, (b, r)))[0]))
    return out


def period_factors(structure: Structure, bases: list, period: int, device) -> list:
    """The factors of period `period` of the directions with these bases, stacked (len(bases), ...)."""
    m = sum(structure.slow_sizes())
    gen = torch.Generator(device=device)
    slow = torch.stack([draw_flat(slow_base(base), period, m, gen, flat_buffer(m, device)).clone() for base in bases])
    return slow_factors(structure, slow)


def outer_sum(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_k u[..., :, k] ⊗ v[..., :, k], summed in order k = 0, 1, ... (u (..., a, r), v (..., b, r))."""
    out = u[..., :, 0, None] * v[..., None, :, 0]
    for k in range(1, u.shape[-1]):
        out += u[..., :, k, None] * v[..., None, :, k]
    return out


def matrix_rows(structure: Structure, view, fast: torch.Tensor, factors: tuple, r0: int, r1: int) -> torch.Tensor:
    """Rows r0..r1-1 of one tensor's direction, flat (..., (r1 - r0)·b), from its step numbers `fast`
    (..., fast size) and its period's factors."""
    if len(view) == 1:
        return fast
    a, b = view
    r = structure.rank_of(view)
    if structure.law == "lowrank":
        z = outer_sum(fast.unflatten(-1, (a, r))[..., r0:r1, :], factors[0])
    else:
        u, v = factors
        s = fast.unflatten(-1, (r, r))
        z = outer_sum(outer_sum(u[..., r0:r1, :], s.mT), v)  # (U S)[rows] Vᵀ
    z *= structure.scale(view)
    return z.flatten(-2)


def assemble(structure: Structure, fast: torch.Tensor, factors: list) -> torch.Tensor:
    """Whole directions (..., numel) from step numbers (..., fast total) and per-tensor factors (their
    leading dims broadcast against fast's)."""
    parts = split(fast, structure.fast_sizes())
    return torch.cat([matrix_rows(structure, view, part, f, 0, view[0] if len(view) == 2 else 0)
                      for view, part, f in zip(structure.views, parts, factors)], dim=-1)


class KeyFactors:
    """The step numbers and period factors of directions keyed (base, step) under a structure, kept for
    the last few keys (a step's probes and its update use the same ones)."""

    def __init__(self, structure: Structure, device):
        self.structure, self.device = structure, device
        self.fast_sizes = structure.fast_sizes()
        self.offsets = [0]
        for size in self.fast_sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.gen = torch.Generator(device=device)
        self._fast, self._slow = {}, {}
        self._lock = threading.Lock()  # the chunks of one pass are made on several threads

    def get(self, key: tuple) -> tuple:
        with self._lock:
            return self._get(key)

    def _get(self, key: tuple) -> tuple:
        base, step = key
        if key not in self._fast:
            if len(self._fast) > 16:
                self._fast.clear()
            m = self.offsets[-1]
            self._fast[key] = draw_flat(base, step, m, self.gen, flat_buffer(m, self.device)).clone()
        slow_key = (base, step // self.structure.period)
        if slow_key not in self._slow:
            if len(self._slow) > 16:
                self._slow.clear()
            self._slow[slow_key] = [tuple(f[0] for f in factors)
                                    for factors in period_factors(self.structure, [base], slow_key[1], self.device)]
        return self._fast[key], self._slow[slow_key]

    def numbers(self, key: tuple, tensor: int, start: int, stop: int) -> torch.Tensor:
        """Numbers start..stop-1 (flat) of tensor `tensor` of direction `key`."""
        fast, factors = self.get(key)
        view = self.structure.views[tensor]
        own = fast[self.offsets[tensor]:self.offsets[tensor + 1]]
        if len(view) == 1:
            return own[start:stop]
        b = view[1]
        r0, r1 = start // b, -(-stop // b)
        return matrix_rows(self.structure, view, own, factors[tensor], r0, r1)[start - r0 * b:stop - r0 * b]
