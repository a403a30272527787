"""The convex problem: exact traces, factored == dense, ZO vs the smoothed gradient, end to end."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import DEVICES
from typer.testing import CliRunner

from zoflat_cli.cli import app
from zoflat_cli.data.libsvm_sets import LabelledRows as Split
from zoflat_cli.engine.batched import estimate
from zoflat_cli.optim.estimators import ESTIMATORS
from zoflat_cli.problems.convex import ConvexProblem
from zoflat_cli.engine.batched import Trainer, make_groups
from zoflat_cli.runs.spec import RunSpec

CPU = torch.device("cpu")


def random_split(n, d, seed):
    rng = np.random.default_rng(seed)
    X = sp.random(n, d, density=0.4, random_state=rng, format="csr")
    X.data = np.round(X.data * 3)  # a few repeated values, like LIBSVM's binary features
    return Split(X, np.where(rng.random(n) < 0.4, 1.0, -1.0), f"random{seed}")


def problem(model, dense=False, n_features=12, device=CPU):
    return ConvexProblem(random_split(60, 7, 0), random_split(40, 7, 1), model, n_features, dense,
                         torch.float64, device)


def dense_loss(prob, seed):
    X, y = prob.features(seed).dense_X["train"], prob.train.y

    def f(w):
        t = (X @ w) * y
        if prob.model == "svm":
            return torch.clamp(1 - t, min=0).square().mean()
        return torch.nn.functional.softplus(-t).mean()

    return f


@pytest.mark.parametrize("model", ["svm", "logreg"])
@pytest.mark.parametrize("scale", [0.05, 3.0])  # small w: every hinge active; large: many inactive
def test_hessian_trace_matches_torch_func_hessian(model, scale):
    prob = problem(model, dense=True)
    bound = prob.bind([RunSpec("gd", 0.1, 5)])
    w = torch.randn(1, prob.n_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * scale
    hessian = torch.func.hessian(dense_loss(prob, 5))(w[0])
    torch.testing.assert_close(bound.metrics(w)["hessian_trace"][0], torch.trace(hessian))
    if model == "svm":
        t = (prob.features(5).dense_X["train"] @ w[0]) * prob.train.y
        active = (t < 1).float().mean()
        assert (active == 1) if scale < 1 else (0.1 < active < 0.9)


@pytest.mark.parametrize("model", ["svm", "logreg"])
@pytest.mark.parametrize("scale", [0.05, 3.0])
def test_lambda_max_and_grad_norm_match_torch_func(model, scale):
    """λ_max from a (d+1)-square matrix of the factored features equals the top eigenvalue of the
    full (D+1)-square Hessian, with the test using the dense features."""
    prob = problem(model, dense=True, n_features=20)
    bound = prob.bind([RunSpec("gd", 0.1, 0), RunSpec("gd", 0.1, 0)])
    w = scale * torch.randn(2, prob.n_params, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    metrics = bound.metrics(w)
    f = dense_loss(prob, 0)
    for i in range(2):
        top = torch.linalg.eigvalsh(torch.func.hessian(f)(w[i]))[-1].item()
        assert metrics["lambda_max"][i].item() == pytest.approx(top, rel=1e-9)
        assert metrics["grad_norm"][i].item() == pytest.approx(torch.func.grad(f)(w[i]).norm().item(), rel=1e-10)


@pytest.mark.parametrize("model", ["svm", "logreg"])
def test_factored_equals_dense(model):
    factored, dense = problem(model), problem(model, dense=True)
    runs = [RunSpec("gd", 0.1, 3), RunSpec("gd", 0.1, 4)]  # two seeds: two feature maps in one group
    w = torch.randn(2, factored.n_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fb, db = factored.bind(runs), dense.bind(runs)
    for name, value in fb.metrics(w).items():
        torch.testing.assert_close(value, db.metrics(w)[name], rtol=1e-9, atol=1e-9, msg=name)
    torch.testing.assert_close(fb.grad(w), db.grad(w), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fb.grad(w)[0], torch.func.grad(dense_loss(dense, 3))(w[0]), rtol=1e-9, atol=1e-12)
    batched = torch.randn(2, 3, 2, factored.n_params, dtype=torch.float64)
    torch.testing.assert_close(fb.loss(batched), db.loss(batched), rtol=1e-9, atol=1e-12)


def trajectories(runs, dense=False, device=CPU):
    prob = problem("svm", dense, device=device)
    rows = []
    Trainer(prob, make_groups(prob, runs, torch.float64, device), 50, 10,
            [lambda step, logged, states: rows.extend(logged)]).run()
    return pd.DataFrame(rows).drop(columns="wall_s")


def assert_same_numbers(a, b):
    numeric = a.select_dtypes("number").columns
    np.testing.assert_allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), rtol=1e-6, atol=1e-9)


def test_factored_and_dense_trajectories_agree():
    runs = [RunSpec("gd", 0.05, 3), RunSpec("zo", 0.01, 3, 1, (("lambda", 0.01),)), RunSpec("sam", 0.05, 4, 1, (("rho", 0.1),))]
    assert_same_numbers(trajectories(runs), trajectories(runs, dense=True))


@pytest.mark.parametrize("device", DEVICES[1:])
@pytest.mark.parametrize("dense", [False, True])
def test_cuda_follows_the_cpu_path(device, dense):
    """Sparse CSR (factored) and dense products on the GPU: GD and SAM trajectories, their exact
    traces and λ_max as on the CPU (ZO draws its directions from the device's generator)."""
    runs = [RunSpec("gd", 0.05, 3), RunSpec("sam", 0.05, 4, 1, (("rho", 0.1),))]
    assert_same_numbers(trajectories(runs, dense, torch.device(device)), trajectories(runs, dense))


def test_zo_on_logistic_is_unbiased_for_the_smoothed_gradient():
    """E[(f(w+λu) - f(w-λu))/(2λ) u] = ∇E f(w+λu) = E ∇f(w+λu): compare with a Monte-Carlo mean."""
    prob, lam, n = problem("logreg", n_features=6), 0.8, 200_000
    bound = prob.bind([RunSpec("zo", 0.1, 1)])
    w = torch.randn(1, prob.n_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5
    gen = torch.Generator().manual_seed(7)
    u = torch.randn(1, n, prob.n_params, generator=gen, dtype=torch.float64)
    estimates = estimate(ESTIMATORS["two-point"], bound, w.expand(n, -1), u, {"lambda": torch.full((n, 1), lam, dtype=torch.float64)})
    v = torch.randn(n, prob.n_params, generator=gen, dtype=torch.float64)
    reference = bound.grad(w + lam * v)  # independent draws of ∇f(w + λv)
    se = (estimates.var(0) / n + reference.var(0) / n).sqrt()
    assert ((estimates.mean(0) - reference.mean(0)).abs() / se).max() < 5
    plain = bound.grad(w)[0]  # the smoothing is visible: ZO does not estimate ∇f itself here
    assert ((estimates.mean(0) - plain).abs() / se).max() > 8


def test_convex_cli_end_to_end(tmp_path):
    runner = CliRunner()
    args = ["convex", "--dataset", "a8a", "--train-size", "400", "--features", "64", "--steps", "60",
            "--log-every", "20", "--optimizer", "gd,zo,sam", "--seeds", "2", "--out", str(tmp_path), "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "convex").iterdir()
    df = pd.read_csv(folder / "metrics.csv")
    assert {"loss", "accuracy", "hessian_trace", "test_loss", "test_accuracy", "test_hessian_trace"} <= set(df.columns)
    assert df["run_id"].nunique() == 6 and df["step"].max() == 60
    assert df["loss"].iloc[-1] < df["loss"].iloc[0]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["problem"]["train_rows"] == 400 and summary["problem"]["test_rows"] == 22_696 - 400
    assert "re-split" in summary["problem"]["data"]
    assert runner.invoke(app, ["plot", str(folder)]).exit_code == 0
    assert (folder / "figure.png").is_file()
