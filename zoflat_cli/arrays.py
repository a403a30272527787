"""numpy or torch: the few operations whose spelling differs, so that a batched problem's loss and
gradient, and the batched runner's estimate, run on either.

The batched runner steps a small problem's groups on numpy arrays that share their tensors' memory
(engine/batched.py, the small-problem fast path): a step of the toy is a dozen operations on a
few hundred numbers, and numpy's per-call overhead is about half of torch's eager one.
"""

import functools

import numpy as np
import torch


def is_numpy(x) -> bool:
    return isinstance(x, np.ndarray)


def vecdot(a, b):
    """Σ a·b over the last axis."""
    return np.vecdot(a, b) if is_numpy(a) else torch.linalg.vecdot(a, b)


def concat(parts):
    """The arrays joined along their last axis."""
    return np.concatenate(parts, -1) if is_numpy(parts[0]) else torch.cat(parts, -1)


def addcmul(x, a, b):
    """x + a·b (torch's in one kernel)."""
    return x + a * b if is_numpy(x) else torch.addcmul(x, a, b)


def constant(values: tuple, like, shape: tuple):
    """`values` as an array of `like`'s kind, dtype and device, in `shape` (cached: no per-step allocation)."""
    return _constant(values, shape, like.dtype, None if is_numpy(like) else like.device)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, shape: tuple, dtype, device):
    if device is None:
        return np.array(values, dtype=dtype).reshape(shape)
    return torch.tensor(values, dtype=dtype, device=device).view(shape)
