"""Gradient estimators as coefficient rules, shared by the batched and the in-place paths.

An estimator says which oracle it queries and how the answers become the estimate
ĝ = Σ_i c_i u_i over n directions u_i (or, for gd/sam, the gradient itself):
  query "loss"         f at x + o·λ·u_i for each offset o in `offsets` (and f(x) if `center`);
                       `coefficients(values (len(offsets), n, ...), center, hyper) -> c (n, ...)`
  query "directional"  d_i = u_iᵀ∇f (dd: from the gradient; fwd-grad: a JVP); c_i = d_i / n
  query "gradient"     ∇f (gd), or ∇f at the ascent point x + ρ∇f/‖∇f‖ (sam)
How a path queries (a batched tensor call over (samples, runs, dim), or passes over one model's
parameters in place) is the path's business; what the answers mean is decided here, once.
The batched path's `estimate` is engine/batched.py's.
"""

from typing import Callable, NamedTuple, Optional

import torch



class Estimator(NamedTuple):
    name: str
    description: str
    query: str  # loss | directional | gradient
    hyper: tuple  # names of the hyperparameters it reads (lambda, tilt, rho)
    evals_per_sample: int  # oracle calls (loss values, gradients or JVPs) per direction
    evals_fixed: int = 0  # oracle calls per step besides those (f(x), gradients)
    offsets: tuple = ()  # query "loss": multiples of λ, in evaluation order
    center: bool = False  # query "loss": also f(x)
    coefficients: Optional[Callable] = None
    jvp: bool = False  # query "directional": by forward-mode AD instead of the gradient

    @property
    def uses_directions(self) -> bool:
        return self.query != "gradient"


def two_point(values, center, hyper):
    """Algorithm 1 of the paper: c_i = (f(x+λu_i) - f(x-λu_i)) / (2λn). Unbiased for the
    gradient of the smoothed loss E f(x + λu)."""
    return (values[0] - values[1]) / (2 * len(values[0]) * hyper["lambda"])


def one_sided(values, center, hyper):
    """Forward difference: c_i = (f(x+λu_i) - f(x)) / (λn); bias O(λ) (the two-point's is O(λ²))."""
    return (values[0] - center) / (len(values[0]) * hyper["lambda"])


def directional(values, center, hyper):
    """c_i = u_iᵀ∇f / n: the λ → 0 limit of two_point, unbiased for ∇f itself."""
    return values[0] / len(values[0])


def tilted_coefficients(losses: torch.Tensor, lam, tilt) -> torch.Tensor:
    """ZEST's ĝ = Σ_i c_i u_i over n antithetic pairs, from losses (2, n, ...) = f(x ± λu_i):
    c_i = (w_i⁺ - w_i⁻)/(tλ), w the softmax of a = t·f over all 2n values. Per pair,
    w_i⁺ - w_i⁻ = (w_i⁺ + w_i⁻) tanh(h_i) with h_i = tΔ_i/2, Δ = f⁺ - f⁻, so
    c_i = (Δ_i/2) · tanh(h_i)/h_i · (w_i⁺ + w_i⁻) / λ: no cancellation, no overflow, and no 0/0 at
    t = 0, where tanh(h)/h = 1 gives exactly the mean of the n two-point estimates; for n = 1 it is
    tanh(tΔ/2)/(tλ). One formula in few kernels: on the toy the loss itself is only a handful."""
    a = tilt * losses
    w = a.flatten(0, 1).softmax(0).view_as(a)  # max-subtracted: exp(t·f) never overflows
    half_delta = (losses[0] - losses[1]) / 2
    h = tilt * half_delta
    tanhc = torch.nan_to_num(torch.tanh(h) / h, nan=1.0)  # 0/0 only at h = 0; a NaN loss stays NaN in Δ
    return half_delta * tanhc * (w[0] + w[1]) / lam


def tilted(values, center, hyper):
    """ZEST (arXiv 2510.16157): gradient of the tilted smoothed loss (1/t) log E exp(t f(x+λu))."""
    return tilted_coefficients(values, hyper["lambda"], hyper["tilt"])


def ascent_scale(grad_norm, rho):
    """SAM's step to the ascent point, x + s·∇f with s = ρ/‖∇f‖ (0 at ∇f = 0: plain GD)."""
    if isinstance(grad_norm, torch.Tensor):
        return torch.where(grad_norm > 0, rho / grad_norm, torch.zeros_like(grad_norm))
    return rho / grad_norm if grad_norm > 0 else 0.0


ESTIMATORS = {
    e.name: e
    for e in (
        Estimator("gd", "exact gradient", "gradient", (), 0, 1),
        Estimator("sam", "gradient at the ascent point x + ρ∇f/‖∇f‖ (Foret et al.)", "gradient", ("rho",), 0, 2),
        Estimator("two-point", "two-point ZO, (f(x+λu) - f(x-λu))/(2λ) · u", "loss", ("lambda",), 2,
                  offsets=(1, -1), coefficients=two_point),
        Estimator("one-sided", "forward difference, (f(x+λu) - f(x))/λ · u", "loss", ("lambda",), 1, 1,
                  offsets=(1,), center=True, coefficients=one_sided),
        Estimator("tilted", "ZEST: tilted two-point over n antithetic pairs (--pairs, --tilt)", "loss",
                  ("lambda", "tilt"), 2, offsets=(1, -1), coefficients=tilted),
        Estimator("directional", "(uᵀ∇f) u from the gradient", "directional", (), 1, coefficients=directional),
        Estimator("jvp", "(uᵀ∇f) u by forward-mode AD (a JVP, no backward pass)", "directional", (), 1,
                  coefficients=directional, jvp=True),
    )
}


def n_evals(estimator: Estimator, samples: int) -> int:
    """Oracle calls per step (loss values, gradients or JVPs)."""
    return estimator.evals_fixed + estimator.evals_per_sample * (samples if estimator.uses_directions else 0)
