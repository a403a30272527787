"""The 2024–26 ZO methods (HiZOO, LOZO, SubZero, Sparse MeZO, MeZO-SVRG, FZOO): each step against
its definition by hand, batched and in place; their directions against their factors; the smoothing
each law induces (E ĝ = Σ∇(f + λ²/2·Tr ΣH)) and the toy's balance drift it predicts, over many
seeds; and every command through the real CLI, resumed bit for bit."""

import json
import math

import pytest
import torch

from helpers import BatchedAsModel
from test_resume import straight_and_resumed, table, zoflat
from zoflat_cli.engine.batched import estimate, make_groups, stateful_estimate
from zoflat_cli.engine.model import run_hyper
from zoflat_cli.optim.directions import DirectionStream
from zoflat_cli.optim.estimators import ESTIMATORS, mask_thresholds
from zoflat_cli.optim.inplace import InPlaceOptimizer
from zoflat_cli.optim.parameters import ParameterDirections
from zoflat_cli.optim.presets import PRESETS, estimator_of, hyper_names
from zoflat_cli.optim.structured import Structure, balanced, draw_flat, flat_buffer, matrix_view, slow_base
from zoflat_cli.optim.updates import get_update
from zoflat_cli.problems.toy import ToyProblem
from zoflat_cli.runs.spec import RunSpec
from zoflat_cli.streams import direction_base
from test_trainer import balance_slope, train

pytestmark = pytest.mark.usefixtures("float64")
CPU = torch.device("cpu")
NEW = ("hizoo", "lozo", "subzero", "sparse-mezo", "mezo-svrg", "fzoo")
VALUES = {"lambda": 0.1, "rank": 2, "period": 2, "sparsity": 0.5, "hessian_smooth": 0.3, "weight_decay": 0.0}


def spec(preset: str, lr=0.05, seed=3, samples=None, **values) -> RunSpec:
    values = {**VALUES, **values}
    law = PRESETS[preset].law
    hyper = tuple((h, values[h]) for h in hyper_names(preset, PRESETS[preset].update, law))
    return RunSpec(preset, lr, seed, samples or PRESETS[preset].samples, hyper)


def both_paths(run: RunSpec, problem, steps: int):
    """x after `steps` steps batched and in place, the start x0, and z(sample, step) drawn in place."""
    (group,) = make_groups(problem, [run], torch.float64, CPU)
    x0 = group.x[0].clone()
    model = BatchedAsModel(problem, x0)
    directions = ParameterDirections(model.params, run.directions, model, run.value("rank") or 1, run.value("period") or 1)
    optimizer = InPlaceOptimizer(directions, estimator_of(run.optimizer), get_update(run.rule), run_hyper(run))
    with torch.inference_mode():
        for step in range(steps):
            group.step(step)
    for step in range(steps):
        optimizer.step(model, [(direction_base(run.seed, i), step) for i in range(run.samples)], step + 1)

    def z(sample, step):
        return torch.cat([t.reshape(-1) for t in directions.draw((direction_base(run.seed, sample), step), torch.float64)])

    return group.x[0], model.x.detach(), x0, z


def check(expected, batched, in_place):
    torch.testing.assert_close(batched, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(in_place, expected, rtol=1e-10, atol=1e-12)


def f(problem, x):
    return float(problem.loss(x[None])[0])


# ---------------------------------------------------------------- directions against their factors

@pytest.mark.parametrize("law", ["lowrank", "subspace"])
def test_structured_directions_are_their_factors_multiplied_out(law):
    """A (4, 6) matrix and a (5,) vector: the matrix is U Vᵀ/√r (lowrank) or √24/r·Q_U S Q_Vᵀ
    (subspace) of the drawn factors, by matmul in float64; the vector is plain Gaussian; the
    slow factor is shared inside a period and not across periods; rank ≤ r."""
    params, rank, period, base = [torch.zeros(4, 6), torch.zeros(5)], 2, 3, 987
    d = ParameterDirections(params, law, rank=rank, period=period)
    structure = Structure(law, (matrix_view((4, 6)), (5,)), rank, period)
    fast_m, slow_m = sum(structure.fast_sizes()), sum(structure.slow_sizes())
    gen = torch.Generator()
    spans = []
    for step in (3, 4, 6):
        fast = draw_flat(base, step, fast_m, gen, flat_buffer(fast_m, CPU)).double()
        slow = draw_flat(slow_base(base), step // period, slow_m, gen, flat_buffer(slow_m, CPU)).double()
        matrix, vector = d.draw((base, step), torch.float64)
        if law == "lowrank":
            u, v = fast[:8].view(4, 2), slow.view(6, 2)
            expected = u @ v.T / math.sqrt(2)
            assert fast.numel() == 8 + 5
        else:
            s = fast[:4].view(2, 2)
            qu, qv = torch.linalg.qr(slow[:8].view(4, 2))[0], torch.linalg.qr(slow[8:].view(6, 2))[0]
            expected = math.sqrt(24) / 2 * qu @ s @ qv.T
        torch.testing.assert_close(matrix, expected, rtol=1e-5, atol=1e-6)  # float32 factors
        torch.testing.assert_close(vector, fast[-5:])
        assert torch.linalg.matrix_rank(matrix, atol=1e-5) <= rank
        spans.append(torch.linalg.svd(matrix)[2][:rank])  # its row space
    same = torch.linalg.matrix_rank(torch.cat(spans[:2]), atol=1e-5)  # steps 3, 4: one period
    assert same == rank and torch.linalg.matrix_rank(torch.cat(spans[1:]), atol=1e-5) > rank


def test_a_vector_block_is_seen_as_its_most_nearly_square_matrix():
    assert balanced(12) == (3, 4) and balanced(7) == (1, 7) and balanced(16) == (4, 4)
    assert matrix_view((3, 4, 5)) == (3, 20) and matrix_view((9,)) == (9,)


# ---------------------------------------------------------------- one step (or three) by hand

def test_hizoo_two_steps_by_hand():
    """D₀ = 1; probes x ± λz/√D, f(x); D ← (1-α)D + α|f₊+f₋-2f₀|/(2λ²)·D z²; x ← x - lr·(f₊-f₋)/(2λ)·z/√D_new."""
    problem, run = ToyProblem(3), spec("hizoo")
    lam, alpha, lr = 0.1, 0.3, 0.05
    batched, in_place, x, z = both_paths(run, problem, 2)
    d = torch.ones_like(x)
    for step in range(2):
        u = z(0, step)
        plus, minus, center = (f(problem, x + lam * u / d.sqrt()), f(problem, x - lam * u / d.sqrt()), f(problem, x))
        d = (1 - alpha) * d + alpha * abs(plus + minus - 2 * center) / (2 * lam**2) * d * u * u
        x = x - lr * (plus - minus) / (2 * lam) * u / d.sqrt()
    check(x, batched, in_place)


def test_sparse_mezo_moves_only_the_small_weights_by_hand():
    """h per block = the median |x₀| (sparsity 0.5); u = 1{|x| ≤ h} ⊙ z; x ← x - lr·(f₊-f₋)/(2λ)·u."""
    problem, run = ToyProblem(4), spec("sparse-mezo")
    lam, lr = 0.1, 0.05
    batched, in_place, x, z = both_paths(run, problem, 3)
    start = x.clone()
    h = torch.cat([torch.full((4,), mask_thresholds(x[:4], 0.5)), torch.full((4,), mask_thresholds(x[4:], 0.5))])
    for step in range(3):
        u = (x.abs() <= h).double() * z(0, step)
        x = x - lr * (f(problem, x + lam * u) - f(problem, x - lam * u)) / (2 * lam) * u
    check(x, batched, in_place)
    large = start.abs() > h
    assert large.sum() == 4 and torch.equal(batched[large], start[large])  # the largest half never moved


def test_mezo_svrg_by_hand_across_two_anchors():
    """period 2: step 0 sets x̄ = x₀, g̃ = ĝ(x₀; z₀) and steps by g̃; step 1 steps by ĝ(x; z₁) - ĝ(x̄; z₁) + g̃;
    step 2 is a new anchor."""
    problem, run = ToyProblem(3), spec("mezo-svrg")
    lam, lr = 0.1, 0.05

    def g(point, u):
        return (f(problem, point + lam * u) - f(problem, point - lam * u)) / (2 * lam) * u

    batched, in_place, x, z = both_paths(run, problem, 4)
    for step in range(4):
        if step % 2 == 0:
            anchor, g_anchor = x.clone(), g(x, z(0, step))
            x = x - lr * g_anchor
        else:
            x = x - lr * (g(x, z(0, step)) - g(anchor, z(0, step)) + g_anchor)
    check(x, batched, in_place)


def test_fzoo_step_by_hand():
    """n Rademacher probes; c_i = (f(x+λu_i) - f(x)) / (n·σ), σ the population std of the n losses."""
    problem, run = ToyProblem(3), spec("fzoo", lr=0.01, samples=4)
    lam, lr = 0.1, 0.01
    batched, in_place, x, z = both_paths(run, problem, 2)
    for step in range(2):
        us = [z(i, step) for i in range(4)]
        assert all(set(u.abs().tolist()) == {1.0} for u in us)
        losses = torch.tensor([f(problem, x + lam * u) for u in us])
        sigma = losses.std(correction=0)
        x = x - lr * sum((loss - f(problem, x)) / (4 * sigma) * u for loss, u in zip(losses, us))
    check(x, batched, in_place)


@pytest.mark.parametrize("preset", ["lozo", "subzero"])
def test_lozo_and_subzero_steps_are_plain_two_point_along_their_directions(preset):
    problem, run = ToyProblem(6), spec(preset, period=3)
    lam, lr = 0.1, 0.05
    batched, in_place, x, z = both_paths(run, problem, 5)
    for step in range(5):
        u = z(0, step)
        x = x - lr * (f(problem, x + lam * u) - f(problem, x - lam * u)) / (2 * lam) * u
    check(x, batched, in_place)


# ---------------------------------------------------------------- theory: the smoothing each law induces

def law_covariance(law, stream, structure, diagonal):
    """Σ of u given what it is conditioned on: the period's factors (as kron products), or a diagonal."""
    if law not in ("lowrank", "subspace"):
        return torch.diag(diagonal)
    from zoflat_cli.optim.structured import period_factors
    blocks = []
    for view, factors in zip(structure.views, period_factors(structure, [stream.bases[0][0]], 0, CPU)):
        a, b = view
        if law == "lowrank":
            v = factors[0][0].double()
            blocks.append(torch.kron(torch.eye(a), v @ v.T) / structure.rank)
        else:
            u, v = (t[0].double() for t in factors)
            blocks.append(structure.scale(view) ** 2 * torch.kron(u @ u.T, v @ v.T))
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("method", ["lozo", "subzero", "sparse-mezo", "hizoo"])
def test_each_law_s_mean_estimate_is_the_gradient_of_its_smoothed_loss(method):
    """At a fixed x of the toy (d = 6: blocks of 2×3), over 40,000 directions that share what the law
    conditions on (one period's factors, the mask, D), the mean two-point estimate is
    Σ∇(f + λ²/2·Tr ΣH), exactly (the toy is quartic and u Gaussian given those): Σ and H computed
    independently (kron of the factors, torch.func.hessian), the mean within 4.5 standard errors in
    every coordinate."""
    problem, lam, n = ToyProblem(6), 0.3, 40_000
    law = PRESETS[method].law
    structure = Structure(law, (balanced(6), balanced(6)), 2, n) if law != "gaussian" else None
    x = torch.tensor([[0.9, -0.4, 0.3, 0.5, 0.8, -0.6, 0.2, 0.7, -0.5, 0.4, -0.3, 0.6]])
    hyper = {"lambda": torch.full((1, 1), lam), "hessian_smooth": torch.zeros(1, 1)}
    estimator = ESTIMATORS[PRESETS[method].estimator]
    stream = DirectionStream([5], 1, 12, law, torch.float64, CPU, end_step=n, structure=structure)
    u = torch.cat([stream.next() for _ in range(n)], dim=1)  # (1, n, 12): n draws as n "runs" at the same x
    xs = x.expand(n, 12)
    diagonal = None
    with torch.inference_mode():
        if method == "sparse-mezo":
            h = torch.tensor([[0.5] * 6 + [0.45] * 6])
            g, _ = stateful_estimate(estimator, problem, xs, u, hyper, (h.expand(n, 12),), 1, 1)
            diagonal = (x.abs() <= h).double()[0]
        elif method == "hizoo":  # with α = 0, D stays: probes and step along z/√D
            d = torch.tensor([[1.0, 4.0, 0.25, 2.0, 1.0, 9.0, 0.5, 1.5, 3.0, 1.0, 0.8, 2.5]])
            g, _ = stateful_estimate(estimator, problem, xs, u, hyper, (d.expand(n, 12),), 1, 1)
            diagonal = 1 / d[0]
        else:
            g = estimate(estimator, problem, xs, u, hyper)
    sigma = law_covariance(law, stream, structure, diagonal)

    def smoothed(point):
        return problem.loss(point[None])[0] + lam**2 / 2 * torch.trace(sigma @ torch.func.hessian(
            lambda q: problem.loss(q[None])[0])(point))

    predicted = sigma @ torch.func.grad(smoothed)(x[0])
    error, standard = (g.mean(0) - predicted).abs(), g.std(0) / math.sqrt(n)  # a masked coordinate: 0 and 0
    assert torch.all(error <= 4.5 * standard + 1e-12), (g.mean(0), predicted)
    assert (sigma - torch.eye(12)).abs().max() > 0.3  # far from I: the test sees the conditioning


@pytest.mark.parametrize("method", ["lozo", "subzero", "mezo-svrg"])
def test_balance_drifts_at_proposition_2_2_s_rate(method):
    """Laws with E[uuᵀ] = I over their refreshes and independent blocks (lowrank, subspace: κ = 1), and
    SVRG's control variate (mean ∇f_λ(x) - ∇f_λ(x̄) + ∇f_λ(x̄)) drift the toy's balance as ZO does,
    E[B_t] = B₀(1 - 2ηλ²)^t, to first order in η (the theory column says the same). SVRG reuses its
    anchor's estimate for a whole period, an O(η·period) effect: at period 20 it drifts 14% faster
    (0.86 of the predicted B_t), at η/4 over 4× the steps 1.5% (0.985); here period 5."""
    problem, steps, lr, lam = ToyProblem(6), 2000, 0.001, 0.5
    period = 5 if method == "mezo-svrg" else 20
    runs = [spec(method, lr, s, **{"lambda": lam, "period": period}) for s in range(500)]
    rows, _ = train(problem, runs, steps, steps)
    predicted = (1 - 2 * lr * lam**2) ** steps
    assert abs(balance_slope(rows, steps, method) / predicted - 1) < 0.06
    some = next(iter(rows[steps].values()))
    assert abs(some["balance_theory"] - rows[0][some["run_id"]]["balance"] * predicted) < 1e-9


# ---------------------------------------------------------------- every command, through the CLI

@pytest.mark.parametrize("command", ["toy", "convex"])
def test_batched_commands_run_resume_bit_exactly_and_plot(command, tmp_path, monkeypatch):
    args = [command, "--log-every", 5, "--seeds", 2, "-o", ",".join(NEW), "--period", 3, "--steps", 24, "--quiet"]
    args += ["--dim", 6] if command == "toy" else ["--features", 60, "--eig-every", 10]
    straight, stopped = straight_and_resumed(args, tmp_path, monkeypatch, 10)
    rows = table(straight)
    assert {r["optimizer"] for r in rows.values()} == set(NEW)
    assert all(math.isfinite(float(r["loss"])) for r in rows.values())
    zoflat("plot", stopped)
    assert (stopped / "figure.png").stat().st_size > 10_000


def test_finetune_runs_every_new_method_and_resumes_bit_exactly(tiny_mlm, tmp_path, monkeypatch):
    """In place on a model: stopped at step 4 of 10 with a checkpoint at step 3 (HiZOO's D, SVRG's
    anchor, Sparse MeZO's thresholds from the base weights), then resumed from checkpoint + update log."""
    args = ["finetune", "--model", tiny_mlm, "--task", "sst2", "--k", 8, "--log-every", 2, "--eval-every", 4,
            "--trace", "none", "-o", ",".join(NEW), "--period", 3, "--lr", "1e-3", "--checkpoint-every", 3,
            "--batch-size", 8, "--steps", 10, "--quiet"]
    straight, _ = straight_and_resumed(args, tmp_path, monkeypatch, 4)
    rows = table(straight)
    moved = {r["optimizer"] for r in rows.values() if r["step"] == "10" and r["loss"] != rows[(r["run_id"], "0")]["loss"]}
    assert moved == set(NEW)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["status"] == "completed"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lr_zero_leaves_half_precision_weights_bit_identical_for_every_new_method(tiny_mlm, dtype):
    """Probes formed on the fly, the masks, D and the anchor never write the weights: at lr = 0 a
    half-precision model is bit-identical after 12 steps of each method (anchors at 0, 3, 6, 9)."""
    from test_finetune import flat, make_problem
    problem = make_problem(tiny_mlm, dtype=dtype)
    before = flat(problem.params).clone()
    for preset in NEW:
        run = spec(preset, lr=0.0, period=3)
        directions = ParameterDirections(problem.params, run.directions, problem.model, run.value("rank") or 1,
                                         run.value("period") or 1)
        optimizer = InPlaceOptimizer(directions, estimator_of(preset), get_update(run.rule), run_hyper(run))
        for step in range(12):
            optimizer.step(problem, [(direction_base(run.seed, i), step) for i in range(run.samples)], step + 1)
        assert torch.equal(flat(problem.params), before), preset


def test_a_decoder_lm_with_tied_embeddings_trains_under_every_new_method_in_bfloat16(tiny_causal, tmp_path):
    """GPT-2's tied embedding table is perturbed row by row where it is looked up and as a whole
    where it is the output layer, with the same numbers, under the structured laws and the mask too."""
    path = zoflat("finetune", "--model", tiny_causal("gpt2"), "--task", "copa", "--num-train", "8", "--num-dev", "2",
                  "--num-eval", "4", "-o", ",".join(NEW), "--steps", "4", "--period", "2", "--log-every", "2",
                  "--lr", "1e-3", "--dtype", "bfloat16", "--trace", "none", "--out", tmp_path, "--quiet")
    rows = table(path)
    ends = {r["optimizer"]: float(r["loss"]) for r in rows.values() if r["step"] == "4"}
    assert set(ends) == set(NEW) and all(math.isfinite(v) for v in ends.values())
    assert json.loads((path / "summary.json").read_text())["status"] == "completed"


def test_hizoo_s_curvature_is_at_rest_where_its_smoothing_is_the_same_at_every_minimum():
    """At a minimum of the toy H = vvᵀ (v = (z, y)); HiZOO's D is at rest in the mean, E[D_new] = D,
    where E[|z̃ᵀH̃z̃| z_i²]/2 = (Tr H̃ + 2H̃_ii)/2 = 1 (H̃ = D^-½HD^-½): D = (n+2)/2·v², whatever the
    minimum. There Tr(Σ_u H) = Tr(D⁻¹H) = 2n/(n+2): the smoothing term is the same at every
    minimum, so the drift to small Tr H is gone (measured: README). Checked over 40,000 draws at
    α = 1 (D_new is then one sample) at two minima of different sharpness (λ small: the probes reach
    λ/√D_i, and D_i is small where v_i is)."""
    problem, lam, n = ToyProblem(3), 1e-5, 40_000
    estimator = ESTIMATORS["hessian"]
    stream = DirectionStream([9], 1, 6, "gaussian", torch.float64, CPU, end_step=n)
    u = torch.cat([stream.next() for _ in range(n)], dim=1)
    for y in (torch.tensor([1.0, 0.5, -0.5]), torch.tensor([3.0, 0.2, 0.1])):
        z = y / y.dot(y)  # yᵀz = 1: a minimum
        x = torch.cat([y, z])
        v = torch.cat([z, y])
        d = (6 + 2) / 2 * v * v
        hyper = {"lambda": torch.full((1, 1), lam), "hessian_smooth": torch.ones(1, 1)}
        with torch.inference_mode():
            _, (new,) = stateful_estimate(estimator, problem, x.expand(n, 6), u, hyper, (d.expand(n, 6),), 1, 1)
        ratio = new / d
        assert torch.all((ratio.mean(0) - 1).abs() < 4.5 * ratio.std(0) / math.sqrt(n)), ratio.mean(0)
        hessian = torch.func.hessian(lambda q: problem.loss(q[None])[0])(x)
        assert float(torch.trace(hessian / d[:, None])) == pytest.approx(2 * 6 / 8, rel=1e-9)
