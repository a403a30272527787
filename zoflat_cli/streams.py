"""The seed streams: every random number a run uses comes from here.

A run's seed is split into independent named streams (initial point, search directions, ...),
so two runs with the same seed start from the same point and, if both draw directions, see the
same directions (common random numbers), whatever else runs beside them in a batch.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

STREAM_IDS = {"init": 0, "directions": 1, "features": 2, "batches": 3, "probes": 4}

# Directions are drawn in float32 (about 4x faster than float64 on CPU) and cast to the run's
# dtype. Each run draws chunks of a fixed number of steps for a given dimension (about
# CHUNK_ELEMENTS numbers, at least MIN_CHUNK_STEPS steps): its sequence never depends on
# batching or --steps, and memory stays near 12 bytes x CHUNK_ELEMENTS per run.
CHUNK_ELEMENTS = 1 << 14
MIN_CHUNK_STEPS = 16
# The next chunk is drawn on a background thread while the trainer steps (torch drops the GIL
# inside randn), so drawing overlaps with training on a second core.
_DRAWER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zoflat-directions")


def stream_seed(seed: int, stream: str, *keys: int) -> int:
    """A 63-bit seed for one named stream of a run (and, with keys, e.g. a step, one draw of it),
    via numpy's SeedSequence hashing."""
    state = np.random.SeedSequence([seed, STREAM_IDS[stream], *keys]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def generator(seed: int, stream: str, device: torch.device, *keys: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(stream_seed(seed, stream, *keys))
    return gen


class DirectionStream:
    """Gaussian directions u ~ N(0, I) for a batch of runs: `next()` gives a (samples, runs, dim)
    tensor. Each run has its own generator, drawn in fixed chunks of steps."""

    def __init__(self, seeds, samples, dim, dtype, device):
        self.generators = [generator(s, "directions", device) for s in seeds]
        self.shape = (max(MIN_CHUNK_STEPS, CHUNK_ELEMENTS // (samples * dim)), samples, dim)
        self.dtype, self.device = dtype, device
        self.chunk, self.position = None, 0
        self.pending = _DRAWER.submit(self._draw)

    def _draw(self) -> torch.Tensor:
        draws = [
            torch.randn(self.shape, generator=g, device=self.device, dtype=torch.float32)
            for g in self.generators
        ]
        # (steps, samples, runs, dim): one contiguous block per step
        return torch.stack(draws, dim=2).to(self.dtype)

    def next(self) -> torch.Tensor:
        if self.chunk is None or self.position == self.chunk.shape[0]:
            self.chunk, self.position = self.pending.result(), 0
            self.pending = _DRAWER.submit(self._draw)
        u = self.chunk[self.position]
        self.position += 1
        return u
