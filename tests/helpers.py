"""Test-only helpers."""

import torch

from zoflat_cli.optim.structured import balanced


class BatchedAsModel(torch.nn.Module):
    """A batched problem (toy, convex) bound to one run, seen as a model for the in-place path:
    one parameter per block of x, shaped as the block's most nearly square matrix (as the batched
    path's structured laws see it), loss() (its forward) and gradient() at x, jvp(u) = uᵀ∇f by
    forward-mode AD. The tests drive both paths with it to show that they share one optimizer core."""

    def __init__(self, problem, x):
        super().__init__()
        self.problem = problem
        blocks = getattr(problem, "blocks", {"x": slice(0, x.shape[-1])})
        for i, s in enumerate(blocks.values()):  # owned by this module: its forward is what the probes hook
            self.register_parameter(f"block{i}", torch.nn.Parameter(x[s].detach().clone().view(balanced(s.stop - s.start))))
        self.params = list(self.parameters())
        self.device = x.device

    @property
    def x(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self._parameters.values()])  # as the probes swap them

    def forward(self):
        return self.problem.loss(self.x[None])[0]

    def loss(self, split: str = "batch") -> float:  # one function: every split is the whole of it
        with torch.no_grad():
            return float(self())

    def gradient(self) -> list:
        with torch.no_grad():
            g = self.problem.grad(self.x.detach()[None])[0]
        return [part.view_as(p) for part, p in zip(g.split([p.numel() for p in self.params]), self.params)]

    def jvp(self, tangents) -> float:
        flat = torch.cat([t.reshape(-1) for t in tangents])
        return float(torch.func.jvp(lambda v: self.problem.loss(v[None])[0], (self.x.detach(),), (flat,))[1])
