"""Loss-landscape slices around a point (Li, Xu, Taylor, Studer & Goldstein 2018).

A filter-normalised direction is a Gaussian direction scaled, filter by filter, to the norm of
the weights it moves: each row (output unit) of a matrix, each tensor of a vector (biases,
norms, the toy's y and z, the convex model's weights), so a layer with larger weights is
perturbed more and the picture does not depend on how the weights happen to be scaled.
Li et al. leave vectors (biases, normalisation) unperturbed; zoflat perturbs them, whole, so
that subspaces of vectors only (BitFit, the toy) have a landscape. A slice is the training loss
at x + Σ cᵢ dᵢ over a grid of coefficients:
    1d     f(x + α d),              α ∈ [−span, span]
    2d     f(x + α d₁ + β d₂),      (α, β) ∈ [−span, span]²
    plane  the plane through the run's start x₀, the point x and a filter-normalised direction d
           made orthogonal to x − x₀ and as long: f(x₀ + α (x − x₀) + β d), α ∈ [−½, 3/2],
           β ∈ [−1, 1]; the start is (0, 0), the point (1, 0).
"""

import numpy as np
import torch

from zoflat_cli.measures.subject import gaussian, norm, shifted
from zoflat_cli.optim.parameters import dot


def filter_normalised(params: list, generator: torch.Generator) -> list:
    out = []
    for p, d in zip(params, gaussian(params, generator)):
        w = p.detach()
        if d.dim() >= 2:
            rows = d.reshape(d.shape[0], -1)
            scale = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1) / torch.linalg.vector_norm(rows, dim=1)
            out.append((rows * scale[:, None]).view_as(d))
        else:
            out.append(d * (torch.linalg.vector_norm(w) / torch.linalg.vector_norm(d)))
    return out


def losses(subject, directions: list, coefficients: list) -> list:
    """f(x + Σᵢ cᵢ dᵢ) for each tuple c of `coefficients`."""
    values = []
    for c in coefficients:
        delta = [sum(ci * d[k] for ci, d in zip(c, directions)) for k in range(len(subject.params))]
        with shifted(subject.params, delta):
            values.append(subject.loss())
    return values


def grid(points: int, low: float, high: float) -> list:
    return [float(v) for v in np.linspace(low, high, points)]


def slice_1d(subject, points: int, span: float, generator) -> list:
    """[(α, f)]."""
    d = filter_normalised(subject.params, generator)
    alphas = grid(points, -span, span)
    return [(a, None, f) for a, f in zip(alphas, losses(subject, [d], [(a,) for a in alphas]))]


def slice_2d(subject, points: int, span: float, generator) -> list:
    """[(α, β, f)]."""
    d1 = filter_normalised(subject.params, generator)
    d2 = filter_normalised(subject.params, generator)
    pairs = [(a, b) for b in grid(points, -span, span) for a in grid(points, -span, span)]
    return [(a, b, f) for (a, b), f in zip(pairs, losses(subject, [d1, d2], pairs))]


def plane(subject, start: list, points: int, generator) -> list:
    """[(α, β, f)] on the plane through the start, the point and a random direction (see above),
    evaluated as shifts of the point: x₀ + α Δ + β d = x + (α − 1) Δ + β d, Δ = x − x₀."""
    delta = [p.detach() - s.to(p.device, p.dtype) for p, s in zip(subject.params, start)]
    length = norm(delta)
    if length == 0:
        raise ValueError("the point is the run's start: no plane through the two")
    d = filter_normalised(subject.params, generator)
    along = dot(d, delta) / length**2
    d = [x - along * y for x, y in zip(d, delta)]
    d = [x * (length / norm(d)) for x in d]
    pairs = [(a, b) for b in grid(points, -1.0, 1.0) for a in grid(points, -0.5, 1.5)]
    values = losses(subject, [delta, d], [(a - 1.0, b) for a, b in pairs])
    return [(a, b, f) for (a, b), f in zip(pairs, values)]
