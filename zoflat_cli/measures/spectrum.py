"""The Hessian's spectrum from Hessian-vector products: its top eigenvalues and its density.

top_eigenvalues:  the k largest by scipy's eigsh (ARPACK's implicitly restarted Lanczos) on a
                  LinearOperator whose product is the Hessian-vector product, from a seeded start.
lanczos:          m steps of the Lanczos recurrence with full reorthogonalisation (twice, against
                  every earlier vector), so the tridiagonal T stays faithful in floating point.
slq:              stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao
                  2019): for a Rademacher v, the eigenvalues θⱼ of T and the squared first components
                  τⱼ of its eigenvectors are a Gauss quadrature of the spectral measure seen from v:
                  vᵀg(H)v / ‖v‖² ≈ Σⱼ τⱼ g(θⱼ), exact for polynomials of degree < 2m. Averaged over
                  vectors, Σ τⱼ δ(t − θⱼ) estimates the density of H's eigenvalues (mass 1), and
                  n·Σ τⱼ θⱼᵖ the moments Tr Hᵖ.
"""

import numpy as np
import torch

from zoflat_cli.measures.subject import flatten, gaussian, rademacher, unflatten


def flat_dtype(params) -> torch.dtype:
    """Vectors of the parameter space: float64 for float64 problems, else float32 (a model's)."""
    return torch.float64 if params[0].dtype == torch.float64 else torch.float32


def flat_product(params, hessian_vector):
    """H·x for flat vectors x (torch), through hessian_vector on parameter-shaped lists."""
    dtype = flat_dtype(params)
    return lambda x: flatten(hessian_vector(unflatten(x, params)), dtype)


def top_eigenvalues(params, hessian_vector, k: int, generator: torch.Generator, tol: float = 1e-4) -> list:
    """The k largest eigenvalues, largest first."""
    from scipy.sparse.linalg import LinearOperator, eigsh  # here: scipy is not paid for at every start

    n = sum(p.numel() for p in params)
    if k >= n:
        raise ValueError(f"{k} eigenvalues of a {n}-parameter Hessian: ask for fewer than {n}")
    product = flat_product(params, hessian_vector)
    dtype = flat_dtype(params)
    device = params[0].device

    def matvec(x):
        return product(torch.as_tensor(np.asarray(x).reshape(-1), dtype=dtype, device=device)).cpu().numpy()

    operator = LinearOperator((n, n), matvec=matvec, dtype=np.float64 if dtype == torch.float64 else np.float32)
    start = flatten(gaussian(params, generator), dtype).cpu().numpy()
    values = eigsh(operator, k=k, which="LA", v0=start, tol=tol, ncv=min(n, max(2 * k + 1, 20)),
                   return_eigenvectors=False)
    return sorted((float(v) for v in values), reverse=True)


def lanczos(product, start: torch.Tensor, steps: int) -> tuple:
    """(α, β) of the tridiagonal T after `steps` Lanczos steps from `start` (fewer if the Krylov
    space closes: an invariant subspace has been found and T is exact on it)."""
    basis = torch.empty(steps, start.numel(), dtype=start.dtype, device=start.device)
    alpha, beta = [], []
    v = start / torch.linalg.vector_norm(start)
    for j in range(steps):
        basis[j] = v
        w = product(v)
        alpha.append(float(w.double() @ v.double()))
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        b = float(torch.linalg.vector_norm(w))
        if j == steps - 1 or b <= 1e-10 * max(1.0, abs(alpha[-1])):
            break
        beta.append(b)
        v = w / b
    return alpha, beta


def quadrature(alpha: list, beta: list) -> tuple:
    """Gauss quadrature nodes θ and weights τ (summing to 1) of a Lanczos tridiagonal."""
    t = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    nodes, vectors = np.linalg.eigh(t)
    return nodes, vectors[0] ** 2


def slq(params, hessian_vector, vectors: int, steps: int, generator: torch.Generator) -> list:
    """Per Rademacher start vector: (nodes, weights) of its Lanczos quadrature."""
    product = flat_product(params, hessian_vector)
    dtype = flat_dtype(params)
    result = []
    for _ in range(vectors):
        start = flatten(rademacher(params, generator), dtype)
        result.append(quadrature(*lanczos(product, start, steps)))
    return result


def moment(quadratures: list, n: int, power: int) -> list:
    """Per start vector, its estimate of Tr Hᵖ: n · Σ τⱼ θⱼᵖ."""
    return [n * float(np.sum(weights * nodes**power)) for nodes, weights in quadratures]


def density(quadratures: list, grid: np.ndarray, sigma: float) -> np.ndarray:
    """The Gaussian-broadened spectral density on `grid` (mass 1 up to the grid's edges)."""
    total = np.zeros_like(grid, dtype=float)
    for nodes, weights in quadratures:
        total += (weights[:, None] * np.exp(-((grid[None, :] - nodes[:, None]) ** 2) / (2 * sigma**2))).sum(0)
    return total / (len(quadratures) * sigma * np.sqrt(2 * np.pi))
