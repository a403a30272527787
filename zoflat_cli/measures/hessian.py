"""Hessian trace estimators for models given as parameter tensors and a loss.

hutchinson:         Tr H = E vᵀHv, v Rademacher, Hv by double backward (exact in expectation).
top_eigenvalue:     λ_max by power iteration on Hessian-vector products.
finite_difference:  Tr H ≈ E (f(x+δu) + f(x-δu) - 2f(x)) / δ², u ~ N(0, I): forward passes only;
                    the paper's forward-only estimator in its symmetric form (error O(δ²)).
Both return (mean, standard error) over the probes.
"""

import math

import torch

from zoflat_cli.optim.parameters import dot


def mean_stderr(values) -> tuple:
    values = torch.tensor(values, dtype=torch.float64)
    mean = values.mean().item()
    stderr = (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else float("nan")
    return mean, stderr


def hvp(params, loss_terms, v) -> list:
    """∇²f · v by double backward, summed over loss_terms() (which yields scalar losses, e.g. per
    micro-batch, summing to f); zeros for parameters the loss does not reach."""
    out = [torch.zeros_like(p) for p in params]
    for loss in loss_terms():
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None]
        gv = sum((grads[i] * v[i]).sum() for i in used)
        for i, h in zip(used, torch.autograd.grad(gv, [params[i] for i in used], allow_unused=True)):
            if h is not None:
                out[i] += h.detach()
    return out


def hutchinson(params, hessian_vector, probes: int, generator: torch.Generator) -> tuple:
    """hessian_vector(v) = ∇²f · v for v shaped like params (e.g. hvp above, or a model problem's)."""
    values = []
    for _ in range(probes):
        v = [torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype) * 2 - 1
             for p in params]
        values.append(dot(v, hessian_vector(v)))
    return mean_stderr(values)


def top_eigenvalue(params, hessian_vector, iters: int, generator: torch.Generator) -> float:
    """λ_max by power iteration with Hessian-vector products from a Gaussian start: the Rayleigh
    quotient after `iters` products (the eigenvalue of largest magnitude; λ_max when it dominates)."""
    v = [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) for p in params]
    value = float("nan")
    for _ in range(iters):
        norm = dot(v, v) ** 0.5
        v = [x / norm for x in v]
        hv = hessian_vector(v)
        value = dot(v, hv)
        v = hv
    return value


@torch.no_grad()
def finite_difference(directions, loss, keys, delta: float) -> tuple:
    """directions: a ParameterDirections over the parameters and the module that uses them, keys
    its probe directions; loss() evaluates the module. The probes are formed on the fly
    (directions.perturbed), so estimating never writes, let alone moves, the parameters."""
    f0 = float(loss())
    values = []
    for key in keys:
        with directions.perturbed([(key, delta)]):
            f_plus = float(loss())
        with directions.perturbed([(key, -delta)]):
            f_minus = float(loss())
        values.append((f_plus + f_minus - 2 * f0) / delta**2)  # python floats: float64
    return mean_stderr(values)
