"""ZEST: the tilted estimator's identities, its t -> 0 limit, and its bias on a quadratic."""

import pytest
import torch

from zoflat_cli.engine.batched import estimate
from zoflat_cli.optim.estimators import ESTIMATORS, tilted_coefficients


def two_point(problem, x, u, hyper):
    return estimate(ESTIMATORS["two-point"], problem, x, u, hyper)


def zest(problem, x, u, hyper):
    return estimate(ESTIMATORS["tilted"], problem, x, u, hyper)
from zoflat_cli.problems.toy import ToyProblem


pytestmark = pytest.mark.usefixtures("float64")


class Quadratic:
    """f(x) = ½xᵀAx + bᵀx, batched over leading dims."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def loss(self, x):
        return 0.5 * torch.einsum("...i,ij,...j->...", x, self.a, x) + x @ self.b


def tilted_gradient(a, b, x, lam, t):
    """∇F_t for the quadratic: E exp(t f(x+λu)) is a Gaussian integral (valid while tλ²λ_max(A) < 1):
    F_t = f(x) - log det(I - tλ²A)/(2t) + (tλ²/2) gᵀ(I - tλ²A)⁻¹g with g = Ax + b, so
    ∇F_t = (I - tλ²A)⁻¹ (Ax + b)."""
    return torch.linalg.solve(torch.eye(len(b)) - t * lam**2 * a, a @ x + b)


def hyper(runs, lam, t):
    return {"lambda": torch.full((runs, 1), lam), "tilt": torch.full((runs, 1), float(t))}


def test_one_pair_is_the_tanh_identity():
    problem, gen = ToyProblem(3), torch.Generator().manual_seed(0)
    x, u = torch.randn(5, 6, generator=gen), torch.randn(1, 5, 6, generator=gen)
    lam, t = 0.3, 2.5
    f_plus, f_minus = problem.loss(x + lam * u[0]), problem.loss(x - lam * u[0])
    expected = (torch.tanh(t * (f_plus - f_minus) / 2) / (t * lam)).unsqueeze(-1) * u[0]
    torch.testing.assert_close(zest(problem, x, u, hyper(5, lam, t)), expected)


def test_zero_tilt_is_exactly_the_mean_of_two_point_estimates_and_small_tilt_is_continuous():
    problem, gen = ToyProblem(3), torch.Generator().manual_seed(1)
    x, u = torch.randn(4, 6, generator=gen), torch.randn(5, 4, 6, generator=gen)
    at_zero = zest(problem, x, u, hyper(4, 0.2, 0.0))
    plain = two_point(problem, x, u, {"lambda": torch.full((4, 1), 0.2)})
    torch.testing.assert_close(at_zero, plain, rtol=1e-13, atol=1e-15)  # equal up to summation order
    for t in (1e-12, 1e-8, 1e-5):
        torch.testing.assert_close(zest(problem, x, u, hyper(4, 0.2, t)), plain, rtol=10 * t + 1e-12, atol=0)
    # float32 too: no 0/0 and no cancellation near t = 0
    small = zest(problem, x.float(), u.float(), {k: v.float() for k, v in hyper(4, 0.2, 1e-7).items()})
    torch.testing.assert_close(small.double(), plain, rtol=1e-4, atol=1e-5)


def test_weights_are_a_stable_softmax():
    f_plus = torch.tensor([[1000.0], [999.0]])  # exp(t f) overflows without max-subtraction
    f_minus = torch.tensor([[998.0], [1001.0]])
    for t in (1.0, 10.0, 300.0):  # |tΔ/2| below and far above 1: sinh(tΔ/2) alone would overflow
        c = tilted_coefficients(torch.stack((f_plus, f_minus)), 0.1, torch.tensor(t))
        w = torch.softmax(t * torch.cat((f_plus, f_minus)).squeeze(-1), 0)
        assert torch.isfinite(c).all()
        torch.testing.assert_close(c.squeeze(-1), (w[:2] - w[2:]) / (t * 0.1))


def test_a_nan_loss_gives_nan_coefficients_not_the_zero_tilt_fallback():
    losses = torch.tensor([[[1.0], [float("nan")]], [[0.5], [2.0]]])  # (±, pairs, 1)
    for t in (0.0, 1.0):
        assert torch.isnan(tilted_coefficients(losses, 0.1, torch.tensor(t))).all()  # the run is marked diverged


def test_mean_converges_to_the_tilted_gradient_with_bias_shrinking_like_one_over_n():
    gen = torch.Generator().manual_seed(2)
    m = torch.randn(4, 4, generator=gen)
    a = m @ m.T / 4 + torch.eye(4)
    b = torch.randn(4, generator=gen)
    x = torch.linalg.solve(a, -b) + 0.5 * torch.randn(4, generator=gen)  # near the minimum: light-tailed weights
    lam, t = 0.3, 1.0
    assert t * lam**2 * torch.linalg.eigvalsh(a)[-1] < 0.4  # the closed form needs < 1; tails stay light
    problem, truth = Quadratic(a, b), tilted_gradient(a, b, x, lam, t)
    plain = a @ x + b
    assert (truth - plain).norm() > 0.2 * plain.norm()  # the tilt matters here
    bias = {}
    for n in (8, 128, 512):
        total, squares, runs = torch.zeros(4), torch.zeros(4), 0
        for _ in range(4):  # 16,000 estimates in chunks, to bound memory
            u = torch.randn(n, 4000, 4, generator=gen)
            g = zest(problem, x.expand(4000, -1), u, hyper(4000, lam, t))
            total, squares, runs = total + g.sum(0), squares + g.square().sum(0), runs + 4000
        mean = total / runs
        stderr = ((squares / runs - mean.square()) / runs).sqrt().norm()
        bias[n] = (mean - truth).norm()
        assert stderr < 0.25 * bias[n]  # the bias is measured, not noise
    # self-normalised weights: a plug-in bias that vanishes as n grows, ~1/n once n is large
    # (measured here: 8 -> 128 -> 512 pairs gives about 0.66 -> 0.11 -> 0.037 of |∇F_t| = 3.3)
    assert bias[512] < 0.02 * truth.norm()
    assert bias[8] > bias[128] > bias[512]
    assert 2.2 < bias[128] / bias[512] < 5.5  # 4x for exactly 1/n; 2x would be 1/sqrt(n)


def test_toy_lambda_max_and_grad_norm_are_exact():
    from torch.func import hessian

    problem = ToyProblem(5)
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(3))
    metrics = problem.metrics(x)
    for i in range(3):
        h = hessian(problem.loss)(x[i])
        assert metrics["lambda_max"][i].item() == pytest.approx(torch.linalg.eigvalsh(h)[-1].item(), rel=1e-10)
        assert metrics["grad_norm"][i].item() == pytest.approx(torch.func.grad(problem.loss)(x[i]).norm().item())
    flat = torch.zeros(10)
    flat[0] = flat[5] = 1.0  # y = z = e1: the flattest minimum
    assert problem.lambda_max(flat).item() == pytest.approx(2.0)


def test_zest_runs_from_the_cli(tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from zoflat_cli.cli import app

    result = CliRunner().invoke(app, ["toy", "--optimizer", "zest,zo", "--tilt", "0,1", "--pairs", "3",
                                      "--steps", "50", "--log-every", "25", "--dim", "5", "--out", str(tmp_path),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(next((tmp_path / "toy").iterdir()) / "metrics.csv")
    zest_runs = df[df.optimizer == "zest"]
    assert set(zest_runs.tilt) == {0.0, 1.0} and set(zest_runs.samples) == {3}
    assert zest_runs.n_evals.max() == 50 * 6 and df[df.optimizer == "zo"].samples.eq(1).all()
    # Proposition 2.2's balance prediction is for ZO, not ZEST: no theory value for zest rows
    assert zest_runs.balance_theory.isna().all() and df[df.optimizer == "zo"].balance_theory.notna().all()
