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
    """Σ_s coef[s, r] · u[s, r, :] over the samples s; coef is (samples, runs, 1). Estimators that
    average fold 1/samples into coef: on small tensors mean(0) costs 3x a sum, sum(0) 3x indexing."""
    terms = coef * u
    return terms[0] if len(terms) == 1 else terms.sum(0)


def two_point(problem, x, u, hyper):
    """Algorithm 1 of the paper: (f(x+λu) - f(x-λu)) / (2λ) · u, averaged over samples.
    Unbiased for the gradient of the smoothed loss E f(x + λu)."""
    lam = hyper["lambda"]
    signed = torch.stack((lam, -lam)).unsqueeze(1)  # (2, 1, runs, 1)
    f_plus, f_minus = problem.loss(torch.addcmul(x, signed, u)).unsqueeze(-1)  # one batched call
    return _combine((f_plus - f_minus) / (2 * len(u) * lam), u)


def directional(problem, x, u, hyper):
    """The λ → 0 limit of two_point: (uᵀ∇f) u. Unbiased for ∇f itself."""
    return _combine(torch.linalg.vecdot(u, problem.grad(x)).unsqueeze(-1) / len(u), u)


def sharpness_aware(problem, x, u, hyper):
    """SAM (Foret et al.): the gradient at the ascent point x + ρ ∇f(x)/‖∇f(x)‖."""
    g = problem.grad(x)
    norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    step = torch.where(norm > 0, hyper["rho"] / norm, torch.zeros_like(norm))  # at ∇f = 0: plain GD
    return problem.grad(x + step * g)


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


def zest(problem, x, u, hyper):
    """ZEST (arXiv 2510.16157): gradient of the tilted smoothed loss (1/t) log E exp(t f(x+λu))."""
    lam = hyper["lambda"]
    signed = torch.stack((lam, -lam)).unsqueeze(1)  # (2, 1, runs, 1)
    losses = problem.loss(torch.addcmul(x, signed, u)).unsqueeze(-1)  # (2, pairs, runs, 1), one call
    return _combine(tilted_coefficients(losses, lam, hyper["tilt"]), u)


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
