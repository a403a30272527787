"""`zoflat finetune`: a language model on a few-shot task, every run in place through the model
runner (engine/model.py), with the paper's metrics: train/test loss and accuracy, the Hessian
trace (Hutchinson or forward-only fd), λ_max by power iteration and ‖∇f‖."""

from pathlib import Path

from zoflat_cli.config import DTYPES, resolve_device, runs_from
from zoflat_cli.engine.loop import due
from zoflat_cli.engine.model import run_models
from zoflat_cli.engine.runfolder import open_for_resume
from zoflat_cli.hessian import finite_difference, hutchinson, top_eigenvalue
from zoflat_cli.optim.directions import ParameterDirections
from zoflat_cli.optim.inplace import dot
from zoflat_cli.problems.lm import LMProblem, peak_memory_mib
from zoflat_cli.streams import generator, step_key
from zoflat_cli.text_tasks import get_task, kshot


def metrics(runner, step: int) -> dict:
    cfg, problem, seed = runner.config, runner.problem, runner.run.seed
    loss, accuracy = problem.evaluate("train")
    row = {"loss": loss, "accuracy": accuracy, "test_loss": None, "test_accuracy": None,
           "hessian_trace": None, "hessian_trace_stderr": None, "lambda_max": None, "grad_norm": None}
    if due(step, cfg["eval_every"], cfg["steps"]):
        row["test_loss"], row["test_accuracy"] = problem.evaluate("test")
        grads = problem.gradient("train")
        row["grad_norm"] = dot(grads, grads) ** 0.5
    if cfg["eig_every"] and due(step, cfg["eig_every"], cfg["steps"]):
        gen = generator(seed, "probes", problem.device, step, 1)  # not the trace probes
        with problem.double_backward():
            row["lambda_max"] = top_eigenvalue(problem.params, problem.loss_terms, cfg["eig_iters"], gen)
    if cfg["trace"] != "none" and due(step, cfg["trace_every"], cfg["steps"]):
        row["hessian_trace"], row["hessian_trace_stderr"] = trace(runner, step)
    row["peak_memory_mib"] = round(peak_memory_mib(problem.device), 1)
    return row


def trace(runner, step: int) -> tuple:
    cfg, problem, seed = runner.config, runner.problem, runner.run.seed
    if cfg["trace"] == "fd":  # Gaussian probes, whatever law the run draws its directions from
        keys = [(step_key(seed, "probes", step, i), 0) for i in range(cfg["trace_probes"])]
        return finite_difference(ParameterDirections(problem.params), lambda: problem.loss("train"), keys,
                                 cfg["trace_delta"])
    gen = generator(seed, "probes", problem.device, step)
    with problem.double_backward():
        return hutchinson(problem.params, problem.loss_terms, cfg["trace_probes"], gen)


def run_finetune(config: dict, quiet: bool = False, resume: Path = None):
    """Runs (or, with resume, continues) every run of the config. Returns (folder, status)."""
    task = get_task(config["task"])
    device, dtype = resolve_device(config["device"]), DTYPES[config["dtype"]]
    runs = runs_from(config)
    previous = open_for_resume(resume, runs, device, config["steps"]) if resume else {}  # before the model loads
    train, _dev, test = kshot(task, config["k"], config["split_seed"], config["data_dir"], config["test_mode"])
    problem = LMProblem(config, task, {"train": train.examples(), "test": test.examples()}, device, dtype)
    return run_models(config, problem, runs, metrics, quiet, Path(resume) if resume else None, previous)
