"""The seed streams: every random number a run uses comes from here, in both training paths.

A run's seed is split into independent named streams (initial point, search directions, ...),
so two runs with the same seed start from the same point and, if both draw directions, see the
same directions (common random numbers), whatever else runs beside them. Per-step draws (a step's
probes or batch) are keyed by `step_key(seed, stream, step, i)`: splitmix64 of the stream's seed,
the step and the draw's index, cheap enough to key every step; directions by (direction_base(seed,
i), step), which lets a small problem draw many steps with one seeding.
"""

import functools

import numpy as np
import torch

STREAM_IDS = {"init": 0, "directions": 1, "features": 2, "batches": 3, "probes": 4, "flatness": 5}
_MASK64 = (1 << 64) - 1


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one named stream of a run, via numpy's SeedSequence hashing."""
    state = np.random.SeedSequence([seed, STREAM_IDS[stream]]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def mix(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): a well-spread 63-bit seed."""
    z = (seed + 0x9E3779B97F4A7C15 * (index + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def mix_array(seed: np.ndarray, index: np.ndarray) -> np.ndarray:
    """mix over numpy uint64 arrays (wrapping arithmetic), for many keys at once."""
    with np.errstate(over="ignore"):
        z = seed + np.uint64(0x9E3779B97F4A7C15) * (index + np.uint64(1))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) >> np.uint64(1)


@functools.lru_cache(maxsize=4096)
def stream_base(seed: int, stream: str) -> int:
    return stream_seed(seed, stream)


def step_key(seed: int, stream: str, step: int, index: int = 0) -> int:
    """The key of draw `index` of a run's named stream at `step`."""
    return mix(mix(stream_base(seed, stream), step), index)


def direction_base(seed: int, sample: int) -> int:
    """The stream of a run's sample-th direction per step: direction (base, step) is drawn by
    optim/directions.py."""
    return mix(stream_base(seed, "directions"), sample)


def generator(seed: int, stream: str, device, *step_index: int) -> torch.Generator:
    """A generator for a run's stream, or, with (step[, index]), for one per-step draw of it."""
    gen = torch.Generator(device=device)
    gen.manual_seed(step_key(seed, stream, *step_index) if step_index else stream_seed(seed, stream))
    return gen
