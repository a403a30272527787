"""Shared by the benchmark scripts: the median wall time of a call (after one warm-up call), the
peak memory of one mode in a fresh process, a GD step, and MeZO's step written plainly, to compare
with."""

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


def peak_memory_of_mode(problem, optimizer, mode: str, steps: int, lr: float, device, samples: int = 1) -> dict:
    """In a fresh process: the peak memory of `steps` steps of one mode (inference, zo, gd) on a
    model problem, from a high-water mark reset after a warm-up (allocator pools and thread
    scratch exist in every mode), and the memory in use at the reset. zo: `samples` directions a step."""
    from zoflat_cli.devices import peak_memory_mib

    problem.loss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident size
    loaded = peak_memory_mib(device)
    for step in range(steps):
        if mode == "inference":
            problem.loss()
        elif mode == "zo":
            optimizer.step(problem, [(i, step) for i in range(samples)], step + 1)
        else:
            gd_step(problem, lr)
    return {"loaded_mib": loaded, "peak_mib": peak_memory_mib(device)}


def gd_step(problem, lr: float):
    """One plain gradient step on a model problem's parameters (backprop)."""
    grads = problem.gradient()
    with torch.no_grad():
        for p, g in zip(problem.params, grads):
            p.add_(g, alpha=-lr)


@torch.no_grad()
def mezo_step(params, loss, seed: int, lam: float, lr: float):
    """MeZO's reference step (its Algorithm 1), independent of zoflat's optim layer: perturb,
    perturb, restore, update, with z regenerated from torch.manual_seed(seed) for each pass."""
    def perturb(scale):
        torch.manual_seed(seed)
        for p in params:
            p.add_(torch.normal(mean=0, std=1, size=p.shape, dtype=p.dtype, device=p.device), alpha=scale)

    perturb(lam)
    f_plus = loss()
    perturb(-2 * lam)
    f_minus = loss()
    perturb(lam)
    perturb(-lr * (f_plus - f_minus) / (2 * lam))
