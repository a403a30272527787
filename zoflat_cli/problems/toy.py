"""Example 2.1 of the paper: f(y, z) = (yᵀz - 1)² / 2 with y, z in R^d.

Every minimiser has yᵀz = 1; the Hessian trace there is ‖y‖² + ‖z‖² ≥ 2, with equality at the
flattest minima (y = z, ‖y‖ = 1). Gradient flow conserves the balance B = (‖y‖² - ‖z‖²)/2;
ZO descends the smoothed loss f + λ²(‖y‖² + ‖z‖²)/2 + const, under which dE[B]/dt = -2λ²E[B]
(Proposition 2.2), so ZO drifts to balanced, flat minima.
"""

import torch

from zoflat_cli.arrays import concat, vecdot


class ToyProblem:
    """A BatchedProblem (protocols.py) that is its own bound problem: every run sees one function."""

    best = {"loss": "min", "hessian_trace": "min"}
    numpy = True  # loss and grad take numpy arrays too (arrays.py): the batched runner's fast path
    references = {"hessian_trace": (2.0, "flat minimum (trace 2)"),
                  "lambda_max": (2.0, "flat minimum (λ_max 2)")}
    panels = None

    def __init__(self, dim: int):
        self.dim = dim
        self.n_params = 2 * dim
        self.blocks = {"y": slice(0, dim), "z": slice(dim, 2 * dim)}
        self.description = {}

    def memory_bytes(self, runs, itemsize: int) -> int:
        """About what training `runs` holds: per run x, its directions, gradient and rule state."""
        return sum(2 * self.dim * (r.samples + 8) for r in runs) * itemsize

    def init(self, generator: torch.Generator, dtype, device) -> torch.Tensor:
        """x = (y, z) ~ N(0, I), drawn in float64 whatever the run's dtype."""
        x = torch.randn(self.n_params, generator=generator, device=device, dtype=torch.float64)
        return x.to(dtype)

    def bind(self, runs) -> "ToyProblem":
        return self

    def _split(self, x):
        return x[..., : self.dim], x[..., self.dim :]

    def loss(self, x):
        y, z = self._split(x)
        return 0.5 * (vecdot(y, z) - 1) ** 2

    def grad(self, x):
        y, z = self._split(x)
        return concat((z, y)) * (vecdot(y, z) - 1)[..., None]

    def hvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """∇²f(x) v for v (..., 2d, k): ∇²f = [[zzᵀ, rI + zyᵀ], [rI + yzᵀ, yyᵀ]], r = yᵀz - 1."""
        y, z = self._split(x)
        a, b = v[..., : self.dim, :], v[..., self.dim :, :]
        r = (torch.linalg.vecdot(y, z) - 1)[..., None, None]
        za = (z.unsqueeze(-1) * a).sum(-2, keepdim=True)  # zᵀa, (..., 1, k)
        yb = (y.unsqueeze(-1) * b).sum(-2, keepdim=True)
        return torch.cat((z.unsqueeze(-1) * (za + yb) + r * b, y.unsqueeze(-1) * (za + yb) + r * a), dim=-2)

    def lambda_max(self, x: torch.Tensor) -> torch.Tensor:
        """Exact top Hessian eigenvalue. span{(y,0), (z,0), (0,y), (0,z)} is invariant; on its
        orthogonal complement ∇²f(a, b) = r(b, a), eigenvalues ±r. So λ_max = max(top eigenvalue
        of the 4x4 restriction, |r|)."""
        finite = torch.isfinite(x).all(-1)
        x = torch.where(finite.unsqueeze(-1), x, torch.zeros_like(x))  # a diverged run: NaN, not an error
        y, z = self._split(x)
        zero = torch.zeros_like(y)
        basis = torch.stack((torch.cat((y, zero), -1), torch.cat((z, zero), -1),
                             torch.cat((zero, y), -1), torch.cat((zero, z), -1)), dim=-1)
        q, _ = torch.linalg.qr(basis)
        restricted = q.transpose(-1, -2) @ self.hvp(x, q)
        top = torch.linalg.eigvalsh((restricted + restricted.transpose(-1, -2)) / 2)[..., -1]
        top = torch.maximum(top, (torch.linalg.vecdot(y, z) - 1).abs())
        return torch.where(finite, top, torch.full_like(top, float("nan")))

    def metrics(self, x: torch.Tensor, step: int = None) -> dict:
        y, z = self._split(x)
        yy, zz = torch.linalg.vecdot(y, y), torch.linalg.vecdot(z, z)
        return {
            "loss": self.loss(x),
            "hessian_trace": yy + zz,  # exact: tr ∇²f = ‖z‖² + ‖y‖²
            "lambda_max": self.lambda_max(x),
            "grad_norm": torch.linalg.vector_norm(self.grad(x), dim=-1),
            "balance": (yy - zz) / 2,
        }

    def has_theory(self, run) -> bool:
        """Proposition 2.2 covers plain SGD steps of gd, dd (λ = 0), and two-point or one-sided ZO
        (the toy's one-sided estimate has the same mean: its O(λ) term is odd in u); LOZO and
        SubZero (their laws have E[uuᵀ] = I over the refreshes, y and z independent) and MeZO-SVRG
        (its mean is ∇f_λ(x)) to first order in η. Not HiZOO, Sparse MeZO (their Σ follows x) nor
        FZOO (its step is divided by a random spread)."""
        return run.optimizer in ("gd", "dd", "zo", "zo-one-sided", "lozo", "subzero", "mezo-svrg") and run.rule == "sgd"

    def drift_factor(self, law: str) -> float:
        """κ in E[ĝ] = ∇f + κλ²(y, z). With Σ_y, Σ_z the blocks' covariances and y, z independent,
        the λ² term is (Σ_y Σ_z y, Σ_z Σ_y z); for E[uuᵀ] = I it is E[u_p² u_q²] for p in y, q in z:
        1 for directions with independent coordinates (Gaussian, Rademacher) or independent blocks
        (lowrank, subspace, averaged over their refreshes), n/(n+2) for the sphere of radius √n
        (n = 2d parameters), whose coordinates are dependent."""
        n = self.n_params
        return n / (n + 2) if law == "sphere" else 1.0

    def theory(self, step: int, initial: dict, lr: torch.Tensor, lam: torch.Tensor, law: str = "gaussian") -> dict:
        """Proposition 2.2 in discrete time: E[B_t] = B_0 (1 - 2κηλ²)^t (λ = 0: conserved).
        lr and lam are (runs,); λ is 0 for optimizers without smoothing."""
        kappa = self.drift_factor(law)
        return {"balance_theory": initial["balance"] * (1 - 2 * kappa * lr * lam.square()) ** step}

