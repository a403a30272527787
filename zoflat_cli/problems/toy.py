"""Example 2.1 of the paper: f(y, z) = (yᵀz - 1)² / 2 with y, z in R^d.

Every minimiser has yᵀz = 1; the Hessian trace there is ‖y‖² + ‖z‖² ≥ 2, with equality at the
flattest minima (y = z, ‖y‖ = 1). Gradient flow conserves the balance B = (‖y‖² - ‖z‖²)/2;
ZO descends the smoothed loss f + λ²(‖y‖² + ‖z‖²)/2 + const, under which dE[B]/dt = -2λ²E[B]
(Proposition 2.2), so ZO drifts to balanced, flat minima.
"""

import torch


class ToyProblem:
    command = "toy"
    # Metrics whose best value over a run goes in summary.json, and which way is better.
    best = {"loss": "min", "hessian_trace": "min"}
    references = {"hessian_trace": (2.0, "flat minimum (trace 2)")}

    def __init__(self, dim: int):
        self.dim = dim
        self.n_params = 2 * dim

    def init(self, generator: torch.Generator, dtype, device) -> torch.Tensor:
        """x = (y, z) ~ N(0, I), drawn in float64 whatever the run's dtype."""
        x = torch.randn(self.n_params, generator=generator, device=device, dtype=torch.float64)
        return x.to(dtype)

    def bind(self, runs) -> "ToyProblem":
        """Every run sees the same function: nothing to specialise per group."""
        return self

    def _split(self, x):
        return x[..., : self.dim], x[..., self.dim :]

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        y, z = self._split(x)
        return 0.5 * (torch.linalg.vecdot(y, z) - 1).square()

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        y, z = self._split(x)
        residual = torch.linalg.vecdot(y, z) - 1
        return torch.cat((z, y), dim=-1) * residual.unsqueeze(-1)

    def metrics(self, x: torch.Tensor) -> dict:
        y, z = self._split(x)
        yy, zz = torch.linalg.vecdot(y, y), torch.linalg.vecdot(z, z)
        return {
            "loss": self.loss(x),
            "hessian_trace": yy + zz,  # exact: tr ∇²f = ‖z‖² + ‖y‖²
            "balance": (yy - zz) / 2,
        }

    def theory(self, step: int, initial: dict, lr: torch.Tensor, lam: torch.Tensor) -> dict:
        """Proposition 2.2 in discrete time: E[B_t] = B_0 (1 - 2ηλ²)^t (λ = 0: conserved).
        lr and lam are (runs,); λ is 0 for optimizers without smoothing."""
        return {"balance_theory": initial["balance"] * (1 - 2 * lr * lam.square()) ** step}


# The paper's setting (Section 2, Figure 1): d = 100, T = 100,000, GD lr 0.01, ZO lr 0.001, λ = 0.1.
DEFAULTS = {
    "command": "toy",
    "name": "toy",
    "out": "runs",
    "device": "auto",
    "dtype": "float64",
    "dim": 100,
    "steps": 100_000,
    "log_every": 100,
    "seeds": [13],
    "optimizer": ["gd", "zo", "dd"],
    "lr": {"gd": 0.01, "zo": 0.001, "dd": 0.001, "sam": 0.01},
    "lambda": 0.1,
    "rho": 0.05,
    "samples": 1,
}
