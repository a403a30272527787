"""`zoflat finetune`: a pretrained language model on a task, every run in place through the model
runner (engine/model.py), with the paper's metrics: train/test loss and accuracy (or F1), the
Hessian trace (Hutchinson or forward-only fd), λ_max by power iteration and ‖∇f‖ (the problem's
`metrics`, problems/pretrained.py).

Encoders (RoBERTa, BERT) run LM-BFF's K-shot tasks (data/lmbff_tasks.py, problems/encoder.py);
decoder LMs run MeZO's tasks with MeZO's sampling (data/mezo_tasks.py, problems/decoder.py). The
model's config decides which. The settings need no torch; the model, the problems and the engine
are imported when a run starts (the command line's start-up).
"""

from pathlib import Path

from zoflat_cli.data import lmbff_tasks, mezo_tasks
from zoflat_cli.env import DTYPE_NAMES
from zoflat_cli.errors import ZoflatError
from zoflat_cli.experiments.experiment import Experiment, table
from zoflat_cli.experiments.settings import MAX_SEED, MAX_STEPS, SHARED, Setting
from zoflat_cli.optim.presets import default_lrs, estimator_of
from zoflat_cli.output import say
from zoflat_cli.problems.names import DEVICE_MAPS, HEADS, SCORING, TRAINABLE

TRACE_METHODS = ("hutchinson", "fd", "none")
OBJECTIVES = ("loss", "accuracy", "f1")
DECODER = "Decoder tasks: "
ENCODER = "Encoder tasks: "

SETTINGS = table(
    {
        "task": Setting("text", choices=tuple(dict.fromkeys([*lmbff_tasks.TASKS, *mezo_tasks.TASKS])), default="sst2",
                        help="Encoders: sst2, sst5, trec. Decoder LMs: sst2, rte, cb, boolq, wsc, wic, multirc, copa, "
                             "record, piqa, arc-easy, arc-challenge, openbookqa, squad, drop."),
        "k": Setting("int", 1, 10**6, default=32, help=ENCODER + "training examples per label (K-shot)."),
        "split_seed": Setting("int", 0, MAX_SEED, default=lmbff_tasks.SPLIT_SEEDS[0],
                              help=ENCODER + "LM-BFF split seed (13, 21, 42, 87, 100 are the published ones)."),
        "test_mode": Setting("text", choices=lmbff_tasks.TEST_MODES, default="1k",
                             help=ENCODER + "1k (LM-BFF k-shot-1k-test: at most 1,000 test rows) or full."),
        # decoder tasks: MeZO's sampling (run.sh's defaults) and prompts
        "num_train": Setting("int", 1, 10**7, default=1000, help=DECODER + "training examples sampled (MeZO: 1000)."),
        "num_dev": Setting("int", 0, 10**7, default=500,
                           help=DECODER + "dev examples, the last of the training draw (MeZO: 500; CB, COPA 100)."),
        "num_eval": Setting("int", 1, 10**7, default=1000,
                            help=DECODER + "evaluation examples from the validation pool (MeZO: 1000)."),
        "train_set_seed": Setting("int", 0, MAX_SEED, default=0, help=DECODER + "MeZO's sampling seed."),
        "train_pool": Setting("text", choices=mezo_tasks.TRAIN_POOLS, default="train",
                              help="train (MeZO), or eval: train+dev drawn from the validation pool, disjoint from the "
                                   "eval sample (offline runs of tasks whose train split is not bundled)."),
        "demos": Setting("int", 0, 10**4, default=0,  # an evaluation baseline: --steps 0
                         help="In-context demonstrations from the training sample (with --steps 0)."),
        "scoring": Setting("text", choices=SCORING, default="sum",
                           help="Option score: sum of its tokens' log-probabilities, or mean (length-normalised)."),
        "max_new_tokens": Setting("int", 1, 10**5, default=50,
                                  help="Generation tasks: greedy decoding length limit (MeZO: 50)."),
        "objective": Setting("text", choices=OBJECTIVES, default="loss",
                             help="What ZO minimises: loss, accuracy or f1 (1 - the metric; ZO optimizers only)."),
        "data_dir": Setting("path", optional=True,
                            help="Local copies: LM-BFF data/original layout, or the official files as `zoflat data "
                                 "list` names them (default: bundled, then the hub)."),
        "model": Setting("text", default="roberta-large",
                         help="Hub id (roberta-large, facebook/opt-13b), a local model folder, minilm, or tiny-gpt2 / "
                              "tiny-opt / tiny-llama (random, offline)."),
        "head": Setting("text", choices=HEADS, default="auto",
                        help="Encoders: auto, prompt (MLM + label words) or linear."),
        "max_length": Setting("int", 2, 10**6, optional=True,  # None: encoders 128; decoders the model's, ≤ 2048
                              help="Tokens per example (encoders 128; decoders: the model's, at most 2048)."),
        "micro_batch": Setting("int", 1, 10**6, default=16,
                               help="Examples per forward pass (memory; the loss is the same)."),
        "probe_cache": Setting("int", 0, 10**7, default=256,
                               help="MiB of the step's direction drawn once for both probes, all their "
                                    "micro-batches and the update (0: drawn for each, inference-level memory; "
                                    "the numbers are the same)."),
        "batch_size": Setting("int", 0, 10**9, default=0,  # the whole K-shot training set, as in the paper
                              help="Examples per step; 0 = the whole training set."),
        "eval_every": Setting("int", 1, MAX_STEPS, default=1000, help="Test metrics every N steps."),
        "trace": Setting("text", choices=TRACE_METHODS, default="hutchinson", help="hutchinson, fd or none."),
        "trace_every": Setting("int", 1, MAX_STEPS, default=1000, help="Hessian trace every N steps."),
        "trace_probes": Setting("int", 1, 10**5, default=10, help="Probes per trace estimate."),
        "trace_delta": Setting("number", 0, 1, above=True, default=1e-3, help="δ of the fd estimator."),
        "eig_every": Setting("int", 0, MAX_STEPS, default=0,  # λ_max costs eig_iters Hessian-vector products
                             help="λ_max by power iteration every N steps (0: never)."),
        "eig_iters": Setting("int", 1, 10**5, default=20, help="Power-iteration steps."),
        "trainable": Setting("text", choices=TRAINABLE, default="all",
                             help="What is trained: all, lora, prefix (decoders), bias (BitFit) or head (peft)."),
        "lora_rank": Setting("int", 1, 10**5, default=8, help="LoRA rank r (MeZO: 8)."),
        "lora_alpha": Setting("number", 0, 10**6, above=True, default=16, help="LoRA α (MeZO: 16)."),
        "prefix_tokens": Setting("int", 1, 10**4, default=5, help="Prefix tuning's virtual tokens (MeZO: 5)."),
        "device_map": Setting("text", choices=DEVICE_MAPS, optional=True,  # None: one device
                              help="auto, balanced or sequential: the model's layers across the visible GPUs "
                                   "(accelerate)."),
    },
    name="finetune", log_every=100, seeds=[0], optimizer=["zo"], **{"lambda": 2e-3},
    steps=Setting("int", 0, MAX_STEPS, default=100_000, help=SHARED["steps"].help),  # 0: evaluate only (baselines)
    lr=default_lrs(gradient=5e-5, zo=1e-5, per_coordinate=1e-6),
    dtype=Setting("text", choices=DTYPE_NAMES, default="float32", help=SHARED["dtype"].help),
)


def task_metric(name: str) -> str:
    return mezo_tasks.TASKS[name].metric if name in mezo_tasks.TASKS else "accuracy"


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


def defaults_for(chosen: dict) -> dict:
    """An evaluation baseline (--steps 0) takes no Hessian trace unless one is asked for: on a real
    model the default 10 Hutchinson probes over the training set cost many times the evaluation."""
    return {"trace": "none"} if chosen.get("steps") == 0 else {}


def encoder_problem(config, model_config, device, dtype, group=None):
    from zoflat_cli.problems import encoder

    if config.task not in lmbff_tasks.TASKS:
        raise ZoflatError(f"task {config.task} needs a decoder LM (e.g. --model facebook/opt-1.3b); "
                          f"{config.model!r} is an encoder, which runs {', '.join(lmbff_tasks.TASKS)}")
    task = lmbff_tasks.get_task(config.task)
    train, _dev, test = lmbff_tasks.kshot(task, config.k, config.split_seed, config.data_dir, config.test_mode)
    return encoder.EncoderProblem(config, task, {"train": train.examples(), "test": test.examples()}, device, dtype,
                                  model_config, group)


def decoder_problem(config, model_config, device, dtype, group=None):
    from zoflat_cli.problems import decoder

    if config.task not in mezo_tasks.TASKS:
        raise ZoflatError(f"task {config.task} is an encoder task (LM-BFF prompts with a mask); decoder LMs "
                          f"run {', '.join(mezo_tasks.TASKS)}")
    if config.head != "auto":
        raise ZoflatError(f"--head {config.head} is for encoder models; {config.model!r} is a decoder LM, "
                          f"which scores options by their log-likelihood")
    task = mezo_tasks.get_task(config.task)
    _drawn, rows = mezo_tasks.load_sample(task, config.num_train, config.num_dev, config.num_eval,
                                          config.train_set_seed, config.train_pool, config.data_dir)
    examples = {"train": mezo_tasks.examples(task, rows["train"]), "dev": mezo_tasks.examples(task, rows["dev"]),
                "test": mezo_tasks.examples(task, rows["eval"])}
    return decoder.DecoderProblem(config, task, examples, device, dtype, model_config, group)


def make_problem(config, device, dtype, group=None):
    """The problem of a typed finetune config: an encoder's or a decoder LM's, as the model's
    config says; `group`: the data-parallel process group (None: a single process)."""
    from transformers import AutoConfig

    from zoflat_cli.models.loading import from_pretrained, quiet_transformers
    from zoflat_cli.problems import decoder

    quiet_transformers()
    model_config = from_pretrained(AutoConfig, config.model)
    build = decoder_problem if decoder.is_causal(model_config) else encoder_problem
    return build(config, model_config, device, dtype, group)


def run(config, runs, quiet: bool = False, resume: Path = None):
    """Runs (or, with resume, continues) every run of the config; under torchrun, as one data-parallel
    run (engine/distributed.py). Returns (folder, status)."""
    from zoflat_cli.devices import DTYPES, resolve_device
    from zoflat_cli.engine import distributed
    from zoflat_cli.engine.model import run_models
    from zoflat_cli.models.loading import model_location
    from zoflat_cli.runs.folder import open_for_resume

    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    if distributed.world_size() > 1 and config.device_map:
        raise ZoflatError("--device-map places one model across GPUs; under torchrun every process holds the whole "
                          "model: use one or the other")
    previous = open_for_resume(resume, runs, device, config.to_dict()) if resume else {}  # before the model loads
    model_location(config.model)  # a model built into the cache is built before torch.distributed starts: under
    # it, transformers' save_pretrained writes on rank 0 only, and the other ranks would cache a model-less folder
    with distributed.group_for(device) as group:
        distributed.check_same_config(group, config.to_dict())
        with distributed.private_outputs(group, config, resume) as (config, resume):
            problem = make_problem(config, group.device, dtype, group)  # `previous` holds for a rank's copy too
            cut = {s: n for s, n in problem.truncated.items() if n}
            if cut and not group.rank:  # said once, before the run
                say(f"note: prompts longer than --max-length {problem.max_length} lost their beginning (never the "
                    f"answer): " + ", ".join(f"{n} in {s}" for s, n in cut.items()), err=True)
            path, status = run_models(config, problem, runs, quiet or group.rank > 0,
                                      Path(resume) if resume else None, previous)
            return (None if group.rank else path), status


def points(config, runs, steps: dict, folder: Path):
    """The runs of a finetune run folder at the chosen steps (engine/points.py), one process."""
    from zoflat_cli.devices import DTYPES, resolve_device
    from zoflat_cli.engine.points import model_points

    problem = make_problem(config, resolve_device(config.device), DTYPES[config.dtype])
    return model_points(config, problem, runs, steps, folder)


EXPERIMENT = Experiment(
    "finetune", "LM fine-tuning (encoders: LM-BFF few-shot; decoders: MeZO's tasks), tracking the Hessian trace.",
    SETTINGS, run, check=check, defaults_for=defaults_for, position=3, points=points)
