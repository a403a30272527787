"""`zoflat finetune`: a pretrained language model on a task, every run in place through the model
runner (engine/model.py), with the paper's metrics: train/test loss and accuracy (or F1), the
Hessian trace (Hutchinson or forward-only fd), λ_max by power iteration and ‖∇f‖.

Encoders (RoBERTa, BERT) run LM-BFF's K-shot tasks (text_tasks.py, problems/lm.py); decoder LMs
run MeZO's tasks with MeZO's sampling (llm_tasks.py, problems/causal.py). The model's config
decides which.
"""

from pathlib import Path

from zoflat_cli import llm_tasks, text_tasks
from zoflat_cli.config import DTYPES, MAX_SEED, MAX_STEPS, Setting, resolve_device, runs_from
from zoflat_cli.engine import distributed
from zoflat_cli.engine.live import say
from zoflat_cli.engine.loop import due
from zoflat_cli.engine.model import run_models
from zoflat_cli.engine.runfolder import open_for_resume
from zoflat_cli.errors import ZoflatError
from zoflat_cli.hessian import finite_difference, hutchinson, top_eigenvalue
from zoflat_cli.optim.directions import ParameterDirections
from zoflat_cli.optim.inplace import dot
from zoflat_cli.optim.presets import SAMPLES, UPDATE_DEFAULTS, default_lrs, estimator_of
from zoflat_cli.problems import lm
from zoflat_cli.problems.causal import SCORING
from zoflat_cli.problems.pretrained import DEVICE_MAPS, TRAINABLE, peak_memory_mib
from zoflat_cli.streams import generator, step_key

TRACE_METHODS = ("hutchinson", "fd", "none")
OBJECTIVES = ("loss", "accuracy", "f1")

DEFAULTS = {
    "command": "finetune",
    "name": "finetune",
    "task": "sst2",
    "k": 32,
    "split_seed": text_tasks.SPLIT_SEEDS[0],
    "test_mode": "1k",
    # decoder tasks: MeZO's sampling (run.sh's defaults) and prompts
    "num_train": 1000,
    "num_dev": 500,
    "num_eval": 1000,
    "train_set_seed": 0,
    "train_pool": "train",
    "demos": 0,  # in-context demonstrations (an evaluation baseline: --steps 0)
    "scoring": "sum",
    "max_new_tokens": 50,
    "objective": "loss",
    "data_dir": None,
    "model": "roberta-large",
    "head": "auto",
    "max_length": None,  # encoders: 128; decoders: the model's positions, at most 2048
    "micro_batch": 16,
    "batch_size": 0,  # 0: the whole K-shot training set (full-batch, as in the paper)
    "steps": 100_000,
    "optimizer": ["zo"],
    "lr": default_lrs(gradient=5e-5, zo=1e-5, per_coordinate=1e-6),
    "lambda": 2e-3,
    "rho": 0.05,
    "tilt": 1.0,
    "samples": SAMPLES,
    **UPDATE_DEFAULTS,
    "directions": "gaussian",
    "update": None,  # each optimizer's own rule
    "seeds": [0],
    "log_every": 100,
    "eval_every": 1000,
    "trace": "hutchinson",
    "trace_every": 1000,
    "trace_probes": 10,
    "trace_delta": 1e-3,
    "checkpoint_every": 0,
    "eig_every": 0,  # 0: never; λ_max by power iteration costs eig_iters Hessian-vector products
    "eig_iters": 20,
    "trainable": "all",
    "lora_rank": 8,  # MeZO's LoRA and prefix settings
    "lora_alpha": 16,
    "prefix_tokens": 5,
    "device_map": None,  # one device; auto: the layers across the GPUs
    "device": "auto",
    "dtype": "float32",
    "out": "runs",
}
SETTINGS = {
    "steps": Setting("int", 0, MAX_STEPS),  # 0: evaluate only (the zero-shot and in-context baselines)
    "task": Setting("text", choices=tuple(dict.fromkeys([*text_tasks.TASKS, *llm_tasks.TASKS]))),
    "k": Setting("int", 1, 10**6),
    "split_seed": Setting("int", 0, MAX_SEED),
    "test_mode": Setting("text", choices=text_tasks.TEST_MODES),
    "num_train": Setting("int", 1, 10**7),
    "num_dev": Setting("int", 0, 10**7),
    "num_eval": Setting("int", 1, 10**7),
    "train_set_seed": Setting("int", 0, MAX_SEED),
    "train_pool": Setting("text", choices=llm_tasks.TRAIN_POOLS),
    "demos": Setting("int", 0, 10**4),
    "scoring": Setting("text", choices=SCORING),
    "max_new_tokens": Setting("int", 1, 10**5),
    "objective": Setting("text", choices=OBJECTIVES),
    "data_dir": Setting("path", optional=True),
    "model": Setting("text"),
    "head": Setting("text", choices=lm.HEADS),
    "max_length": Setting("int", 2, 10**6, optional=True),
    "micro_batch": Setting("int", 1, 10**6),
    "batch_size": Setting("int", 0, 10**9),
    "eval_every": Setting("int", 1, MAX_STEPS),
    "trace": Setting("text", choices=TRACE_METHODS),
    "trace_every": Setting("int", 1, MAX_STEPS),
    "trace_probes": Setting("int", 1, 10**5),
    "trace_delta": Setting("number", 0, 1, above=True),
    "eig_every": Setting("int", 0, MAX_STEPS),
    "eig_iters": Setting("int", 1, 10**5),
    "dtype": Setting("text", choices=tuple(DTYPES)),
    "trainable": Setting("text", choices=TRAINABLE),
    "lora_rank": Setting("int", 1, 10**5),
    "lora_alpha": Setting("number", 0, 10**6, above=True),
    "prefix_tokens": Setting("int", 1, 10**4),
    "device_map": Setting("text", choices=DEVICE_MAPS, optional=True),
}




def task_metric(name: str) -> str:
    return llm_tasks.TASKS[name].metric if name in llm_tasks.TASKS else "accuracy"


def check(config: dict) -> dict:
    """What depends on several settings: the objective against the optimizers and the task, and
    demonstrations (an evaluation baseline) against training."""
    objective, metric = config["objective"], task_metric(config["task"])
    if objective != "loss":
        if objective != metric:
            raise ZoflatError(f"--objective {objective} does not fit task {config['task']}, whose metric is "
                              f"{metric}: use --objective {metric} or loss")
        exact = [o for o in config["optimizer"] if estimator_of(o).query != "loss"]
        if exact:
            raise ZoflatError(f"--objective {objective} is not differentiable: {exact[0]} needs the loss's "
                              f"gradient; use a ZO optimizer (zo, zest, zo-adam, ...) or --objective loss")
    if config["demos"] and config["steps"]:
        raise ZoflatError(f"--demos {config['demos']} is the in-context baseline, evaluated without training: "
                          f"add --steps 0")
    if config["demos"] > config["num_train"]:
        raise ZoflatError(f"--demos {config['demos']} is more than the --num-train {config['num_train']} "
                          f"examples they are drawn from")
    return config


def metrics(runner, step: int) -> dict:
    cfg, problem, seed = runner.config, runner.problem, runner.run.seed
    names = ("f1", "em") if getattr(problem, "generation", False) else ("accuracy",)
    train = problem.evaluate("train", decode=False)
    row = {"loss": train["loss"], **({"accuracy": train["accuracy"]} if "accuracy" in train else {})}
    if problem.objective != "loss":  # what the optimizer minimises
        row["objective"] = 1 - train["accuracy"] if "accuracy" in train else problem.loss("train")
    evaluated = [s for s in ("test", "dev") if s in problem.splits]
    for split in evaluated:
        row.update({f"{split}_loss": None, **{f"{split}_{n}": None for n in names}})
    row.update(hessian_trace=None, hessian_trace_stderr=None, lambda_max=None, grad_norm=None)
    if due(step, cfg["eval_every"], cfg["steps"]):
        for split in evaluated:
            row.update({f"{split}_{k}": v for k, v in problem.evaluate(split).items()})
        grads = problem.gradient("train")
        row["grad_norm"] = dot(grads, grads) ** 0.5
    if cfg["eig_every"] and due(step, cfg["eig_every"], cfg["steps"]):
        gen = generator(seed, "probes", problem.device, step, 1)  # not the trace probes
        row["lambda_max"] = top_eigenvalue(problem.params, problem.hvp, cfg["eig_iters"], gen)
    if cfg["trace"] != "none" and due(step, cfg["trace_every"], cfg["steps"]):
        row["hessian_trace"], row["hessian_trace_stderr"] = trace(runner, step)
    row["peak_memory_mib"] = round(peak_memory_mib(problem.device), 1)
    return row


def trace(runner, step: int) -> tuple:
    """Tr ∇² of the training cross-entropy (whatever --objective the optimizer sees)."""
    cfg, problem, seed = runner.config, runner.problem, runner.run.seed
    if cfg["trace"] == "fd":  # Gaussian probes, whatever law the run draws its directions from
        keys = [(step_key(seed, "probes", step, i), 0) for i in range(cfg["trace_probes"])]
        directions = ParameterDirections(problem.params, module=problem.model)
        return finite_difference(directions, lambda: problem.cross_entropy("train"), keys, cfg["trace_delta"])
    gen = generator(seed, "probes", problem.device, step)
    return hutchinson(problem.params, problem.hvp, cfg["trace_probes"], gen)


def encoder_problem(config: dict, model_config, device, dtype):
    if config["task"] not in text_tasks.TASKS:
        raise ZoflatError(f"task {config['task']} needs a decoder LM (e.g. --model facebook/opt-1.3b); "
                          f"{config['model']!r} is an encoder, which runs {', '.join(text_tasks.TASKS)}")
    task = text_tasks.get_task(config["task"])
    train, _dev, test = text_tasks.kshot(task, config["k"], config["split_seed"], config["data_dir"],
                                         config["test_mode"])
    return lm.LMProblem(config, task, {"train": train.examples(), "test": test.examples()}, device, dtype,
                        model_config)


def decoder_problem(config: dict, model_config, device, dtype):
    from zoflat_cli.problems.causal import CausalProblem

    if config["task"] not in llm_tasks.TASKS:
        raise ZoflatError(f"task {config['task']} is an encoder task (LM-BFF prompts with a mask); decoder LMs "
                          f"run {', '.join(llm_tasks.TASKS)}")
    if config["head"] != "auto":
        raise ZoflatError(f"--head {config['head']} is for encoder models; {config['model']!r} is a decoder LM, "
                          f"which scores options by their log-likelihood")
    task = llm_tasks.get_task(config["task"])
    _drawn, rows = llm_tasks.load_sample(task, config)
    examples = {"train": llm_tasks.examples(task, rows["train"]), "dev": llm_tasks.examples(task, rows["dev"]),
                "test": llm_tasks.examples(task, rows["eval"])}
    problem = CausalProblem(config, task, examples, device, dtype, model_config)
    problem.description["train_pool"] = config["train_pool"]
    return problem


def make_problem(config: dict, device, dtype):
    from transformers import AutoConfig

    from zoflat_cli.problems.causal import is_causal
    from zoflat_cli.problems.pretrained import from_pretrained, quiet_transformers

    quiet_transformers()
    model_config = from_pretrained(AutoConfig, config["model"])
    build = decoder_problem if is_causal(model_config) else encoder_problem
    return build(config, model_config, device, dtype)


def run_finetune(config: dict, quiet: bool = False, resume: Path = None):
    """Runs (or, with resume, continues) every run of the config; under torchrun, as one data-parallel
    run (engine/distributed.py). Returns (folder, status)."""
    device, dtype = resolve_device(config["device"]), DTYPES[config["dtype"]]
    runs = runs_from(config)
    if distributed.world_size() > 1 and config["device_map"]:
        raise ZoflatError("--device-map places one model across GPUs; under torchrun every process holds the whole "
                          "model: use one or the other")
    previous = open_for_resume(resume, runs, device, config["steps"]) if resume else {}  # before the model loads
    with distributed.group_for(device) as group, distributed.private_outputs(group, config, resume) as (config, resume):
        problem = make_problem(config, group.device, dtype)  # `previous` holds for a rank's copy of the folder too
        problem.group = group
        problem.description["processes"] = group.world
        cut = {s: n for s, n in getattr(problem, "truncated", {}).items() if n}
        if cut and not group.rank:  # said once, before the run
            say(f"note: prompts longer than --max-length {problem.max_length} lost their beginning (never the "
                f"answer): " + ", ".join(f"{n} in {s}" for s, n in cut.items()), err=True)
        path, status = run_models(config, problem, runs, metrics, quiet or group.rank > 0,
                                  Path(resume) if resume else None, previous)
        return (None if group.rank else path), status
