"""Estimators against analytic gradients, and the toy's derivatives against autograd."""

import pytest
import torch

from zoflat_cli.engine.batched import estimate
from zoflat_cli.optim.estimators import ESTIMATORS, n_evals
from zoflat_cli.problems.toy import ToyProblem



pytestmark = pytest.mark.usefixtures("float64")


def by_name(name):
    return lambda problem, x, u, hyper: estimate(ESTIMATORS[name], problem, x, u, hyper)


two_point, directional = by_name("two-point"), by_name("directional")
exact_gradient, sharpness_aware = by_name("gd"), by_name("sam")


def toy_point(dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ToyProblem(dim), torch.randn(1, 2 * dim, generator=gen) * 0.8


def smoothed_toy_grad(problem, x, lam):
    """Exact: f_λ(y, z) = f + λ²(‖y‖² + ‖z‖²)/2 + λ⁴d/2, so ∇f_λ = ∇f + λ²(y, z)."""
    return problem.grad(x) + lam**2 * x


def many_estimates(estimator, problem, x, lam, n, seed=1):
    """n independent single-direction estimates at x: the n directions go in as n runs."""
    u = torch.randn(1, n, x.shape[-1], generator=torch.Generator().manual_seed(seed))
    return estimator(problem, x.expand(n, -1), u, {"lambda": torch.full((n, 1), lam)})  # (n, dim)


@pytest.mark.parametrize("lam", [0.3, 0.7])
def test_two_point_is_unbiased_for_the_smoothed_gradient(lam):
    problem, x = toy_point()
    g = many_estimates(two_point, problem, x, lam, 400_000)
    mean, stderr = g.mean(0), g.std(0) / g.shape[0] ** 0.5
    truth = smoothed_toy_grad(problem, x, lam)[0]
    assert ((mean - truth).abs() / stderr).max() < 5.0
    # and it is detectably biased for the plain gradient: the λ² term is what ZO follows
    plain = problem.grad(x)[0]
    assert ((mean - plain).abs() / stderr).max() > 10.0


def test_directional_derivative_is_unbiased_for_the_gradient():
    problem, x = toy_point()
    g = many_estimates(directional, problem, x, 0.5, 400_000)
    mean, stderr = g.mean(0), g.std(0) / g.shape[0] ** 0.5
    assert ((mean - problem.grad(x)[0]).abs() / stderr).max() < 5.0


def test_two_point_tends_to_directional_as_lambda_shrinks():
    problem, x = toy_point()
    u = torch.randn(1, 1, x.shape[-1], generator=torch.Generator().manual_seed(3))
    dd = directional(problem, x, u, {})
    zo = two_point(problem, x, u, {"lambda": torch.full((1, 1), 1e-4)})
    torch.testing.assert_close(zo, dd, rtol=1e-6, atol=1e-8)


def test_samples_average_independent_estimates():
    problem, x = toy_point()
    u = torch.randn(5, 1, x.shape[-1], generator=torch.Generator().manual_seed(4))
    hyper = {"lambda": torch.full((1, 1), 0.1)}
    averaged = two_point(problem, x, u, hyper)
    one_by_one = torch.stack([two_point(problem, x, u[i : i + 1], hyper) for i in range(5)]).mean(0)
    torch.testing.assert_close(averaged, one_by_one)
    assert n_evals(ESTIMATORS["two-point"], 5) == 10 and n_evals(ESTIMATORS["gd"], 5) == 1
    assert n_evals(ESTIMATORS["sam"], 1) == 2


def test_toy_gradient_matches_autograd():
    problem, x = toy_point(dim=6, seed=5)
    auto = torch.func.grad(lambda v: problem.loss(v))(x[0])
    torch.testing.assert_close(exact_gradient(problem, x, None, {})[0], auto)


def test_sam_matches_a_hand_computation_on_the_toy():
    """d = 1: f(y, z) = (yz - 1)²/2 at (2, 1): ∇f = (1·1, 1·2) = (1, 2), ‖∇f‖ = √5; the ascent
    point is (2, 1) + ρ(1, 2)/√5, and SAM returns ∇f there: r' (z', y') with r' = y'z' - 1."""
    problem, rho = ToyProblem(1), 0.5
    x = torch.tensor([[2.0, 1.0]])
    y, z = 2 + rho / 5**0.5, 1 + 2 * rho / 5**0.5
    expected = torch.tensor([[(y * z - 1) * z, (y * z - 1) * y]])
    torch.testing.assert_close(sharpness_aware(problem, x, None, {"rho": torch.full((1, 1), rho)}), expected)
    # at a stationary point SAM does not move (no 0/0)
    at_min = torch.tensor([[1.0, 1.0]])
    assert torch.equal(sharpness_aware(problem, at_min, None, {"rho": torch.full((1, 1), rho)}), torch.zeros(1, 2))


def test_toy_hessian_trace_matches_torch_func_hessian():
    problem = ToyProblem(5)
    for seed in range(3):
        x = torch.randn(2 * 5, generator=torch.Generator().manual_seed(seed))
        hessian = torch.func.hessian(problem.loss)(x)
        torch.testing.assert_close(problem.metrics(x)["hessian_trace"], torch.trace(hessian))


def test_toy_loss_batches_over_leading_dims():
    problem = ToyProblem(3)
    x = torch.randn(2, 4, 5, 6)
    batched = problem.loss(x)
    assert batched.shape == (2, 4, 5)
    torch.testing.assert_close(batched[1, 2, 3], problem.loss(x[1, 2, 3]))
