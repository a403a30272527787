"""Worst-case sharpness: how much the training loss can rise within a ball around the point.

    S(ρ) = max_{‖ε‖₂ ≤ ρ} f(w + c ⊙ ε) − f(w)

plain (c = 1): ρ-sharpness, SAM's inner problem (Foret et al. 2021). adaptive (c = |w| + η):
the ball is scaled per weight (Kwon et al. 2021, ASAM; Andriushchenko et al. 2023), so rescaling
a layer's weights against the next (which leaves the function unchanged) leaves S unchanged up to
η; the Hessian trace and plain sharpness change under it. m-sharpness (Foret et al.;
Andriushchenko & Flammarion 2022): the mean of S over disjoint batches of m training examples,
each batch's own worst case.

The maximum is taken by projected, normalised gradient ascent from a random point of the sphere
(the gradient at a minimum is 0, so a start at w would not move), and S is the largest rise
seen: a lower bound of the maximum that tightens with the number of steps. On a quadratic at its
minimum the iteration is a power iteration on C H C, and S → ρ²/2 · λ_max(C H C) (tested).
"""

import torch

from zoflat_cli.measures.hessian import mean_stderr
from zoflat_cli.measures.subject import gaussian, norm, shifted


def ascent_sharpness(subject, rho: float, steps: int, generator: torch.Generator, adaptive: bool,
                     eta: float = 0.01) -> float:
    params = subject.params
    scale = [p.detach().abs() + eta if adaptive else torch.ones_like(p) for p in params]
    base = subject.loss()
    eps = gaussian(params, generator)
    size = norm(eps)
    eps = [e * (rho / size) for e in eps]
    best = float("-inf")
    for step in range(steps + 1):
        with shifted(params, [c * e for c, e in zip(scale, eps)]):
            best = max(best, subject.loss() - base)
            if step == steps:
                break
            grad = [c * g for c, g in zip(scale, subject.gradient())]  # ∇ε of f(w + c ⊙ ε)
        size = norm(grad)
        if size == 0:
            break
        eps = [e + (rho / size) * g for e, g in zip(eps, grad)]
        size = norm(eps)
        if size > rho:  # back onto the ball
            eps = [e * (rho / size) for e in eps]
    return best


def m_sharpness(subject, m: int, rho: float, steps: int, generator: torch.Generator, adaptive: bool,
                eta: float = 0.01) -> tuple:
    """(mean, standard error) of the worst-case rise over disjoint batches of m examples (a seeded
    shuffle of the training set; a last partial batch is left out)."""
    n = subject.examples()
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    values = []
    for start in range(0, n - m + 1, m):
        with subject.restricted(order[start:start + m]):
            values.append(ascent_sharpness(subject, rho, steps, generator, adaptive, eta))
    return mean_stderr(values)
