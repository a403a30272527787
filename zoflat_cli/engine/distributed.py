"""Data-parallel ZO under torchrun (torch.distributed): `torchrun --nproc-per-node N -m zoflat_cli finetune ...`.

Every rank holds the whole model and draws the same directions from the step's seed; a split's
micro-batches are dealt round-robin to the ranks, and each sum over them (a loss, a metric's
counts, a gradient or a Hessian-vector product) is all-reduced. A ZO step therefore exchanges
one float64 per loss query (16 bytes for a two-point step), the ranks apply the same update and
stay bit-identical, and the metrics equal the single-process run's up to the order of the sums.
Rank 0 writes the run folder; the other ranks write theirs to a private temporary folder, deleted
at the end (a resume starts them from a private copy of the resumed folder).
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch


class Group:
    """This process's rank among `world` data-parallel processes (world 1: a plain run)."""

    def __init__(self, rank: int = 0, world: int = 1, device=torch.device("cpu")):
        self.rank, self.world, self.device = rank, world, device
        self.bytes_sent = 0  # payload all-reduced so far (the benchmark's figure)

    def mine(self, items) -> list:
        """This rank's share of a split's micro-batches."""
        return list(items)[self.rank::self.world]

    def sum(self, values) -> list:
        """Σ over ranks of a few numbers, in float64."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._all_reduce(t)
        return t.tolist()

    def sum_tensors(self, tensors) -> list:
        """Σ over ranks of tensors (gradients, Hessian-vector products), in place."""
        for t in tensors if self.world > 1 else ():
            self._all_reduce(t)
        return tensors

    def any(self, flag: bool) -> bool:
        """True on every rank if it is on one (a Ctrl-C seen by some ranks stops all at the same step)."""
        return bool(self.sum([float(flag)])[0]) if self.world > 1 else flag

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _all_reduce(self, t: torch.Tensor):
        import torch.distributed as dist

        self.bytes_sent += t.numel() * t.element_size()
        dist.all_reduce(t)


SINGLE = Group()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def group_for(device):
    """The process group torchrun set up (gloo on CPU, nccl on CUDA: one GPU per local rank), or a single
    process on `device`."""
    if world_size() == 1:
        yield Group(device=device)
        return
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Group(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def private_outputs(group: Group, config: dict, resume):
    """(config, resume) for this rank: rank 0's as given; the others' in a temporary folder."""
    if group.rank == 0:
        group.barrier()  # the others have copied the resumed folder before rank 0 touches it
        yield config, resume
        return
    with tempfile.TemporaryDirectory(prefix=f"zoflat-rank{group.rank}-") as tmp:
        if resume:
            resume = Path(shutil.copytree(resume, Path(tmp) / Path(resume).name))
        group.barrier()
        yield {**config, "out": tmp, "logger": None}, resume
