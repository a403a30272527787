"""ZO step cost, memory and generation throughput for `zoflat finetune` on decoder LMs, side by side.

For each random causal LM (the tiny GPT-2 layout of the tests, and a medium one: GPT-2 layout,
hidden 256, 4 layers) on a batch of 16 RTE examples (32 option rows, MeZO's prompts), prints:
  time        one forward pass over the batch, one in-place ZO step, as a ratio (target <= 2.2x);
              the number of forward calls for the batch (all options in one pass per micro-batch)
  memory      peak memory of a fresh process doing only inference, only ZO steps, only GD steps
              (each in its own subprocess; target ZO <= 1.1x inference)
  generation  greedy decoding on 32 SQuAD prompts (8 new tokens), in examples per second

    python benchmarks/causal_zo_step.py [--repeats 5] [--models tiny,medium] [--device cuda]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from timing import peak_memory_of_mode, timed  # benchmarks/timing.py (this folder is on sys.path)
from zoflat_cli.experiments import finetune
from zoflat_cli.optim.parameters import ParameterDirections
from zoflat_cli.optim.estimators import ESTIMATORS
from zoflat_cli.optim.inplace import InPlaceOptimizer
from zoflat_cli.optim.updates import UPDATES
from zoflat_cli.models.tiny import save_tiny_causal

LAM, LR = 1e-3, 1e-6


def load(model: str, device: torch.device, task: str = "rte", **extra):
    config = finetune.EXPERIMENT.resolve({"model": model, "task": task, "num_train": 16, "num_dev": 0,
                                          "num_eval": 32, "micro_batch": 16, "max_length": 256, **extra})
    return finetune.make_problem(config, device, torch.float32)


def zo_optimizer(problem):
    hyper = {"lr": LR, "lambda": LAM, "weight_decay": 0.0}
    return InPlaceOptimizer(ParameterDirections(problem.params, module=problem.model), ESTIMATORS["two-point"], UPDATES["sgd"], hyper)


def child(model: str, mode: str, steps: int, device: torch.device):
    """One mode in a fresh process; prints its peak memory."""
    problem = load(model, device)
    print(json.dumps(peak_memory_of_mode(problem, zo_optimizer(problem), mode, steps, LR, device)))


def forward_calls(problem) -> int:
    calls = []
    hook = problem.hf_model.base_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        problem.loss()
    finally:
        hook.remove()
    return len(calls)


def measure(name: str, model: str, repeats: int, device: torch.device):
    problem = load(model, device)
    zo_sgd = zo_optimizer(problem)
    forward = timed(problem.loss, repeats)
    zo = timed(lambda: zo_sgd.step(problem, [(1, 0)], 1), repeats)
    rows = sum(len(b.ids) for b in problem.splits["train"].batches)
    print(f"\n{name}: {problem.n_params / 1e6:.2f}M parameters, batch {problem.splits['train'].size} RTE examples "
          f"({rows} option rows), "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}")
    print(f"  forward pass         {forward * 1e3:8.1f} ms   1.00x   ({forward_calls(problem)} forward call(s) "
          f"for the batch)")
    print(f"  in-place ZO step     {zo * 1e3:8.1f} ms   {zo / forward:.2f}x forward   (target <= 2.2x)")
    peaks = {}
    for mode in ("inference", "zo", "gd"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--model-path", model, "--device",
                              device.type], capture_output=True, text=True, check=True).stdout
        peaks[mode] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    for mode in ("inference", "zo", "gd"):
        print(f"  peak memory, {mode:9s} {peaks[mode]:8.0f} MiB  {peaks[mode] / peaks['inference']:.2f}x inference")
    squad = load(model, device, "squad", train_pool="eval", max_new_tokens=8)
    squad.generate("test")  # warm-up
    start = time.perf_counter()
    answers = squad.generate("test")
    elapsed = time.perf_counter() - start
    print(f"  greedy generation    {len(answers) / elapsed:8.1f} examples/s   ({len(answers)} SQuAD prompts, "
          f"8 new tokens at most, micro-batch 16)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,medium")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.child:
        child(args.model_path, args.child, steps=3, device=device)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            hidden, layers = {"tiny": (32, 2), "medium": (256, 4)}[name]
            model = save_tiny_causal(Path(tmp) / name, "gpt2", hidden=hidden, layers=layers)
            measure(name, model, args.repeats, device)


if __name__ == "__main__":
    main()
