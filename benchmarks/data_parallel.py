"""Data-parallel ZO under torchrun (gloo on CPU, nccl on CUDA), measured side by side in one run.

Runs the same ZO-SGD steps on one model and batch (MiniLM by default, SST-2 K=32: 64 examples in
micro-batches of --micro-batch) with 1 and with N processes, each process on --threads threads,
for each --samples n. When the step's 2n loss evaluations (two-point) are a multiple of N, the ranks
split them (each makes 2n/N on the whole batch, drawing only those probes' directions); else the
micro-batches are dealt to the ranks (each sums its share of every loss). Prints the step time, the speed-up and scaling efficiency (speed-up / N), and per step and
rank the bytes all-reduced and in how many calls (process_group.ProcessGroup counts them), beside
the model: 8 bytes per loss value (2n for two-point) plus 8 for the stop check; the batch split
makes one call per loss, the evaluation split one for all. Last, N independent single-process runs
at once: their speed against one alone is the machine's ceiling for N processes (memory bandwidth,
shared caches, other load), which no exchange between ranks can beat.

    python benchmarks/data_parallel.py [--nproc 2] [--threads 1] [--steps 5] [--model minilm] [--samples 1,2]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from finetune_zo_step import load, zo_optimizer  # benchmarks/ is on sys.path


def child(args):
    """One rank: the problem's micro-batches dealt to the ranks, timed ZO steps; rank 0 prints JSON."""
    from zoflat_cli.engine.distributed import group_for

    device = torch.device(args.device)
    with group_for(device) as group:
        problem = load(args.model, group.device, micro_batch=args.micro_batch)
        problem.group = group
        opt = zo_optimizer(problem)
        opt.step(problem, [(i, 0) for i in range(args.samples)], 1)  # warm-up
        group.bytes_sent = group.collectives = 0
        group.barrier()
        start = time.perf_counter()
        for step in range(args.steps):
            opt.step(problem, [(i, step + 1) for i in range(args.samples)], step + 2)
            group.any(False)  # the loop's per-step stop check
        group.barrier()
        elapsed = (time.perf_counter() - start) / args.steps
        if group.rank == 0:
            print(json.dumps({"step_s": elapsed, "bytes_per_step": group.bytes_sent / args.steps,
                              "calls_per_step": group.collectives / args.steps,
                              "params": problem.n_params, "examples": problem.splits["train"].size}))


def launch(nproc: int, args, copies: int = 1) -> dict:
    """A torchrun of nproc ranks; with copies > 1, that many independent ones at once (the machine's
    own slow-down when its cores all work: no rank waits on another there). Their mean step time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               __file__, "--child", "--model", args.model, "--steps", str(args.steps), "--device", args.device,
               "--micro-batch", str(args.micro_batch), "--samples", str(args.samples)]
    # --standalone: each on a free port of its own
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(copies)]
    results = []
    for proc in running:
        out, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(err[-2000:])
        results.append(json.loads(out.strip().splitlines()[-1]))
    return {**results[0], "step_s": sum(r["step_s"] for r in results) / copies}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--samples", default="1,2", help="directions per step to time (comma-separated)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.samples = int(args.samples)
        child(args)
        return
    print(f"{args.model}, {args.threads} thread(s) per process, {args.device}, micro-batches of {args.micro_batch}; "
          f"target: efficiency >= 90%")
    for samples in [int(n) for n in args.samples.split(",")]:
        args.samples = samples
        one, many = launch(1, args), launch(args.nproc, args)
        ceiling = one["step_s"] / launch(1, args, copies=args.nproc)["step_s"]
        speedup = one["step_s"] / many["step_s"]
        split = (2 * samples) % args.nproc == 0
        how = "evaluations split" if split else "micro-batches dealt"
        model = 16 * samples + 8
        print(f"  n={samples} ({how}): 1 process {one['step_s'] * 1e3:7.1f} ms | {args.nproc} processes "
              f"{many['step_s'] * 1e3:7.1f} ms | speed-up {speedup:.2f}x, efficiency {speedup / args.nproc:.0%} | "
              f"all-reduced per step and rank {many['bytes_per_step']:.0f} B in {many['calls_per_step']:.0f} calls "
              f"(model {model} B in {1 + (1 if split else 2 * samples)}) | {args.nproc} independent single processes at "
              f"once: {ceiling:.0%} of one's speed each (the machine's ceiling)", flush=True)
    print(f"  ({one['params'] / 1e6:.1f}M parameters, {one['examples']} examples per step)")


if __name__ == "__main__":
    main()
