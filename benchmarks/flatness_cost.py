"""What each flatness measure of `zoflat flatness` costs on a real model, side by side in one run.

On MiniLM (real weights) and the SST-2 K=16 training set (32 examples, full batch, the LM-claim
runs' setting), for each --trainable subspace prints: one forward pass, one gradient, one
Hessian-vector product, then each measure (measures/registry.py) with the given settings, as
wall time and in forward-pass equivalents; and the peak memory of a fresh process taking only
that measure, against one taking only forward passes (resident memory on the CPU, allocated on
CUDA).

    python benchmarks/flatness_cost.py [--model minilm] [--trainable lora,all] [--device cpu]
        [--probes 4 --hutchpp 12 --top-k 2 --slq-vectors 1 --slq-steps 12 --points 7]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from timing import timed  # benchmarks/timing.py (this folder is on sys.path)
from zoflat_cli.data.lmbff_tasks import TASKS, kshot
from zoflat_cli.engine.points import ModelSubject
from zoflat_cli.devices import DTYPES, peak_memory_mib
from zoflat_cli.experiments import finetune
from zoflat_cli.measures.registry import MEASURES, Settings
from zoflat_cli.measures.subject import rademacher
from zoflat_cli.models.tiny import save_tiny_roberta
from zoflat_cli.problems import encoder as lm


def load(model: str, trainable: str, device: torch.device):
    config = finetune.EXPERIMENT.resolve({"model": model, "k": 16, "trainable": trainable, "head": "auto"})
    train, _, _ = kshot(TASKS["sst2"], 16, 13)
    return lm.EncoderProblem(config, TASKS["sst2"], {"train": train.examples()}, device, DTYPES["float32"])


def take(subject, name: str, settings: Settings):
    return MEASURES[name].compute(subject, settings, lambda key: torch.Generator(subject.params[0].device)
                                  .manual_seed(len(key)), [p.detach() * 0.99 for p in subject.params])


def child(model: str, trainable: str, name: str, settings: Settings, device: torch.device):
    """One measure (or `inference`: forward passes) in a fresh process; prints its peak memory."""
    problem = load(model, trainable, device)
    subject = ModelSubject(problem)
    subject.loss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the high-water mark from here on
    if name == "inference":
        for _ in range(3):
            subject.loss()
    else:
        take(subject, name, settings)
    print(json.dumps({"peak_mib": peak_memory_mib(device)}))


def measure(model: str, trainable: str, settings: Settings, names: list, device: torch.device, argv: list):
    problem = load(model, trainable, device)
    subject = ModelSubject(problem)
    forward = timed(subject.loss, 3)
    gradient = timed(subject.gradient, 2)
    v = rademacher(subject.params, torch.Generator(device).manual_seed(0))
    hvp = timed(lambda: subject.hvp(v), 2)
    print(f"\n{Path(model).name}, trainable {trainable}: {problem.n_params / 1e6:.3f}M of {problem.n_total / 1e6:.1f}M "
          f"parameters, {problem.splits['train'].size} training examples, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}")
    print(f"  {'':28s} {'time':>10s} {'forward eq.':>12s}   {'peak memory':>12s} {'vs inference':>12s}")
    peaks = {n: peak(model, trainable, n, device, argv) for n in ["inference", *names]}
    base = peaks["inference"]
    print(f"  {'forward pass':28s} {forward:9.3f}s {1:12.1f}   {base:9.0f} MiB {1:11.2f}x")
    print(f"  {'gradient':28s} {gradient:9.3f}s {gradient / forward:12.1f}")
    print(f"  {'Hessian-vector product':28s} {hvp:9.3f}s {hvp / forward:12.1f}")
    for name in names:
        began = time.perf_counter()
        take(subject, name, settings)
        spent = time.perf_counter() - began
        print(f"  {name:28s} {spent:9.3f}s {spent / forward:12.1f}   {peaks[name]:9.0f} MiB {peaks[name] / base:11.2f}x"
              f"   ({MEASURES[name].cost})")


def peak(model: str, trainable: str, name: str, device: torch.device, argv: list) -> float:
    out = subprocess.run([sys.executable, __file__, *argv, "--child", name, "--model", model,
                          "--trainable", trainable], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="minilm, tiny (a random RoBERTa), or a model folder")
    parser.add_argument("--trainable", default="lora,all")
    parser.add_argument("--measures", default=",".join(MEASURES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    small = {"probes": 4, "hutchpp": 12, "top_k": 2, "slq_vectors": 1, "slq_steps": 12, "points": 7, "ascent_steps": 3}
    for key, value in small.items():
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=value)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    settings = Settings(**{k: getattr(args, k) for k in small}, trace_methods=("hutchinson", "hutchpp", "fd"))
    argv = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in small] + [f"--device={args.device}"]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model == "tiny":
            model = save_tiny_roberta(Path(tmp) / "tiny", hidden=64, layers=2, vocab_size=2000)
        if args.child:
            child(model, args.trainable, args.child, settings, device)
            return
        print(f"settings: {settings}")
        for trainable in args.trainable.split(","):
            measure(model, trainable, settings, args.measures.split(","), device, argv)


if __name__ == "__main__":
    main()
