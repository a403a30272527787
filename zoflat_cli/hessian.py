"""Hessian trace estimators for models given as parameter tensors and a loss.

hutchinson:         Tr H = E vᵀHv, v Rademacher, Hv by double backward (exact in expectation).
finite_difference:  Tr H ≈ E (f(x+δu) + f(x-δu) - 2f(x)) / δ², u ~ N(0, I): forward passes only;
                    the paper's forward-only estimator in its symmetric form (error O(δ²)).
Both return (mean, standard error) over the probes.
"""

import math

import torch


def mean_stderr(values) -> tuple:
    values = torch.tensor(values, dtype=torch.float64)
    mean = values.mean().item()
    stderr = (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else float("nan")
    return mean, stderr


def hutchinson(params, loss_terms, probes: int, generator: torch.Generator) -> tuple:
    """loss_terms() yields scalar losses (e.g. per micro-batch) that sum to the loss."""
    values = []
    for _ in range(probes):
        v = [torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype) * 2 - 1
             for p in params]
        total = 0.0
        for loss in loss_terms():
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            pairs = [(g, vi) for g, vi in zip(grads, v) if g is not None]
            gv = sum((g * vi).sum() for g, vi in pairs)
            used = [p for p, g in zip(params, grads) if g is not None]
            hv = torch.autograd.grad(gv, used, allow_unused=True)
            total += sum((vi * h).sum().item() for (_, vi), h in zip(pairs, hv) if h is not None)
        values.append(total)
    return mean_stderr(values)


@torch.no_grad()
def finite_difference(directions, loss, seeds, delta: float) -> tuple:
    """directions: an inplace.Directions over the parameters; loss() evaluates at the current point.
    The parameters are restored bit for bit from a copy, so estimating never moves a run."""
    saved = [p.detach().clone() for p in directions.params]
    f0 = float(loss())
    values = []
    for seed in seeds:
        directions.add([(seed, delta)])
        f_plus = float(loss())
        directions.add([(seed, -2 * delta)])
        f_minus = float(loss())
        for p, s in zip(directions.params, saved):
            p.copy_(s)
        values.append((f_plus + f_minus - 2 * f0) / delta**2)  # python floats: float64
    return mean_stderr(values)
