"""Direction laws and the one seed convention that both training paths draw them by.

A direction is named by (base, step): `streams.direction_base(run seed, sample)` names the
sample's stream and `step` the direction in it. Its numbers come from torch generators, one
seeding per unit, so any direction can be regenerated alone:
  dim > UNIT    direction s is cut into units of CHUNK numbers, unit k seeded with mix(base, s·units + k)
                (a model's parameters, taken in order as one flat vector: a chunk spans many small tensors);
  dim <= UNIT   P = UNIT // dim consecutive directions share one unit of P·dim numbers, seeded with
                mix(base, s // P): a small problem draws P steps with one seeding (the toy: P = 81).
The batched path (a (runs, dim) tensor per step, blocks of steps on a background thread) and the
in-place path (chunk by chunk, z never stored) draw the very same numbers for the same run, step
and sample.

Laws (each with E[u] = 0 and E[uuᵀ] = I):
  gaussian    u ~ N(0, I)
  rademacher  u_j = ±1 with probability 1/2 each
  sphere      u uniform on the sphere of radius √d: a Gaussian draw times √d/‖g‖; in place the norm
              needs every chunk, so it is one extra draw-only pass per direction, computed once and cached.
  lowrank, subspace   a low-rank or subspace matrix per weight matrix (LOZO, SubZero): structured.py,
              assembled from Gaussian factors drawn by this same convention.
"""

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from zoflat_cli.optim.presets import LAWS
from zoflat_cli.streams import direction_base, mix_array

UNIT = 1 << 14  # vectors up to this length are packed several to a seeding
CHUNK = 1 << 19  # numbers per seeding of longer ones: 2 MiB of float32 scratch per thread in place
# Bumped whenever the numbers drawn for a direction, or the arithmetic that applies them, change: run
# folders record it, --resume checks it. 4: the batched runner's small problems step on numpy (the toy's
# numbers differ from format 3's in their last bits).
FORMAT_VERSION = 4


def layout(dim: int) -> tuple:
    """(units per direction, directions per unit) for vectors of length dim."""
    return (1, UNIT // dim) if dim <= UNIT else (-(-dim // CHUNK), 1)


def check_law(law: str) -> str:
    from zoflat_cli.errors import ZoflatError

    if law not in LAWS:
        raise ZoflatError(f"unknown directions {law!r}; choose from {', '.join(LAWS)}")
    return law


def fill(out: torch.Tensor, law: str, gen: torch.Generator) -> torch.Tensor:
    """Numbers from a seeded generator, before the sphere's scaling (float32)."""
    if law == "rademacher":  # 32 signs per random int32 word: about half the cost of a Gaussian draw
        n = out.numel()
        words = torch.randint(-2**31, 2**31, (-(-n // 32),), dtype=torch.int32, generator=gen, device=out.device)
        bits = (words[:, None] >> _bit_positions(out.device)) & 1
        return out.copy_(bits.view(-1)[:n]).mul_(2).sub_(1)
    return out.normal_(generator=gen)


@functools.lru_cache(maxsize=8)
def _bit_positions(device) -> torch.Tensor:
    return torch.arange(32, dtype=torch.int32, device=device)


def sphere_scale(square_norm: float, dim: int) -> float:
    """√d/‖g‖ from ‖g‖², in float64, so that ‖u‖ = √d."""
    return math.sqrt(dim / square_norm)


# The batched path draws blocks of steps on a background thread while the trainer steps (torch
# drops the GIL inside a draw), so drawing overlaps with training on a second core.
_DRAWER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zoflat-directions")
BLOCK_ELEMENTS = 1 << 16  # numbers per background block (at least MIN_BLOCK_STEPS steps, whole units) ...
MIN_BLOCK_STEPS = 8
BLOCK_BYTES = 32 << 20  # ... but never more than this (a seed study's thousands of runs), nor past the last step


def block_steps(runs: int, samples: int, dim: int) -> int:
    """Steps per background block of a stream of `runs` distinct seeds."""
    step_elements = samples * dim * runs
    steps = max(MIN_BLOCK_STEPS, BLOCK_ELEMENTS // step_elements)
    whole_units = -(-steps // layout(dim)[1]) * layout(dim)[1]  # one seeding per unit drawn
    return max(1, min(whole_units, BLOCK_BYTES // (4 * step_elements)))


def stream_bytes(runs: int, samples: int, dim: int, steps: int) -> int:
    """What a stream holds at most: its block and the next, each as drawn (float32) and as used (up to float64)."""
    return 2 * 12 * samples * dim * runs * min(block_steps(runs, samples, dim), max(steps, 1))


class DirectionStream:
    """Directions for a group of runs, step after step: `next()` gives (samples, runs, dim) for
    the current step, drawn by the seed convention above. Runs with the same seed get the same
    directions (common random numbers), whatever else is in the group."""

    def __init__(self, seeds, samples: int, dim: int, law: str, dtype, device, start_step: int = 0,
                 end_step: int = None, structure=None, numpy: bool = False):
        self.unique = list(dict.fromkeys(seeds))
        index = {s: i for i, s in enumerate(self.unique)}
        self.rows = torch.tensor([index[s] for s in seeds], device=device)
        self.shared = len(self.unique) == len(seeds)  # no index_select needed
        self.bases = [[direction_base(s, i) for s in self.unique] for i in range(samples)]
        self.samples, self.dim, self.law, self.dtype, self.device = samples, dim, law, dtype, device
        # a structured law (structured.Structure) draws its step's Gaussian factors here, then assembles them
        self.structure = structure
        self.drawn = dim if structure is None else sum(structure.fast_sizes())
        self.fill = "gaussian" if structure is not None else law
        self.units_kept = {}  # (base, unit) -> its numbers, for a structured law whose units span many blocks
        self.units, self.per_unit = layout(self.drawn)
        self.block = block_steps(len(self.unique), samples, dim)
        self.end = end_step  # None: no last step (the stream draws on)
        self.numpy = numpy  # next() gives numpy views (the batched runner's fast path)
        self.gen = torch.Generator(device=device)
        self.step, self.chunk, self.position = start_step, None, 0
        self.pending = _DRAWER.submit(self._draw, self.step)

    def _count(self, first: int) -> int:
        return self.block if self.end is None else max(1, min(self.block, self.end - first))

    def _draw(self, first: int) -> torch.Tensor:
        """Steps first .. first + count - 1 as (steps, samples, runs, dim) in the run's dtype."""
        count, per, dim = self._count(first), self.per_unit, self.drawn
        g = torch.empty(count, self.samples, len(self.unique), dim, dtype=torch.float32, device=self.device)
        if dim <= UNIT:  # whole units of `per` steps, sliced to [first, first + count)
            u0, u1 = first // per, (first + count - 1) // per
            scratch = torch.empty(u1 - u0 + 1, per * dim, dtype=torch.float32, device=self.device)
            self.units_kept = {key: unit for key, unit in self.units_kept.items() if key[1] >= u0}
            skip = first - u0 * per
            for i, bases in enumerate(self.bases):
                for r, base in enumerate(bases):
                    seeds = mix_array(np.uint64(base), np.arange(u0, u1 + 1, dtype=np.uint64)).tolist()
                    for k, (unit, seed) in enumerate(zip(scratch, seeds)):
                        if (base, u0 + k) in self.units_kept:  # a structured law's few numbers: one unit, many blocks
                            unit.copy_(self.units_kept[base, u0 + k])
                            continue
                        self.gen.manual_seed(seed)
                        fill(unit, self.fill, self.gen)
                        if self.structure is not None:
                            self.units_kept[base, u0 + k] = unit.clone()
                    g[:, i, r] = scratch.view(-1, dim)[skip:skip + count]
        else:  # each step its own units
            units = np.arange(first * self.units, (first + count) * self.units, dtype=np.uint64)
            for i, bases in enumerate(self.bases):
                for r, base in enumerate(bases):
                    for k, seed in enumerate(mix_array(np.uint64(base), units).tolist()):
                        step, part = divmod(k, self.units)
                        self.gen.manual_seed(seed)
                        fill(g[step, i, r, part * CHUNK:(part + 1) * CHUNK], self.fill, self.gen)
        if self.structure is not None:
            g = self.structure.assemble_steps(g, first, self.bases, self.device)
        u = g.to(self.dtype)  # (steps, samples, runs, dim): one contiguous block per step
        if self.law == "sphere":  # √d/‖g‖ per direction, from the float32 draw's norm in float64
            u *= (self.dim / g.double().square().sum(-1, keepdim=True)).sqrt().to(self.dtype)
        u = u if self.shared else u.index_select(2, self.rows)
        return u.numpy() if self.numpy else u

    def next(self) -> torch.Tensor:
        if self.chunk is None or self.position == self.chunk.shape[0]:
            if self.pending is None:  # past the last step it was made for: one step at a time
                self.pending = _DRAWER.submit(self._draw, self.step)
            self.chunk, self.position = self.pending.result(), 0
            following = self.step + self.chunk.shape[0]
            self.pending = _DRAWER.submit(self._draw, following) if self.end is None or following < self.end else None
        u = self.chunk[self.position]
        self.position += 1
        self.step += 1
        return u


def work_dtype(dtype) -> torch.dtype:
    """The dtype a perturbed or updated weight is computed in before its one rounding to `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32
