"""Shared by the benchmark scripts: the median wall time of a call, after one warm-up call."""

import statistics
import time

import torch


def _finished():
    """Wall time means work done: wait for queued GPU kernels (a no-op without CUDA)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _finished()
        start = time.perf_counter()
        fn()
        _finished()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
