"""Hessian trace estimators for models given as parameter tensors and a loss.

hutchinson:         Tr H = E vᵀHv, v Rademacher, Hv by double backward (exact in expectation);
                    per tensor, vᵢᵀ(Hv)ᵢ estimates the trace of H's diagonal block of tensor i, and
                    the blocks' estimates sum to the total's, probe by probe.
hutchpp:            Hutch++ (Meyer, Musco, Musco & Woodruff 2021): the trace of H on the span of
                    H·S (S: m/3 Rademacher columns) exactly, and Hutchinson on the rest: lower
                    variance than Hutchinson at the same m Hessian-vector products.
top_eigenvalue:     λ_max by power iteration on Hessian-vector products.
finite_difference:  Tr H ≈ E (f(x+δu) + f(x-δu) - 2f(x)) / δ², u ~ N(0, I): forward passes only;
                    the paper's forward-only estimator in its symmetric form (error O(δ²)).
Each returns (mean, standard error) over the probes.
"""

import math

import torch

from zoflat_cli.measures.subject import flatten, rademacher, unflatten
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


def hutchinson_terms(params, hessian_vector, probes: int, generator: torch.Generator) -> list:
    """Per probe v, per tensor i: vᵢᵀ(Hv)ᵢ (float64). hessian_vector(v) = ∇²f · v for v shaped like
    params (e.g. hvp above, or a model problem's)."""
    terms = []
    for _ in range(probes):
        v = rademacher(params, generator)
        terms.append([dot([a], [b]) for a, b in zip(v, hessian_vector(v))])
    return terms


def hutchinson(params, hessian_vector, probes: int, generator: torch.Generator) -> tuple:
    return mean_stderr([sum(row) for row in hutchinson_terms(params, hessian_vector, probes, generator)])


def hutchpp(params, hessian_vector, matvecs: int, generator: torch.Generator) -> tuple:
    """Hutch++ with `matvecs` (≥ 3) Hessian-vector products: a third sketch H·S, a third the trace of
    Qᵀ H Q on its orthonormal basis Q, the rest Hutchinson on (I − QQᵀ) H (I − QQᵀ). The standard
    error is the Hutchinson part's (the rest is exact given S)."""
    k = matvecs // 3
    if k < 1:
        raise ValueError("Hutch++ needs at least 3 Hessian-vector products")

    def apply(column):
        return flatten(hessian_vector(unflatten(column, params)), column.dtype)

    def columns(count):
        return torch.stack([flatten(rademacher(params, generator)) for _ in range(count)], dim=1)

    sketch = torch.stack([apply(c) for c in columns(k).T], dim=1)
    q, _ = torch.linalg.qr(sketch)
    exact = sum(float(q[:, j].double() @ apply(q[:, j]).double()) for j in range(q.shape[1]))
    rest = columns(matvecs - 2 * k)
    rest = rest - q @ (q.T @ rest)
    mean, stderr = mean_stderr([float(g.double() @ apply(g).double()) for g in rest.T])
    return exact + mean, stderr


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


def second_differences(loss, moves, delta: float) -> tuple:
    """(f(x+δu) + f(x-δu) - 2f(x)) / δ² per probe: moves yields, per probe u, move(scale), a context
    manager in which loss() is evaluated at x + scale·u."""
    f0 = float(loss())
    values = []
    for move in moves:
        with move(delta):
            f_plus = float(loss())
        with move(-delta):
            f_minus = float(loss())
        values.append((f_plus + f_minus - 2 * f0) / delta**2)  # python floats: float64
    return mean_stderr(values)


@torch.no_grad()
def finite_difference(directions, loss, keys, delta: float) -> tuple:
    """directions: a ParameterDirections over the parameters and the module that uses them, keys
    its probe directions; loss() evaluates the module. The probes are formed on the fly
    (directions.perturbed), so estimating never writes, let alone moves, the parameters."""
    return second_differences(loss, (lambda scale, key=key: directions.perturbed([(key, scale)]) for key in keys),
                              delta)
