"""ZO step cost, memory and generation throughput for `zoflat finetune` on decoder LMs, side by side.

For each causal LM (random ones built here: `tiny`, the GPT-2 layout of the tests, and `medium`,
hidden 256, 4 layers; or a real one by its --model name, e.g. `smollm2-135m`) on a batch of 16
examples of --task (MeZO's prompts), prints:
  time        one forward pass over the batch = 1.00x, then as multiples of it: zoflat's in-place
              ZO step (target <= 2.2x), a plain MeZO-style step (benchmarks/timing.py: seeded regeneration
              of z per parameter, perturb +λ, -2λ, +λ, update), a GD step (backward), one
              Hutchinson probe (a Hessian-vector product by double backward) and one forward-only
              fd probe (two forwards); the number of forward calls for the batch
  memory      peak memory of a fresh process doing only inference, only ZO steps, only GD steps,
              in float32 and bfloat16, full fine-tuning and LoRA (each in its own subprocess;
              target ZO <= 1.1x inference)
  generation  greedy decoding on 32 SQuAD prompts (8 new tokens), in examples per second

    python benchmarks/causal_zo_step.py [--repeats 5] [--models tiny,medium] [--device cuda]
    python benchmarks/causal_zo_step.py --models smollm2-135m --task sst2 --repeats 3
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from timing import gd_step, mezo_step, peak_memory_of_mode, timed  # benchmarks/timing.py (this folder is on sys.path)
from zoflat_cli.devices import DTYPES
from zoflat_cli.experiments import finetune
from zoflat_cli.measures.hessian import finite_difference, hutchinson
from zoflat_cli.models.tiny import save_tiny_causal
from zoflat_cli.optim.estimators import ESTIMATORS
from zoflat_cli.optim.inplace import InPlaceOptimizer
from zoflat_cli.optim.parameters import ParameterDirections
from zoflat_cli.optim.updates import UPDATES
from zoflat_cli.streams import generator, step_key

LAM, LR = 1e-3, 1e-6
RANDOM = {"tiny": (32, 2), "medium": (256, 4)}  # built here: (hidden, layers) of a GPT-2 layout
MEMORY = [(dtype, trainable) for dtype in ("float32", "bfloat16") for trainable in ("all", "lora")]


def load(model: str, device: torch.device, task: str = "rte", dtype: str = "float32", **extra):
    config = finetune.EXPERIMENT.resolve({"model": model, "task": task, "num_train": 16, "num_dev": 0,
                                          "num_eval": 32, "micro_batch": 16, "max_length": 256, **extra})
    return finetune.make_problem(config, device, DTYPES[dtype])


def zo_optimizer(problem):
    """zoflat's in-place two-point ZO-SGD, with the command's default step cache (--probe-cache)."""
    hyper = {"lr": LR, "lambda": LAM, "weight_decay": 0.0}
    directions = ParameterDirections(problem.params, module=problem.model,
                                     cache_mib=finetune.EXPERIMENT.settings["probe_cache"].default)
    return InPlaceOptimizer(directions, ESTIMATORS["two-point"], UPDATES["sgd"], hyper)


def child(model: str, mode: str, task: str, dtype: str, trainable: str, steps: int, device: torch.device):
    """One mode in a fresh process; prints its peak memory."""
    problem = load(model, device, task, dtype, trainable=trainable)
    print(json.dumps(peak_memory_of_mode(problem, zo_optimizer(problem), mode, steps, LR, device)))


def forward_calls(problem) -> int:
    calls = []
    hook = problem.hf_model.base_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        problem.loss()
    finally:
        hook.remove()
    return len(calls)


def measure(name: str, model: str, task: str, repeats: int, device: torch.device):
    problem = load(model, device, task)
    zo_sgd = zo_optimizer(problem)
    seeds = iter(range(10**6))
    forward = timed(problem.loss, repeats)
    costs = {
        "in-place ZO step": (timed(lambda: zo_sgd.step(problem, [(1, next(seeds))], 1), repeats), "target <= 2.2x"),
        "MeZO-style step": (timed(lambda: mezo_step(problem.params, problem.loss, next(seeds), LAM, LR), repeats),
                            "MeZO's Algorithm 1, benchmarks/timing.py"),
        "GD step": (timed(lambda: gd_step(problem, LR), repeats), "backward"),
        "Hutchinson probe": (timed(lambda: hutchinson(problem.params, problem.hvp, 1, generator(
            0, "probes", device, next(seeds))), repeats), "one Hessian-vector product"),
        "fd probe": (timed(lambda: finite_difference(
            ParameterDirections(problem.params, module=problem.model), lambda: problem.cross_entropy("train"),
            [(step_key(0, "probes", next(seeds), 0), 0)], 1e-3), repeats), "forward-only"),
    }
    rows = sum(len(b.ids) for b in problem.splits["train"].batches)
    tokens = sum(int(b.mask.sum()) for b in problem.splits["train"].batches)
    print(f"\n{name}: {problem.n_params / 1e6:.2f}M parameters, batch {problem.splits['train'].size} {task} examples "
          f"({rows} option rows, {tokens} tokens), "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}")
    print(f"  forward pass         {forward * 1e3:8.1f} ms   1.00x   ({forward_calls(problem)} forward call(s) "
          f"for the batch)")
    for label, (seconds, note) in costs.items():
        print(f"  {label:20s} {seconds * 1e3:8.1f} ms   {seconds / forward:.2f}x forward   ({note})")
    print(f"  peak memory (MiB)    {'inference':>10s} {'ZO':>8s} {'GD':>8s}   ZO / inference   GD / inference")
    for dtype, trainable in MEMORY:
        peaks = {}
        for mode in ("inference", "zo", "gd"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--model-path", model, "--task", task,
                                  "--dtype", dtype, "--trainable", trainable, "--device", device.type],
                                 capture_output=True, text=True, check=True).stdout
            peaks[mode] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
        print(f"  {dtype:8s} {trainable:4s}        {peaks['inference']:10.0f} {peaks['zo']:8.0f} {peaks['gd']:8.0f}   "
              f"{peaks['zo'] / peaks['inference']:14.2f}x {peaks['gd'] / peaks['inference']:15.2f}x")
    squad = load(model, device, "squad", train_pool="eval", max_new_tokens=8)
    squad.generate("test")  # warm-up
    start = time.perf_counter()
    answers = squad.generate("test")
    elapsed = time.perf_counter() - start
    print(f"  greedy generation    {len(answers) / elapsed:8.1f} examples/s   ({len(answers)} SQuAD prompts, "
          f"8 new tokens at most, micro-batch 16)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,medium", help="tiny, medium (random, built here) or --model names")
    parser.add_argument("--task", default="rte")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--trainable", default="all", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.child:
        child(args.model_path, args.child, args.task, args.dtype, args.trainable, steps=2, device=device)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = name
            if name in RANDOM:
                hidden, layers = RANDOM[name]
                model = save_tiny_causal(Path(tmp) / name, "gpt2", hidden=hidden, layers=layers)
            measure(name, model, args.task, args.repeats, device)


if __name__ == "__main__":
    main()
