"""Gradient estimators as coefficient rules, shared by the batched and the in-place paths.

An estimator says which oracle it queries and how the answers become the estimate
ĝ = Σ_i c_i u_i over n directions u_i (or, for gd/sam, the gradient itself):
  query "loss"         f at x + o·λ·u_i for each offset o in `offsets` (and f(x) if `center`);
                       `coefficients(values (len(offsets), n, ...), center, hyper) -> c (n, ...)`
  query "directional"  d_i = u_iᵀ∇f (dd: from the gradient; fwd-grad: a JVP); c_i = d_i / n
  query "gradient"     ∇f (gd), or ∇f at the ascent point x + ρ∇f/‖∇f‖ (sam)
Some estimators perturb along u = d ⊙ z rather than the drawn z (`scaling`): "mask" d = 1{|x| ≤ h},
h per tensor from the starting weights (Sparse MeZO); "curvature" d = 1/√D with D a running diagonal
curvature estimate (HiZOO, `hessian_informed`). An `anchored` one (MeZO-SVRG) also evaluates at an
anchor point x̄ that it refreshes every --period steps (`svrg_terms`). Both keep one more number per
direction (`extra`): HiZOO the weight of its curvature sample, SVRG the anchor's coefficient.
How a path queries (a batched tensor call over (samples, runs, dim), or passes over one model's
parameters in place) is the path's business; what the answers mean is decided here, once.
The batched path's `estimate` is engine/batched.py's. The rules use tensor methods only, so the
tables import without torch (the command line's start-up).
"""

from typing import Callable, NamedTuple, Optional


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
    scaling: str = None  # None | mask | curvature: the probes move along d ⊙ z
    anchored: bool = False  # MeZO-SVRG's control variate at an anchor point
    numpy: bool = False  # its rule (and the batched estimate's query) also runs on numpy arrays: the fast path

    @property
    def uses_directions(self) -> bool:
        return self.query != "gradient"

    @property
    def extra(self) -> int:
        """Numbers per direction an update log keeps besides its coefficient."""
        return int(self.scaling == "curvature" or self.anchored)


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


def tilted_coefficients(losses, lam, tilt):
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
    tanhc = (h.tanh() / h).nan_to_num(nan=1.0)  # 0/0 only at h = 0; a NaN loss stays NaN in Δ
    return half_delta * tanhc * (w[0] + w[1]) / lam


def tilted(values, center, hyper):
    """ZEST (arXiv 2510.16157): gradient of the tilted smoothed loss (1/t) log E exp(t f(x+λu))."""
    return tilted_coefficients(values, hyper["lambda"], hyper["tilt"])


def normalised_one_sided(values, center, hyper):
    """FZOO (arXiv 2506.09034): c_i = (f(x+λu_i) - f(x)) / (n·σ), σ the population standard deviation
    of the n probe losses: the step's length is set by how much the losses spread, not by 1/λ
    (0 where they do not spread)."""
    spread = values[0].std(0, correction=0, keepdim=True)
    return ((values[0] - center) / (len(values[0]) * spread)).where(spread > 0, 0.0)


def curvature_weights(values, center, hyper):
    """HiZOO's (Zhao et al., ICLR 2025) weight of each direction's curvature sample:
    a_i = α·|f(x+λu_i) + f(x-λu_i) - 2f(x)| / (2λ²n), α = --hessian-smooth."""
    second = (values[0] + values[1] - 2 * center).abs()
    return hyper["hessian_smooth"] * second / (2 * len(values[0]) * hyper["lambda"] ** 2)


def hessian_informed(curvature, directions, coefs, weights, smooth):
    """HiZOO's step direction and new curvature from the drawn z_i (its probes were x ± λz_i/√D):
    D ← (1-α)D + Σ a_i·D⊙z_i², then d = Σ c_i z_i / √D_new (the new D, as HiZOO's code does)."""
    new = curvature * (1 - smooth)
    g = None
    for z, c, a in zip(directions, coefs, weights):
        new += curvature * z * z * a
        g = z * c if g is None else g + z * c
    return g * new.rsqrt(), new


def sparse_mask(x, thresholds):
    """Sparse MeZO (arXiv 2402.15751): perturb and move only the weights with |x| ≤ h."""
    return (x.abs() <= thresholds).to(x.dtype)


def mask_thresholds(x, sparsity: float):
    """h of a tensor: the (1 - sparsity)-quantile of its starting |x| (so `sparsity` of it, the largest
    weights, stays fixed)."""
    flat = x.detach().abs().reshape(-1).double()
    k = max(1, round((1 - sparsity) * flat.numel()))
    return float(flat.kthvalue(k).values)


def anchor_step(step: int, period: int) -> int:
    """MeZO-SVRG's anchor of a step: the last step (from 0) that is a multiple of --period."""
    return step - step % period


def ascent_scale(grad_norm, rho):
    """SAM's step to the ascent point, x + s·∇f with s = ρ/‖∇f‖ (0 at ∇f = 0: plain GD)."""
    if isinstance(grad_norm, (int, float)):
        return rho / grad_norm if grad_norm > 0 else 0.0
    return (rho / grad_norm).where(grad_norm > 0, 0.0)


ESTIMATORS = {
    e.name: e
    for e in (
        Estimator("gd", "exact gradient", "gradient", (), 0, 1, numpy=True),
        Estimator("sam", "gradient at the ascent point x + ρ∇f/‖∇f‖ (Foret et al.)", "gradient", ("rho",), 0, 2),
        Estimator("two-point", "two-point ZO, (f(x+λu) - f(x-λu))/(2λ) · u", "loss", ("lambda",), 2,
                  offsets=(1, -1), coefficients=two_point, numpy=True),
        Estimator("one-sided", "forward difference, (f(x+λu) - f(x))/λ · u", "loss", ("lambda",), 1, 1,
                  offsets=(1,), center=True, coefficients=one_sided, numpy=True),
        Estimator("tilted", "ZEST: tilted two-point over n antithetic pairs (--pairs, --tilt)", "loss",
                  ("lambda", "tilt"), 2, offsets=(1, -1), coefficients=tilted),
        Estimator("directional", "(uᵀ∇f) u from the gradient", "directional", (), 1, coefficients=directional,
                  numpy=True),
        Estimator("jvp", "(uᵀ∇f) u by forward-mode AD (a JVP, no backward pass)", "directional", (), 1,
                  coefficients=directional, jvp=True),
        Estimator("normalised", "FZOO: n one-sided probes, step normalised by the spread of their losses", "loss",
                  ("lambda",), 1, 1, offsets=(1,), center=True, coefficients=normalised_one_sided),
        Estimator("masked", "Sparse MeZO: two-point along the small weights only, |x| ≤ h (--sparsity)", "loss",
                  ("lambda", "sparsity"), 2, offsets=(1, -1), coefficients=two_point, scaling="mask"),
        Estimator("hessian", "HiZOO: two-point along z/√D, D a diagonal curvature estimate (--hessian-smooth)",
                  "loss", ("lambda", "hessian_smooth"), 2, 1, offsets=(1, -1), center=True, coefficients=two_point,
                  scaling="curvature"),
        Estimator("svrg", "MeZO-SVRG: ĝ(x) - ĝ(x̄) + g̃(x̄), anchor x̄ and full-batch g̃ every --period steps",
                  "loss", ("lambda", "period"), 4, offsets=(1, -1), coefficients=two_point, anchored=True),
    )
}


def n_evals(estimator: Estimator, samples: int) -> int:
    """Oracle calls per step (loss values, gradients or JVPs); an anchored estimator's steps between
    anchors (at an anchor: half as many, on the full batch)."""
    return estimator.evals_fixed + estimator.evals_per_sample * (samples if estimator.uses_directions else 0)
