"""The machine a run is on: devices and dtypes, free and peak memory."""

import os
import resource

import torch

from zoflat_cli.env import DTYPE_NAMES
from zoflat_cli.errors import ZoflatError

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def available_bytes(device: torch.device) -> int:
    """Memory free for a new allocation: the GPU's free memory, or the system's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: what is not yet used at all
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(needed: int, device: torch.device, what: str):
    """Refuses, before anything is allocated or written, a problem that cannot fit in memory."""
    free = available_bytes(device)
    if needed > free:
        raise ZoflatError(f"{what}: about {needed / 2**30:.1f} GiB of memory needed, {free / 2**30:.1f} GiB free "
                          f"on {device.type}; make it smaller")


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ZoflatError("--device cuda: no CUDA device is available to torch (use --device cpu)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def peak_memory_mib(device) -> float:
    """CUDA: peak allocated. CPU: the process's resident high-water mark (Linux VmHWM, which,
    unlike ru_maxrss, is not inherited across exec)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
