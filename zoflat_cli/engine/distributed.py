"""Data-parallel ZO under torchrun (torch.distributed): `torchrun --nproc-per-node N -m zoflat_cli finetune ...`.

Every rank holds the whole model and draws the same directions from the step's seed. A ZO step's
loss evaluations (2n for two-point with --samples n) are split among the ranks when they are a
multiple of the ranks: each rank makes its share on the whole batch, drawing only those probes'
directions, and one all-reduce gathers them (optim/inplace.py), so the losses are the single
process's bit for bit. Otherwise, and for everything else (a metric's counts, a gradient, a
Hessian-vector product), a split's micro-batches are dealt round-robin to the ranks and each sum
over them is all-reduced. Either way a step exchanges one float64 per loss value (16 bytes for a
two-point step) and the ranks apply the same update pass and stay bit-identical; the metrics equal
the single-process run's up to the order of the sums.
Rank 0 writes the run folder; the other ranks write theirs to a private temporary folder, deleted
at the end (a resume starts them from a private copy of the resumed folder).
"""

import contextlib
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import torch

from zoflat_cli.errors import ZoflatError
from zoflat_cli.process_group import ProcessGroup, lost_peer
from zoflat_cli.runs.identity import digest


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def group_for(device):
    """The process group torchrun set up (gloo on CPU, nccl on CUDA: one GPU per local rank), or a single
    process on `device`."""
    if world_size() == 1:
        yield ProcessGroup(device=device)
        return
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield ProcessGroup(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()


def check_same_config(group: ProcessGroup, config: dict):
    """Every rank runs rank 0's config (else they would deadlock on other --steps, or mix two
    models' losses): a rank given another one stops every rank with one line, before any folder."""
    if group.world == 1:
        return
    import torch.distributed as dist

    mine = digest(config)  # the whole config, --steps included
    every = [None] * group.world
    try:
        dist.all_gather_object(every, mine)
    except RuntimeError as err:
        raise lost_peer(err) from None
    others = [rank for rank, digest in enumerate(every) if digest != every[0]]
    if others:
        raise ZoflatError(f"torchrun: rank {others[0]} was given another config than rank 0; every rank must run "
                          f"the same zoflat command")


@contextlib.contextmanager
def private_outputs(group: ProcessGroup, config, resume):
    """(typed config, resume) for this rank: rank 0's as given; the others' in a temporary folder."""
    if group.rank == 0:
        group.barrier()  # the others have copied the resumed folder before rank 0 touches it
        yield config, resume
        return
    with tempfile.TemporaryDirectory(prefix=f"zoflat-rank{group.rank}-") as tmp:
        if resume:
            resume = Path(shutil.copytree(resume, Path(tmp) / Path(resume).name))
        group.barrier()
        yield dataclasses.replace(config, out=tmp, logger=None), resume
