"""ZO step cost and memory for `zoflat finetune`, side by side on the same model and batch.

For each model (MiniLM, a small random RoBERTa with an MLM head) on the SST-2 K=32 training set
(64 examples, full batch), prints:
  time    one forward pass, zoflat's ZO step (two probes formed on the fly + one update pass; with the
          command's default step cache, --probe-cache, and without it), a
          MeZO-style step (4 in-place passes, z regenerated with torch.manual_seed + torch.normal per
          tensor), as ratios to the forward pass; one Hutchinson / fd probe in forward equivalents;
          each update rule and direction law
  floor   per direction law: drawing the model's worth of numbers on the pass's threads (the floor),
          one update pass, and a probe's cost over a plain forward, each as a ratio to the floor
  memory  peak memory of a fresh process doing only inference, only ZO steps, only GD steps (SGD,
          backprop), for each --dtypes x --trainable (each in its own subprocess, so the high-water
          marks do not mix): resident memory on the CPU, allocated GPU memory on CUDA; then the
          largest model that fits a memory budget by the measured bytes per parameter
  methods each --methods preset (the 2024–26 methods beside ZO-SGD) at its default settings: step
          time / forward and / ZO-SGD (timed in turn), forwards per step, peak memory / inference
          (a fresh process each, the first --dtypes and --trainable), and the state it keeps

    python benchmarks/finetune_zo_step.py [--repeats 5] [--models minilm,roberta-small] [--device cuda]
        [--dtypes float32,bfloat16] [--trainable all,lora] [--methods zo,hizoo,lozo,...] [--micro-batch 16]
"""

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from timing import mezo_step, peak_memory_of_mode, timed  # benchmarks/timing.py (this folder is on sys.path)
from zoflat_cli.experiments import finetune
from zoflat_cli.devices import DTYPES
from zoflat_cli.measures.hessian import finite_difference, hutchinson
from zoflat_cli.optim.directions import LAWS
from zoflat_cli.optim.parameters import ParameterDirections
from zoflat_cli.optim.estimators import ESTIMATORS, n_evals
from zoflat_cli.optim.presets import HYPERPARAMETERS, PRESETS
from zoflat_cli.optim.inplace import InPlaceOptimizer
from zoflat_cli.optim.updates import UPDATES
from zoflat_cli.problems import encoder as lm
from zoflat_cli.models.tiny import save_tiny_roberta
from zoflat_cli.data.lmbff_tasks import TASKS, kshot

LAM, LR = 1e-3, 1e-6
CACHE_MIB = finetune.EXPERIMENT.settings["probe_cache"].default  # `zoflat finetune`'s --probe-cache


def load(model: str, device: torch.device, dtype: str = "float32", trainable: str = "all", micro_batch: int = 64):
    config = finetune.EXPERIMENT.resolve({"model": model, "k": 32, "micro_batch": micro_batch, "dtype": dtype,
                                          "trainable": trainable})
    train, _, _ = kshot(TASKS["sst2"], 32, 13)
    return lm.EncoderProblem(config, TASKS["sst2"], {"train": train.examples()}, device, DTYPES[dtype])


def zo_optimizer(problem, update="sgd", law="gaussian", cache_mib=CACHE_MIB):
    """zoflat's in-place two-point ZO with an update rule and a direction law (and the command's step cache)."""
    hyper = {"lr": LR, "lambda": LAM, "momentum": 0.9, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0}
    return InPlaceOptimizer(ParameterDirections(problem.params, law, problem.model, cache_mib=cache_mib),
                            ESTIMATORS["two-point"], UPDATES[update], hyper)


METHODS = "zo,hizoo,lozo,subzero,sparse-mezo,mezo-svrg,fzoo"
# what each keeps besides the weights (in place: the directions are regenerated from their keys)
STATE = {"zo": "nothing", "hizoo": "D: 1 number per parameter (float32)", "lozo": "V per matrix (b·r), from its key",
         "subzero": "U, V per matrix ((a+b)·r), from its key", "sparse-mezo": "1 threshold per tensor",
         "mezo-svrg": "the anchor x̄: 1 copy of the weights (g̃ regenerated from its key)", "fzoo": "nothing"}


def preset_optimizer(problem, preset: str):
    """A preset's in-place optimizer at its default settings (λ = LAM, lr = LR)."""
    p = PRESETS[preset]
    hyper = {"lr": LR, "lambda": LAM, **{h: HYPERPARAMETERS[h].default for h in
                                         ("rank", "period", "sparsity", "hessian_smooth", "weight_decay")}}
    directions = ParameterDirections(problem.params, p.law, problem.model, hyper["rank"], hyper["period"], CACHE_MIB)
    return InPlaceOptimizer(directions, ESTIMATORS[p.estimator], UPDATES[p.update], hyper)


def child(model: str, mode: str, steps: int, device: torch.device, dtype: str, trainable: str, method: str = "zo"):
    """One mode in a fresh process; prints its peak memory."""
    problem = load(model, device, dtype, trainable)
    print(json.dumps({**peak_memory_of_mode(problem, preset_optimizer(problem, method), mode, steps, LR, device,
                                            PRESETS[method].samples),
                      "params": problem.n_params, "total": problem.n_total}))


def methods(model: str, names: list, repeats: int, device: torch.device, dtype: str, trainable: str):
    """Each method's step against a forward pass and ZO-SGD's (timed in turn), and its peak memory."""
    problem = load(model, device, dtype, trainable)
    keys = itertools.count(1)  # steps from 1: MeZO-SVRG's anchor (every --period steps) comes in as in training
    optimizers = {name: preset_optimizer(problem, name) for name in names}
    for name, opt in optimizers.items():  # step 0: MeZO-SVRG sets its anchor
        opt.step(problem, [(i, 0) for i in range(PRESETS[name].samples)], 1)
    times = {name: [] for name in names}
    forward = []
    for _ in range(repeats):
        forward.append(timed(problem.loss, 1))
        for name, opt in optimizers.items():
            step = next(keys)
            times[name].append(timed(lambda: opt.step(problem, [(i, step) for i in range(PRESETS[name].samples)],
                                                      step + 1), 1))
    forward = statistics.median(forward)
    sgd = statistics.median(times["zo"]) if "zo" in times else None
    inference = peak(model, "inference", device, dtype, trainable, "zo")
    print(f"\n{model}: the methods at their defaults ({dtype}, trainable {trainable}, {problem.n_params / 1e6:.2f}M "
          f"trained; memory: fresh process each)")
    print("  method        step ms   / forward   / zo-sgd   forwards   peak / inference   state kept")
    for name in names:
        t = statistics.median(times[name])
        p = PRESETS[name]
        evals = n_evals(ESTIMATORS[p.estimator], p.samples)
        mem = peak(model, "zo", device, dtype, trainable, name) / inference
        print(f"  {name:12s} {t * 1e3:8.1f}   {t / forward:8.2f}x  " + (f"{t / sgd:8.2f}x" if sgd else "      - ")
              + f"   {evals:6d}{'*' if ESTIMATORS[p.estimator].anchored else ' '}   {mem:10.2f}x        {STATE[name]}")
    if "mezo-svrg" in names:
        print("  * MeZO-SVRG: 4 forwards on the batch between anchors; at an anchor (every --period steps) 2 on the "
              "whole training set")


def peak(model: str, mode: str, device, dtype: str, trainable: str, method: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--models", model, "--device", device.type,
                          "--dtypes", dtype, "--trainable", trainable, "--methods", method],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def measure(model: str, repeats: int, device: torch.device, micro_batch: int):
    problem = load(model, device, micro_batch=micro_batch)
    zo_sgd, uncached = zo_optimizer(problem), zo_optimizer(problem, cache_mib=0)
    steps = itertools.count(1)  # a new direction each step, as in training
    forward, zo, zo_uncached = [], [], []
    for _ in range(repeats):  # interleaved: the forward's time drifts on a busy machine
        forward.append(timed(problem.loss, 1))
        zo.append(timed(lambda: zo_sgd.step(problem, [(1, next(steps))], 1), 1))
        zo_uncached.append(timed(lambda: uncached.step(problem, [(1, next(steps))], 1), 1))
    forward, zo, zo_uncached = (statistics.median(t) for t in (forward, zo, zo_uncached))
    mezo = timed(lambda: mezo_step(problem.params, problem.loss, 1, LAM, LR), repeats)
    gen = torch.Generator(device).manual_seed(0)
    with problem.double_backward():
        hutch = timed(lambda: hutchinson(problem.params, problem.hvp, 1, gen), max(1, repeats // 2))
    fd = timed(lambda: finite_difference(zo_sgd.directions, problem.loss, [(3, 0)], 1e-3), max(1, repeats // 2))
    print(f"\n{model}: {problem.n_params / 1e6:.1f}M parameters, head {problem.head}, "
          f"batch {problem.splits['train'].size} examples in {len(problem.splits['train'].batches)} micro-batch(es), "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}")
    print(f"  forward pass              {forward * 1e3:8.1f} ms   1.00x")
    cache = min(CACHE_MIB, 4 * problem.n_params / 2**20)
    print(f"  zoflat ZO step            {zo * 1e3:8.1f} ms   {zo / forward:.2f}x forward   (target <= 2.0x; floor: 2 "
          f"forwards + 1 draw; step cache {cache:.0f} MiB)")
    print(f"    --probe-cache 0         {zo_uncached * 1e3:8.1f} ms   {zo_uncached / forward:.2f}x forward   (a draw "
          f"per probe per micro-batch and one for the update)")
    print(f"  MeZO-style step (4 pass.) {mezo * 1e3:8.1f} ms   {mezo / forward:.2f}x forward   "
          f"(zoflat / MeZO = {zo / mezo:.2f})")
    print(f"  Hutchinson, one probe     {hutch * 1e3:8.1f} ms   {hutch / forward:.1f} forward equivalents")
    print(f"  fd, one probe (+ f(x))    {fd * 1e3:8.1f} ms   {fd / forward:.1f} forward equivalents")
    rules(problem, repeats, zo)
    floor(problem, repeats)


def memory(model: str, device: torch.device, dtypes, trainables):
    """Peak memory per dtype x trainable x mode, each mode in a fresh process."""
    print(f"\n{model}: peak memory (fresh process per cell; {device.type}: "
          f"{'allocated' if device.type == 'cuda' else 'resident'})")
    print("  dtype     trainable   trained   inference       zo (ratio)            gd (ratio)")
    peaks_of = {}
    for dtype, trainable in itertools.product(dtypes, trainables):
        peaks = {}
        for mode in ("inference", "zo", "gd"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--models", model, "--device", device.type,
                                  "--dtypes", dtype, "--trainable", trainable, "--methods", "zo"],
                                 capture_output=True, text=True, check=True).stdout
            peaks[mode] = json.loads(out.strip().splitlines()[-1])
        inf = peaks["inference"]["peak_mib"]
        print(f"  {dtype:9s} {trainable:9s} {peaks['zo']['params'] / 1e6:7.2f}M  {inf:8.0f} MiB  "
              + "  ".join(f"{peaks[m]['peak_mib']:8.0f} MiB ({peaks[m]['peak_mib'] / inf:.2f}x)" for m in ("zo", "gd"))
              + "   (target zo <= 1.1x)")
        peaks_of[dtype, trainable] = peaks
    return peaks_of


def capacity(measured: dict, budget_gib: float = 80):
    """The largest model that fits a memory budget per mode, from the peak memory's growth per parameter
    between the two models measured (the slope: the libraries and the batch's activations cancel)."""
    (small, a), (large, b) = sorted(measured.items(), key=lambda kv: kv[1][next(iter(kv[1]))]["inference"]["total"])
    print(f"\nlargest model in {budget_gib:.0f} GiB, by the peak's growth per parameter from {small} to {large} "
          f"(trainable all; an estimate: activations at this batch size)")
    for cell in a:
        if cell[1] != "all" or cell not in b:
            continue
        row = []
        for mode in ("inference", "zo", "gd"):
            grown = (b[cell][mode]["peak_mib"] - a[cell][mode]["peak_mib"]) * 2**20
            per = max(grown / (b[cell][mode]["total"] - a[cell][mode]["total"]), DTYPE_BYTES[cell[0]])
            row.append(f"{mode} {per:5.1f} B/param -> {budget_gib * 2**30 / per / 1e9:6.1f}B")
        print(f"  {cell[0]:9s} " + "   ".join(row))


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def floor(problem, repeats: int):
    """A parameter pass against the floor: drawing the same numbers on the same threads. A probe's cost is
    the median difference of probed and plain forwards timed in turn (the forward is the noisy part)."""
    keys = itertools.count(10_000)
    for law in ("gaussian", "rademacher"):
        d = ParameterDirections(problem.params, law, problem.model)
        draw = timed(lambda: d.map_chunks(lambda i, key=(0, next(keys)): d.chunk(key, i)), repeats)
        one_pass = timed(lambda: d.add([((0, next(keys)), 0.0)]), repeats)

        def probe():
            with d.perturbed([((0, next(keys)), LAM)]):
                problem.loss()
        probe_cost = statistics.median(timed(probe, 1) - timed(problem.loss, 1) for _ in range(repeats))
        print(f"  {law:10s} draw {d.numel / 1e6:.1f}M numbers on {d.workers} threads {draw * 1e3:6.1f} ms (floor); "
              f"update pass {one_pass * 1e3:6.1f} ms = {one_pass / draw:.2f}x; probe over a forward "
              f"{probe_cost * 1e3:6.1f} ms = {probe_cost / draw:.2f}x   (target <= 1.3x)")


def rules(problem, repeats: int, sgd: float):
    """The in-place ZO step with each update rule and direction law, relative to SGD + Gaussian
    (timed side by side with it), and the cost of one parameter pass for each law."""
    keys = itertools.count(100)  # a new direction each step, as in training (the sphere's norm is per key)
    for update in UPDATES:
        if update != "sgd":
            opt = zo_optimizer(problem, update)
            t = timed(lambda: opt.step(problem, [(0, next(keys))], 1), repeats)
            print(f"  ZO step, update {update:12s} {t * 1e3:8.1f} ms   {100 * (t / sgd - 1):+.1f}% vs sgd")
    for law in LAWS:
        opt = zo_optimizer(problem, law=law)
        step = timed(lambda: opt.step(problem, [(0, next(keys))], 1), repeats)
        one_pass = timed(lambda: opt.directions.add([((0, next(keys)), 0.0)]), repeats)
        print(f"  ZO step, {law:10s} directions {step * 1e3:8.1f} ms   {100 * (step / sgd - 1):+.1f}% vs gaussian; "
              f"one parameter pass {one_pass * 1e3:.1f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,roberta-small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--trainable", default="all,lora")
    parser.add_argument("--methods", default=METHODS, help="presets for the methods table ('' : none)")
    parser.add_argument("--micro-batch", type=int, default=64, help="examples per forward call (64: one call)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        models = []
        for name in args.models.split(","):
            if name == "roberta-small":  # random weights, RoBERTa layout with an MLM head
                name = save_tiny_roberta(Path(tmp) / "roberta-small", hidden=256, layers=4, vocab_size=4000)
            models.append(name)
        if args.child:
            child(models[0], args.child, 3, device, args.dtypes, args.trainable, args.methods)
            return
        measured = {}
        for model in models:
            measure(model, args.repeats, device, args.micro_batch)
            measured[Path(model).name] = memory(model, device, args.dtypes.split(","), args.trainable.split(","))
            if args.methods:
                methods(model, args.methods.split(","), args.repeats, device, args.dtypes.split(",")[0],
                        args.trainable.split(",")[0])
        if len(measured) == 2:
            capacity(measured)


if __name__ == "__main__":
    main()
