"""The flatness lab: each measure against an exact Hessian, a closed form or a direct evaluation;
runs restored at a step against runs stopped there; `zoflat flatness` through the real CLI."""

import contextlib
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from zoflat_cli.cli import app
from zoflat_cli.experiments import convex, finetune, toy
from zoflat_cli.measures import hessian, landscape, sharpness, spectrum
from zoflat_cli.measures.registry import MEASURES, Settings
from zoflat_cli.measures.subject import gaussian, module_of, rademacher, shifted

runner = CliRunner()


class TinySubject:
    """A two-layer tanh network on 24 regression examples in float64, with its exact Hessian."""

    def __init__(self, seed=0, n=24):
        gen = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        self.Y = torch.randn(n, generator=gen, dtype=torch.float64)
        self.params = [torch.randn(4, 3, generator=gen, dtype=torch.float64) * 0.8,
                       torch.randn(4, generator=gen, dtype=torch.float64) * 0.3,
                       torch.randn(4, generator=gen, dtype=torch.float64)]
        self.names = ["net.layers.0.weight", "net.layers.0.bias", "head.weight"]
        self.rows = list(range(n))

    def _loss(self, params, rows=None):
        rows = self.rows if rows is None else rows
        w1, b1, w2 = params
        out = torch.tanh(self.X[rows] @ w1.T + b1) @ w2
        return 0.5 * ((out - self.Y[rows]) ** 2).mean()

    def loss(self) -> float:
        return float(self._loss(self.params))

    def gradient(self) -> list:
        leaves = [p.detach().requires_grad_() for p in self.params]
        return list(torch.autograd.grad(self._loss(leaves), leaves))

    def hvp(self, v) -> list:
        leaves = [p.detach().requires_grad_() for p in self.params]
        return hessian.hvp(leaves, lambda: [self._loss(leaves)], v)

    def examples(self) -> int:
        return len(self.rows)

    @contextlib.contextmanager
    def restricted(self, indices):
        whole, self.rows = self.rows, list(indices)
        try:
            yield
        finally:
            self.rows = whole

    def flat(self):
        return torch.cat([p.reshape(-1) for p in self.params])

    def exact_hessian(self):
        shapes = [p.shape for p in self.params]

        def f(x):
            parts, start = [], 0
            for s in shapes:
                parts.append(x[start:start + s.numel()].view(s))
                start += s.numel()
            return self._loss(parts)

        return torch.autograd.functional.hessian(f, self.flat())


def gen(seed):
    return torch.Generator().manual_seed(seed)


class Quadratic:
    """f(w) = ½ (w − w*)ᵀ A (w − w*) at w = w* (its minimum), one tensor."""

    def __init__(self, n=6, seed=0, spectrum=None):
        g = gen(seed)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        spectrum = torch.linspace(0.5, 6.0, n, dtype=torch.float64) if spectrum is None else spectrum
        self.A = q @ torch.diag(spectrum) @ q.T
        self.star = torch.randn(n, generator=g, dtype=torch.float64)
        self.params = [self.star.clone()]
        self.names = ["w"]

    def loss(self):
        d = self.params[0] - self.star
        return float(0.5 * d @ self.A @ d)

    def gradient(self):
        return [self.A @ (self.params[0] - self.star)]

    def hvp(self, v):
        return [self.A @ v[0]]


def test_top_eigenvalues_by_lanczos_match_eigvalsh():
    subject = TinySubject()
    exact = torch.linalg.eigvalsh(subject.exact_hessian()).flip(0)
    top = spectrum.top_eigenvalues(subject.params, subject.hvp, 4, gen(0), tol=1e-10)
    assert top == pytest.approx(exact[:4].tolist(), rel=1e-8, abs=1e-10)


def test_hutchpp_is_exact_at_full_rank_and_beats_hutchinson_at_equal_products():
    subject = TinySubject()
    H = subject.exact_hessian()
    exact = float(torch.trace(H))
    n = H.shape[0]
    value, stderr = hessian.hutchpp(subject.params, subject.hvp, 3 * n, gen(1))
    assert value == pytest.approx(exact, rel=1e-9)  # the sketch spans everything: nothing left to sample
    plus = [hessian.hutchpp(subject.params, subject.hvp, 12, gen(s))[0] for s in range(40)]
    assert abs(np.mean(plus) - exact) < 5 * np.std(plus) / np.sqrt(40)  # unbiased (an indefinite Hessian)
    # a decaying spectrum (as trained networks' are): the sketch takes the top, sampling only the rest
    quadratic = Quadratic(n=20, spectrum=10 * 0.6 ** torch.arange(20.0, dtype=torch.float64))
    plain = [hessian.hutchinson(quadratic.params, quadratic.hvp, 12, gen(s))[0] for s in range(100)]
    plus = [hessian.hutchpp(quadratic.params, quadratic.hvp, 12, gen(s))[0] for s in range(100)]
    assert abs(np.mean(plus) - float(torch.trace(quadratic.A))) < 5 * np.std(plus) / 10
    assert np.var(plus) < 0.25 * np.var(plain)  # measured: 0.17


def test_slq_moments_are_the_exact_quadratic_forms_and_average_to_the_traces():
    subject = TinySubject()
    H = subject.exact_hessian()
    n = H.shape[0]
    (quadrature,) = spectrum.slq(subject.params, subject.hvp, 1, n, gen(3))
    v = torch.cat([t.reshape(-1) for t in rademacher(subject.params, gen(3))])
    # with n Lanczos steps the quadrature is exact for every polynomial: n·Στθ = vᵀHv, n·Στθ² = vᵀH²v
    assert spectrum.moment([quadrature], n, 1)[0] == pytest.approx(float(v @ H @ v), rel=1e-8)
    assert spectrum.moment([quadrature], n, 2)[0] == pytest.approx(float(v @ H @ H @ v), rel=1e-8)
    nodes, weights = quadrature
    eig = torch.linalg.eigvalsh(H)
    assert weights.sum() == pytest.approx(1.0) and nodes.min() >= eig[0] - 1e-9 and nodes.max() <= eig[-1] + 1e-9
    # over many vectors, 6 steps each: unbiased for Tr H and Tr H² (degree < 2m)
    many = spectrum.slq(subject.params, subject.hvp, 300, 6, gen(4))
    for power, exact in ((1, float(torch.trace(H))), (2, float(torch.trace(H @ H)))):
        values = spectrum.moment(many, n, power)
        assert abs(np.mean(values) - exact) < 5 * np.std(values) / np.sqrt(len(values))


def test_module_traces_sum_to_the_total_and_estimate_the_exact_blocks():
    subject = TinySubject()
    H = subject.exact_hessian()
    rows = MEASURES["modules"].compute(subject, Settings(probes=1500), lambda name: gen(7))
    total = MEASURES["trace"].compute(subject, Settings(probes=1500, trace_methods=("hutchinson",)),
                                      lambda name: gen(7))
    assert [r["module"] for r in rows] == ["net.layers.0", "head"]
    assert sum(r["value"] for r in rows) == pytest.approx(total[0]["value"], rel=1e-12)
    blocks = {"net.layers.0": slice(0, 16), "head": slice(16, 20)}
    for r in rows:
        exact = float(torch.trace(H[blocks[r["module"]], blocks[r["module"]]]))
        assert abs(r["value"] - exact) < 5 * r["stderr"]


def test_module_of_names_layers_then_owners():
    assert module_of("bert.encoder.layer.3.attention.self.query.lora_A.default.weight") == "bert.encoder.layer.3"
    assert module_of("embeddings.word_embeddings.weight") == "embeddings.word_embeddings"
    assert module_of("y") == "y"


@pytest.mark.parametrize("adaptive", [False, True])
def test_sharpness_on_a_quadratic_reaches_its_closed_form(adaptive):
    subject = Quadratic()
    rho, eta = 0.3, 0.01
    c = subject.star.abs() + eta if adaptive else torch.ones_like(subject.star)
    closed = rho**2 / 2 * float(torch.linalg.eigvalsh(c[:, None] * subject.A * c[None, :])[-1])
    value = sharpness.ascent_sharpness(subject, rho, 200, gen(0), adaptive, eta)
    assert value == pytest.approx(closed, rel=1e-6)
    assert torch.equal(subject.params[0], subject.star)  # measured, never moved
    assert sharpness.ascent_sharpness(subject, rho, 2, gen(0), adaptive, eta) <= closed + 1e-12  # a lower bound


def test_m_sharpness_is_the_mean_of_each_batchs_own_worst_case():
    subject = TinySubject(n=12)
    g = gen(5)
    replica = torch.Generator()
    replica.set_state(g.get_state())
    value, _ = sharpness.m_sharpness(subject, 4, 0.1, 3, g, adaptive=False)
    seed = int(torch.randint(0, 2**62, (1,), generator=replica))
    order = torch.randperm(12, generator=torch.Generator().manual_seed(seed)).tolist()
    expected = []
    for start in (0, 4, 8):
        with subject.restricted(order[start:start + 4]):
            expected.append(sharpness.ascent_sharpness(subject, 0.1, 3, replica, False))
    assert value == pytest.approx(np.mean(expected), rel=1e-12)
    assert value > sharpness.ascent_sharpness(subject, 0.1, 3, gen(5), False) * 0.5  # batches are sharper


def test_landscape_values_are_the_loss_at_those_points():
    subject = TinySubject()
    before = [p.clone() for p in subject.params]
    points = landscape.slice_2d(subject, 3, 0.5, gen(2))
    g = gen(2)
    d1, d2 = landscape.filter_normalised(subject.params, g), landscape.filter_normalised(subject.params, g)
    for a, b, f in points:
        moved = [p + a * x + b * y for p, x, y in zip(subject.params, d1, d2)]
        assert f == pytest.approx(float(subject._loss(moved)), rel=1e-12)
    # each filter (row of a matrix, or a whole vector) as long as the weights it moves
    assert torch.allclose(d1[0].norm(dim=1), subject.params[0].norm(dim=1))
    assert float(d1[1].norm()) == pytest.approx(float(subject.params[1].norm()))
    assert all(torch.equal(p, q) for p, q in zip(subject.params, before))
    start = [p - 0.3 for p in subject.params]
    plane = {(a, b): f for a, b, f in landscape.plane(subject, start, 5, gen(3))}
    assert plane[(1.0, 0.0)] == pytest.approx(subject.loss(), rel=1e-12)
    assert plane[(0.0, 0.0)] == pytest.approx(float(subject._loss(start)), rel=1e-12)


def test_shifted_gives_the_very_same_values_back_in_low_precision():
    params = [torch.randn(1000, dtype=torch.bfloat16)]
    before = params[0].clone()
    with shifted(params, [torch.randn(1000) * 1e-3]):
        assert not torch.equal(params[0], before)
    assert torch.equal(params[0], before)


# ---------------------------------------------------------------- restored runs, bit for bit

def test_toy_and_convex_runs_restored_at_a_step_equal_runs_stopped_there(tmp_path):
    for experiment, flags in ((toy.EXPERIMENT, {"dim": 5, "optimizer": ["gd", "zo", "zo-cons"]}),
                              (convex.EXPERIMENT, {"features": 30, "optimizer": ["gd", "zo"], "eig_every": 0})):
        stopped = experiment.resolve({**flags, "steps": 37, "log_every": 37, "out": str(tmp_path / "a")})
        path, _ = experiment.start(stopped, quiet=True)
        saved = torch.load(path / "checkpoints" / "batched.pt")["groups"]
        config = experiment.resolve({**flags, "steps": 60, "log_every": 10})
        runs = experiment.runs(config)
        got = {(run.run_id, step): subject.x for run, step, subject in
               experiment.points(config, runs, {r.run_id: [0, 37] for r in runs})}
        for key, entry in saved.items():
            for i, run_id in enumerate(key.split("|")):
                assert torch.equal(got[(run_id, 37)], entry["x"][i]), run_id


def test_finetune_runs_restored_at_a_step_equal_runs_stopped_there(tiny_mlm, tmp_path):
    flags = {"model": tiny_mlm, "task": "sst2", "k": 8, "optimizer": ["gd", "zo", "zo-adam"], "dtype": "float32",
             "lr": 0.01, "log_every": 5, "eval_every": 100, "trace": "none"}
    stopped = finetune.EXPERIMENT.resolve({**flags, "steps": 5, "checkpoint_every": 5, "out": str(tmp_path / "a")})
    stop_path, _ = finetune.EXPERIMENT.start(stopped, quiet=True)
    longer = finetune.EXPERIMENT.resolve({**flags, "steps": 9, "out": str(tmp_path / "b")})
    path, _ = finetune.EXPERIMENT.start(longer, quiet=True)
    runs = finetune.EXPERIMENT.runs(longer)
    for run, step, subject in finetune.EXPERIMENT.points(longer, runs, {r.run_id: [5, 9] for r in runs}, path):
        if step == 5:
            saved = torch.load(stop_path / "checkpoints" / f"{run.run_id}.pt")["state"]
            state = subject.problem.state()
            assert all(torch.equal(state[k], saved[k]) for k in saved), run.run_id


# ---------------------------------------------------------------- the command line

def _flatness_rows(path: Path) -> list:
    with open(path / "flatness.csv", newline="") as f:
        return list(csv.DictReader(f))


def _last_metrics(path: Path) -> dict:
    with open(path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["run_id"]: r for r in rows}  # the last row of each run


def test_flatness_cli_on_toy_and_convex_agrees_with_their_exact_metrics(tmp_path):
    toy_run = runner.invoke(app, ["toy", "--dim", "4", "--steps", "300", "--log-every", "100", "-o", "gd,zo",
                                  "--out", str(tmp_path), "--quiet"])
    convex_run = runner.invoke(app, ["convex", "--features", "20", "--steps", "200", "--log-every", "100",
                                     "--eig-every", "100", "-o", "gd,zo", "--out", str(tmp_path), "--quiet"])
    for made in (toy_run, convex_run):
        assert made.exit_code == 0, made.output
        path = Path(made.output.strip())
        result = runner.invoke(app, ["flatness", str(path), "--measures", "all", "--at", "0,mid,end",
                                     "--trace-methods", "hutchpp,slq", "--hutchpp", "63", "--top-k", "2",
                                     "--slq-steps", "5", "--points", "3", "--ascent-steps", "2", "--quiet"])
        assert result.exit_code == 0, result.output
        rows = _flatness_rows(path)
        assert {r["measure"] for r in rows} == set(MEASURES)
        assert {int(r["step"]) for r in rows} == {0, 150 if "toy" in path.name else 100, 300 if "toy" in path.name
                                                   else 200}
        for run_id, metrics in _last_metrics(path).items():
            mine = [r for r in rows if r["run_id"] == run_id and r["step"] == metrics["step"]]
            top = next(r for r in mine if r["measure"] == "eigenvalues" and r["index"] == "0")
            assert float(top["value"]) == pytest.approx(float(metrics["lambda_max"]), rel=1e-6)
            hutchpp = next(r for r in mine if r["measure"] == "trace" and r["method"] == "hutchpp")
            assert float(hutchpp["value"]) == pytest.approx(float(metrics["hessian_trace"]), rel=1e-8)
        assert (path / "flatness.png").is_file() and (path / "landscape.png").is_file()


def test_flatness_cli_on_a_finetune_folder_and_bad_input(tiny_mlm, tmp_path):
    made = runner.invoke(app, ["finetune", "--model", tiny_mlm, "--task", "sst2", "--k", "8", "-o", "gd,zo",
                               "--steps", "4", "--log-every", "2", "--eval-every", "4", "--trace", "none",
                               "--lr", "gd=0.05", "--lr", "zo=0.01", "--out", str(tmp_path), "--quiet"])
    assert made.exit_code == 0, made.output
    path = Path(made.output.strip())
    for bad, says in ((["--measures", "curvature"], "--measures: unknown curvature"),
                      (["--at", "7"], "outside the run's logged steps 0..4"),
                      (["--runs", "sam"], "--runs: no logged run sam"),
                      (["--probes", "0"], "--probes must be at least 1")):
        result = runner.invoke(app, ["flatness", str(path), *bad])
        assert result.exit_code != 0 and says in result.output and result.output.startswith("error:"), result.output
        assert not (path / "flatness.csv").exists()
    result = runner.invoke(app, ["flatness", str(path), "--measures", "trace,modules,sharpness,landscape",
                                 "--m", "8", "--points", "3", "--probes", "2", "--hutchpp", "3", "--ascent-steps", "1",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    rows = _flatness_rows(path)
    assert {(r["run_id"], r["step"]) for r in rows} == {(run, s) for run in ("gd-lr0.05-s0", "zo-lam0.002-lr0.01-s0")
                                                         for s in ("0", "4")}
    assert {r["method"] for r in rows if r["measure"] == "sharpness"} == {"plain", "adaptive", "plain-m8",
                                                                          "adaptive-m8"}
    assert {r["method"] for r in rows if r["measure"] == "landscape"} == {"1d", "2d", "plane"}
    modules = {r["module"] for r in rows if r["measure"] == "modules"}
    assert {"mlm.roberta.encoder.layer.0", "mlm.roberta.encoder.layer.1", "mlm.lm_head.dense"} <= modules
    # measuring again replaces those rows and keeps the others
    again = runner.invoke(app, ["flatness", str(path), "--measures", "trace", "--runs", "zo", "--at", "end",
                                "--probes", "3", "--hutchpp", "6", "--quiet"])
    assert again.exit_code == 0, again.output
    after = _flatness_rows(path)
    assert len(after) == len(rows)
    assert [r for r in after if r["run_id"].startswith("gd")] == [r for r in rows if r["run_id"].startswith("gd")]
    plotted = runner.invoke(app, ["plot", str(path)])
    assert plotted.exit_code == 0 and "flatness.png" in plotted.output


def test_measures_logged_during_training_equal_those_taken_afterwards(tiny_mlm, tmp_path):
    made = runner.invoke(app, ["toy", "--dim", "4", "--steps", "200", "--log-every", "50", "-o", "gd,zo",
                               "--measure-every", "100", "--measures", "eigenvalues,sharpness", "--out", str(tmp_path),
                               "--quiet"])
    assert made.exit_code == 0, made.output
    path = Path(made.output.strip())
    during = _flatness_rows(path)
    assert {(r["run_id"], r["step"]) for r in during} == {(run, s) for run in ("gd-lr0.01-s13", "zo-lam0.1-lr0.001-s13")
                                                           for s in ("0", "100", "200")}
    (path / "flatness.csv").unlink()
    after = runner.invoke(app, ["flatness", str(path), "--measures", "eigenvalues,sharpness", "--at", "0,100,200",
                                "--quiet"])
    assert after.exit_code == 0, after.output
    def key(r):
        return r["run_id"], int(r["step"]), r["measure"], r["method"], int(r["index"])

    assert sorted(_flatness_rows(path), key=key) == sorted(during, key=key)  # the same numbers, restored bit for bit and drawn from the same streams
    tuned = runner.invoke(app, ["finetune", "--model", tiny_mlm, "--task", "sst2", "--k", "8", "-o", "zo",
                                "--steps", "4", "--log-every", "2", "--eval-every", "4", "--trace", "none",
                                "--measure-every", "2", "--measures", "trace", "--out", str(tmp_path), "--quiet"])
    assert tuned.exit_code == 0, tuned.output
    rows = _flatness_rows(Path(tuned.output.strip()))
    assert [(r["step"], r["method"]) for r in rows] == [(s, m) for s in ("0", "2", "4") for m in ("hutchinson", "hutchpp")]
    bad = runner.invoke(app, ["toy", "--steps", "10", "--log-every", "5", "--measure-every", "3"])
    assert bad.exit_code != 0 and "must be a multiple of log_every" in bad.output


def test_a_folder_written_before_measure_every_still_resumes(tmp_path):
    made = runner.invoke(app, ["toy", "--dim", "3", "--steps", "20", "--log-every", "10", "-o", "zo", "--out",
                               str(tmp_path), "--quiet"])
    path = Path(made.output.strip())
    config = (path / "config.yaml").read_text()
    lines = [line for line in config.splitlines() if not line.startswith(("measures:", "measure_every:"))]
    (path / "config.yaml").write_text("\n".join(lines) + "\n")
    resumed = runner.invoke(app, ["toy", "--resume", str(path), "--steps", "30", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert _last_metrics(path)["zo-lam0.1-lr0.001-s13"]["step"] == "30"


def test_a_gd_run_is_measured_from_its_checkpoint_not_recomputed(tiny_mlm, tmp_path, monkeypatch):
    from zoflat_cli.engine import model

    config = finetune.EXPERIMENT.resolve({"model": tiny_mlm, "task": "sst2", "k": 8, "optimizer": ["gd"], "lr": 0.05,
                                          "steps": 6, "log_every": 3, "eval_every": 100, "trace": "none",
                                          "checkpoint_every": 6, "out": str(tmp_path)})
    path, _ = finetune.EXPERIMENT.start(config, quiet=True)
    saved = torch.load(path / "checkpoints" / "gd-lr0.05-s0.pt")["state"]
    moved = []
    monkeypatch.setattr(model.ModelRunner, "move", lambda self, step: moved.append(step))
    runs = finetune.EXPERIMENT.runs(config)
    for run, step, subject in finetune.EXPERIMENT.points(config, runs, {runs[0].run_id: [0, 6]}, path):
        if step == 6:
            state = subject.problem.state()
            assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert moved == []  # step 0 is the base weights; step 6 the checkpoint's


def test_flatness_cli_on_a_decoder_lm_folder_with_lora(tiny_causal, tmp_path):
    made = runner.invoke(app, ["finetune", "--model", tiny_causal("gpt2"), "--task", "copa", "--num-train", "8",
                               "--num-dev", "2", "--num-eval", "4", "-o", "zo", "--trainable", "lora", "--steps", "3",
                               "--log-every", "3", "--trace", "none", "--out", str(tmp_path), "--quiet"])
    assert made.exit_code == 0, made.output
    path = Path(made.output.strip())
    result = runner.invoke(app, ["flatness", str(path), "--measures", "all", "--at", "end", "--m", "4",
                                 "--probes", "2", "--hutchpp", "3", "--top-k", "1", "--slq-steps", "3",
                                 "--points", "3", "--ascent-steps", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = _flatness_rows(path)
    assert {r["measure"] for r in rows} == set(MEASURES) and {r["step"] for r in rows} == {"3"}
    assert {"plain-m4", "adaptive-m4"} <= {r["method"] for r in rows if r["measure"] == "sharpness"}
    # the LoRA subspace: its adapters sit in the two transformer blocks, and nothing else is measured
    assert {r["module"] for r in rows if r["measure"] == "modules"} == {"lm.transformer.h.0", "lm.transformer.h.1"}


def test_the_fd_trace_of_a_subject_is_the_quadratic_form_of_its_gaussian_probe():
    subject = TinySubject()
    H = subject.exact_hessian()
    before = [p.clone() for p in subject.params]
    rows = MEASURES["trace"].compute(subject, Settings(probes=1, fd_delta=1e-4, trace_methods=("fd",)),
                                     lambda name: gen(9))
    u = torch.cat([t.reshape(-1) for t in gaussian(subject.params, gen(9))])
    assert rows[0]["value"] == pytest.approx(float(u @ H @ u), rel=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(subject.params, before))
