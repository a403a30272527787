"""Gradient estimators: one interface, batched over runs.

Every estimator is a pure function `estimate(problem, x, u, hyper) -> g` where
  x     (runs, dim)            current points, one row per run,
  u     (samples, runs, dim)   Gaussian directions (None for estimators that use none),
  hyper {name: (runs, 1)}      per-run hyperparameters (HYPERPARAMETERS), e.g. hyper["lambda"],
and g has the shape of x. `problem` gives `loss(x)` over any leading batch shape and `grad(x)`.
"""

from typing import Callable, NamedTuple, Optional

import torch

from zoflat_cli.errors import ZoflatError


# Per-run hyperparameters an estimator may take, with the short tag used in run ids.
HYPERPARAMETERS = {"lambda": "lam", "rho": "rho", "tilt": "t"}
# Default directions per step (`--samples`; ZEST's `--pairs`): ZEST needs several pairs to tilt.
SAMPLES = {"zo": 1, "dd": 1, "zest": 4}


class Estimator(NamedTuple):
    name: str
    description: str
    estimate: Callable
    hyper: tuple  # names from HYPERPARAMETERS it reads
    uses_directions: bool
    evals_per_sample: int  # oracle calls (loss values, gradients or JVPs) per sample and step


def exact_gradient(problem, x, u, hyper):
    return problem.grad(x)


def _combine(coef: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Average of coef[s, r] * u[s, r, :] over the samples s; coef is (samples, runs, 1)."""
    terms = coef * u
    return terms[0] if len(terms) == 1 else terms.mean(0)  # mean() over one sample costs 4x more


def two_point(problem, x, u, hyper):
    """Algorithm 1 of the paper: (f(x+λu) - f(x-λu)) / (2λ) · u, averaged over samples.
    Unbiased for the gradient of the smoothed loss E f(x + λu)."""
    lam = hyper["lambda"]
    signed = torch.stack((lam, -lam)).unsqueeze(1)  # (2, 1, runs, 1)
    f_plus, f_minus = problem.loss(torch.addcmul(x, signed, u)).unsqueeze(-1)  # one batched call
    return _combine((f_plus - f_minus) / (2 * lam), u)


def directional(problem, x, u, hyper):
    """The λ → 0 limit of two_point: (uᵀ∇f) u. Unbiased for ∇f itself."""
    return _combine(torch.linalg.vecdot(u, problem.grad(x)).unsqueeze(-1), u)


def sharpness_aware(problem, x, u, hyper):
    """SAM (Foret et al.): the gradient at the ascent point x + ρ ∇f(x)/‖∇f(x)‖."""
    g = problem.grad(x)
    norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    step = torch.where(norm > 0, hyper["rho"] / norm, torch.zeros_like(norm))  # at ∇f = 0: plain GD
    return problem.grad(x + step * g)


def sinhc(x: torch.Tensor) -> torch.Tensor:
    """sinh(x)/x, 1 at 0 (series below |x| = 1e-3, where the quotient loses digits)."""
    small = x.abs() < 1e-3
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1 + x.square() / 6, torch.sinh(safe) / safe)


def tilted_coefficients(f_plus: torch.Tensor, f_minus: torch.Tensor, lam, tilt) -> torch.Tensor:
    """ZEST's ĝ = Σ_i c_i u_i over n antithetic pairs (dim 0): c_i = (w_i⁺ - w_i⁻)/(tλ), w the
    softmax of a = t·f over all 2n values. Where |tΔ_i/2| < 1 (Δ = f⁺ - f⁻) the difference cancels,
    so it is computed as (Δ_i/λ) · sinhc(tΔ_i/2) · exp((a_i⁺ + a_i⁻)/2 - logsumexp(a)): exact at
    t = 0 (the mean of the n two-point estimates), no 0/0, and tanh(tΔ/2)/(tλ) for n = 1.
    Elsewhere the softmax difference itself is exact and cannot overflow."""
    delta = f_plus - f_minus
    a_plus, a_minus = tilt * f_plus, tilt * f_minus
    log_z = torch.logsumexp(torch.cat((a_plus, a_minus)), dim=0)  # max-subtracted internally
    half = tilt * delta / 2
    small = half.abs() < 1
    near = delta / lam * sinhc(torch.where(small, half, torch.zeros_like(half))) * torch.exp(
        (a_plus + a_minus) / 2 - log_z)
    safe_tilt = torch.where(small, torch.ones_like(half), tilt * torch.ones_like(half))
    far = (torch.exp(a_plus - log_z) - torch.exp(a_minus - log_z)) / (safe_tilt * lam)
    return torch.where(small, near, far)


def zest(problem, x, u, hyper):
    """ZEST (arXiv 2510.16157): gradient of the tilted smoothed loss (1/t) log E exp(t f(x+λu))."""
    lam = hyper["lambda"]
    signed = torch.stack((lam, -lam)).unsqueeze(1)  # (2, 1, runs, 1)
    f_plus, f_minus = problem.loss(torch.addcmul(x, signed, u)).unsqueeze(-1)  # (pairs, runs, 1) each
    return (tilted_coefficients(f_plus, f_minus, lam, hyper["tilt"]) * u).sum(0)


ESTIMATORS = {
    e.name: e
    for e in (
        Estimator("gd", "exact gradient", exact_gradient, (), False, 1),
        Estimator("zo", "two-point Gaussian ZO (Algorithm 1)", two_point, ("lambda",), True, 2),
        Estimator("dd", "directional derivative (uᵀ∇f)u", directional, (), True, 1),
        Estimator("sam", "sharpness-aware minimisation (gradient at x + ρ g/‖g‖)", sharpness_aware,
                  ("rho",), False, 2),
        Estimator("zest", "ZEST: tilted two-point ZO over n antithetic pairs (--pairs, --tilt)", zest,
                  ("lambda", "tilt"), True, 2),
    )
}


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ZoflatError(f"unknown optimizer {name!r}; choose from {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


def n_evals(estimator: Estimator, samples: Optional[int]) -> int:
    return estimator.evals_per_sample * (samples if estimator.uses_directions else 1)
