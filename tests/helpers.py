"""Test-only helpers."""

import torch


class BatchedAsModel(torch.nn.Module):
    """A batched problem (toy, convex) bound to one run, seen as a model for the in-place path:
    one parameter vector x, loss() (its forward) and gradient() at x, jvp(u) = uᵀ∇f by
    forward-mode AD. The tests drive both paths with it to show that they share one optimizer core."""

    def __init__(self, problem, x):
        super().__init__()
        self.problem = problem
        self.x = torch.nn.Parameter(x.detach().clone())
        self.params = [self.x]
        self.device = x.device

    def forward(self):
        return self.problem.loss(self.x[None])[0]

    def loss(self) -> float:
        with torch.no_grad():
            return float(self())

    def gradient(self) -> list:
        with torch.no_grad():
            return [self.problem.grad(self.x.detach()[None])[0]]

    def jvp(self, tangents) -> float:
        return float(torch.func.jvp(lambda v: self.problem.loss(v[None])[0], (self.x.detach(),), (tangents[0],))[1])
