"""This process's place among data-parallel processes (torch.distributed), as a problem sees it:
its share of a split's micro-batches and the sums over all ranks. engine/distributed.py sets the
group up under torchrun; a plain run is a group of one."""

import contextlib
import re

import torch

from zoflat_cli.errors import RunFailed, one_line


def lost_peer(err: Exception) -> RunFailed:
    """A collective that failed (a rank killed or gone): one line, the run marked failed and resumable."""
    reason = re.sub(r"^\[[^\]]*\]\s*", "", one_line(err)).split(". ")[0]  # gloo's: "[file:line] Read error ...."
    return RunFailed(f"data-parallel: a peer process was lost ({reason}); the run folder is resumable: the same "
                     f"torchrun command with --resume")


class ProcessGroup:
    """This process's rank among `world` data-parallel processes (world 1: a plain run)."""

    def __init__(self, rank: int = 0, world: int = 1, device=torch.device("cpu")):
        self.rank, self.world, self.device = rank, world, device
        self.bytes_sent, self.collectives = 0, 0  # payload all-reduced so far, and in how many calls (the benchmark's)
        self.by_itself = False  # inside alone()

    @contextlib.contextmanager
    def alone(self):
        """Inside, this rank works as a process of its own: every micro-batch is its, and no sum goes
        over ranks. The ranks make equal shares of a step's evaluations this way, each on the whole
        batch, so each of its forward passes is counted for all ranks (`counts_for`)."""
        self.by_itself = True
        try:
            yield
        finally:
            self.by_itself = False

    @property
    def counts_for(self) -> int:
        """How many ranks' forward passes each of this rank's stands for."""
        return self.world if self.by_itself else 1

    def mine(self, items) -> list:
        """This rank's share of a split's micro-batches."""
        return list(items) if self.by_itself else list(items)[self.rank::self.world]

    def sum(self, values) -> list:
        """Σ over ranks of a few numbers, in float64."""
        if self.world == 1 or self.by_itself:
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

            try:
                dist.barrier()
            except RuntimeError as err:
                raise lost_peer(err) from None

    def _all_reduce(self, t: torch.Tensor):
        import torch.distributed as dist

        self.bytes_sent += t.numel() * t.element_size()
        self.collectives += 1
        try:
            dist.all_reduce(t)
        except RuntimeError as err:
            raise lost_peer(err) from None
