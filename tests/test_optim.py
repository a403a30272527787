"""The optimizer algebra: update rules by hand, direction laws, estimators, and the proof that the
batched and the in-place paths share one core (the same trajectory for every preset)."""

import math

import pytest
import torch

from zoflat_cli.engine.batched import make_groups
from zoflat_cli.runs.spec import RunSpec
from zoflat_cli.engine.model import run_hyper
from zoflat_cli.optim import directions as laws
from zoflat_cli.optim.directions import DirectionStream
from zoflat_cli.optim.parameters import ParameterDirections
from zoflat_cli.optim.structured import Structure, matrix_view
from zoflat_cli.engine.batched import estimate
from zoflat_cli.optim.estimators import ESTIMATORS
from zoflat_cli.optim.inplace import InPlaceOptimizer
from zoflat_cli.optim.presets import PRESETS, STRUCTURED, UPDATE_DEFAULTS, estimator_of, hyper_names
from zoflat_cli.optim.updates import UPDATES, apply, get_update
from zoflat_cli.problems.toy import ToyProblem
from zoflat_cli.streams import direction_base
from helpers import BatchedAsModel

pytestmark = pytest.mark.usefixtures("float64")
CPU = torch.device("cpu")
HYPER = {"lr": 0.1, "momentum": 0.5, "beta1": 0.8, "beta2": 0.9, "weight_decay": 0.0}


def run_rule(name, grads, x0, **hyper):
    """Applies an update rule to a sequence of gradients; returns the points after each step, flat."""
    hyper = {**HYPER, **hyper}
    transform = get_update(name).build(weight_decay=bool(hyper["weight_decay"]))
    x, state, points = torch.tensor(x0), transform.init(torch.tensor(x0)), []
    for count, g in enumerate(grads, start=1):
        x, state = apply(transform, x, torch.tensor(g), state, hyper, count)
        points.extend(x.tolist())
    return points


# ---------------------------------------------------------------- update rules against hand computations

def test_sgd_and_sign_by_hand():
    assert run_rule("sgd", [[1.0, -2.0], [0.5, 0.0]], [0.0, 0.0]) == pytest.approx([-0.1, 0.2, -0.15, 0.2])
    assert run_rule("sign", [[3.0, -0.2], [0.0, 7.0]], [0.0, 0.0]) == pytest.approx([-0.1, 0.1, -0.1, 0.0])


def test_momentum_by_hand():
    # m1 = g1 = 1; m2 = 0.5·1 + 2 = 2.5; m3 = 0.5·2.5 + 0 = 1.25
    points = run_rule("momentum", [[1.0], [2.0], [0.0]], [1.0])
    assert points == pytest.approx([0.9, 0.65, 0.525])


def test_adam_by_hand_with_bias_correction():
    b1, b2, lr, eps = 0.8, 0.9, 0.1, 1e-8
    g = [2.0, -1.0, 0.5]
    m = v = 0.0
    x, expected = 1.0, []
    for t, gt in enumerate(g, start=1):
        m, v = b1 * m + (1 - b1) * gt, b2 * v + (1 - b2) * gt * gt
        x -= lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps)
        expected.append(x)
    assert run_rule("adam", [[v] for v in g], [1.0]) == pytest.approx(expected, rel=1e-12)
    # the first step moves by lr·sign(g) exactly: the bias correction undoes the zero initial state
    assert run_rule("adam", [[2.0]], [1.0])[0] == pytest.approx(1.0 - lr, rel=1e-9)


def test_weight_decay_is_decoupled_after_the_rule():
    # adam's first step is lr·sign(g); decoupled decay then adds lr·wd·x
    (point,) = run_rule("adam", [[2.0]], [1.0], weight_decay=0.5)
    assert point == pytest.approx(1.0 - 0.1 * (1.0 + 0.5 * 1.0), rel=1e-9)
    (point,) = run_rule("sgd", [[2.0]], [1.0], weight_decay=0.5)
    assert point == pytest.approx(1.0 - 0.1 * (2.0 + 0.5))


def test_conservative_never_raises_the_loss_and_moves_where_it_lowers_it():
    problem = ToyProblem(5)
    runs = [RunSpec("zo-cons", 0.05, s, 1, (("lambda", 0.1), ("weight_decay", 0.0))) for s in range(16)]
    (group,) = make_groups(problem, runs, torch.float64, CPU)
    with torch.inference_mode():
        before = problem.loss(group.x)
        moved = torch.zeros(16, dtype=torch.bool)
        for step in range(200):
            x = group.x.clone()
            group.step(step)
            now = problem.loss(group.x)
            assert (now <= before).all()
            moved |= ~torch.all(group.x == x, dim=-1)
            assert torch.equal(group.x[now == before], x[now == before])  # a rejected step stays put
            before = now
    assert moved.all()


# ---------------------------------------------------------------- direction laws

@pytest.mark.parametrize("law", laws.LAWS)
def test_direction_laws_have_zero_mean_and_identity_covariance(law):
    dim, n = 6, 40_000
    stream = DirectionStream(list(range(n)), 1, dim, law, torch.float64, CPU, end_step=1)
    u = stream.next()[0]  # n independent directions (one per seed)
    assert (u.mean(0).abs() < 5 / math.sqrt(n)).all()
    cov = u.T @ u / n
    assert (cov - torch.eye(dim)).abs().max() < 6 * math.sqrt(2 / n)
    if law == "sphere":
        torch.testing.assert_close(u.norm(dim=-1), torch.full((n,), math.sqrt(dim)), rtol=1e-12, atol=0)
    if law == "rademacher":
        assert set(u.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("unit", [4, 64])
@pytest.mark.parametrize("law", laws.LAWS)
def test_in_place_chunked_draws_equal_the_batched_draws(law, unit, monkeypatch):
    """One seed convention: the in-place path, cutting several parameter tensors into chunks,
    regenerates exactly the batched path's directions for the same run, step and sample: for
    vectors longer than a unit (chunks of 7 cutting across tensors) and shorter (several steps'
    directions in one unit)."""
    monkeypatch.setattr(laws, "UNIT", unit)
    monkeypatch.setattr(laws, "CHUNK", 7)
    shapes = [(3, 4), (5,), (2, 3, 2)]
    params = [torch.zeros(s) for s in shapes]
    dim = sum(p.numel() for p in params)
    structure = Structure(law, tuple(matrix_view(s) for s in shapes), 2, 4) if law in STRUCTURED else None
    stream = DirectionStream([11, 12], 2, dim, law, torch.float64, CPU, start_step=3, structure=structure)
    for _ in range(3):
        stream.next()
    u = stream.next()  # step 6, its lowrank V or subspace drawn for steps 4..7 (period 4)
    d = ParameterDirections(params, law, rank=2, period=4)
    for sample in range(2):
        z = torch.cat([t.reshape(-1) for t in d.draw((direction_base(12, sample), 6), torch.float64)])
        if structure is None:
            torch.testing.assert_close(z, u[sample, 1], rtol=1e-6, atol=1e-6)  # float32 draws, scaled in float64
        else:  # a matrix's rows cut by chunks of 7 are made alone: still bit for bit the whole's
            assert torch.equal(z, u[sample, 1])
    again = ParameterDirections(params, law, rank=2, period=4)
    assert torch.equal(torch.cat([t.reshape(-1) for t in again.draw((123, 0))]),
                       torch.cat([t.reshape(-1) for t in d.draw((123, 0))]))


def test_sphere_in_place_has_norm_sqrt_d_and_adds_along_it():
    params = [torch.zeros(1000), torch.zeros(24)]
    d = ParameterDirections(params, "sphere")
    z = torch.cat([t.reshape(-1) for t in d.draw((9, 0), torch.float64)])
    assert z.norm().item() == pytest.approx(math.sqrt(1024), rel=1e-6)
    d.add([((9, 0), 0.5)])
    torch.testing.assert_close(torch.cat(params).double(), 0.5 * z, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- estimators

def toy_point(dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ToyProblem(dim), torch.randn(1, 2 * dim, generator=gen) * 0.8


def test_fwd_grad_equals_the_directional_derivative_from_autograd():
    problem, x = toy_point()
    u = torch.randn(3, 1, x.shape[-1], generator=torch.Generator().manual_seed(2))
    grad = torch.func.grad(lambda v: problem.loss(v))(x[0])
    expected = sum((u[i, 0] @ grad) * u[i, 0] for i in range(3)) / 3
    fwd = estimate(ESTIMATORS["jvp"], problem, x, u, {})
    torch.testing.assert_close(fwd[0], expected)
    # in place, on a model: the JVP of the model's loss
    model = BatchedAsModel(problem, x[0])
    d = ParameterDirections(model.params, module=model)
    z = d.draw((5, 0))
    assert model.jvp(z) == pytest.approx(float(torch.cat([t.reshape(-1) for t in z]) @ grad), rel=1e-12)


def test_one_sided_error_is_first_order_and_two_point_second_order():
    """For a fixed u: (f(x+λu) - f(x))/λ - uᵀ∇f → λ·uᵀHu/2, while the two-point error is O(λ²)."""
    problem, x = toy_point(seed=3)
    u = torch.randn(1, 1, x.shape[-1], generator=torch.Generator().manual_seed(4))
    dd = float(u[0, 0] @ problem.grad(x)[0])
    curvature = float(u[0, 0] @ problem.hvp(x[0], u[0, 0, :, None])[:, 0]) / 2
    for lam in (1e-2, 1e-3, 1e-4):
        hyper = {"lambda": torch.full((1, 1), lam)}
        one = estimate(ESTIMATORS["one-sided"], problem, x, u, hyper)[0] @ u[0, 0] / u[0, 0].square().sum()
        two = estimate(ESTIMATORS["two-point"], problem, x, u, hyper)[0] @ u[0, 0] / u[0, 0].square().sum()
        assert float(one - dd) / lam == pytest.approx(curvature, rel=10 * lam)
        assert abs(float(two - dd)) < 50 * lam**2 * (1 + abs(dd))


# ---------------------------------------------------------------- one core, two paths

def run_spec(preset: str, law=None, samples=1) -> RunSpec:
    law = law or PRESETS[preset].law
    values = {"lambda": 0.05, "rho": 0.05, "tilt": 1.0, **UPDATE_DEFAULTS, "rank": 2, "period": 7, "sparsity": 0.5,
              "hessian_smooth": 0.01}
    lr = {"zo-sign": 1e-3, "zo-adam": 1e-3, "zo-momentum": 1e-3, "fzoo": 1e-3}.get(preset, 0.01)
    hyper = tuple((h, values[h]) for h in hyper_names(preset, PRESETS[preset].update, law))
    return RunSpec(preset, lr, 7, samples, hyper, law)


@pytest.mark.parametrize("law", ["own", "sphere"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_follows_the_same_trajectory_batched_and_in_place(preset, law):
    """60 steps of the toy (blocks y, z seen as 2×3 matrices) batched and in place agree to 1e-9."""
    if law != "own" and (not PRESETS[preset].uses_directions or PRESETS[preset].law != "gaussian"):
        pytest.skip("no directions, or a law of its own")
    problem, steps = ToyProblem(6), 60
    run = run_spec(preset, None if law == "own" else law, samples=PRESETS[preset].samples if preset in ("zest", "fzoo") else 2)
    (group,) = make_groups(problem, [run], torch.float64, CPU)
    model = BatchedAsModel(problem, group.x[0])
    start = model.loss()
    optimizer = InPlaceOptimizer(ParameterDirections(model.params, run.directions, model, run.value("rank") or 1,
                                                     run.value("period") or 1),
                                 estimator_of(preset), get_update(run.rule), run_hyper(run))
    with torch.inference_mode():
        for step in range(steps):
            group.step(step)
    for step in range(steps):
        keys = [(direction_base(run.seed, i), step) for i in range(run.samples)]
        optimizer.step(model, keys, step + 1)
    assert torch.isfinite(group.x).all() and float(problem.loss(group.x)[0]) < start  # it trained
    torch.testing.assert_close(model.x.detach(), group.x[0], rtol=1e-9, atol=1e-10)
    if group.memory:  # and what the stateful estimators keep
        if optimizer.curvature is not None:
            torch.testing.assert_close(torch.cat(optimizer.curvature), group.memory[0][0], rtol=1e-9, atol=1e-12)
        if optimizer.anchor is not None:
            torch.testing.assert_close(torch.cat([a.reshape(-1) for a in optimizer.anchor]), group.memory[0][0])


def test_every_update_rule_and_estimator_has_a_preset_or_a_flag():
    assert {p.estimator for p in PRESETS.values()} == set(ESTIMATORS)
    assert {p.update for p in PRESETS.values()} == set(UPDATES)
