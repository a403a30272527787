"""Data-parallel ZO under torchrun (gloo on CPU, nccl on CUDA), measured side by side in one run.

Runs the same ZO-SGD steps on one model and batch (MiniLM by default, SST-2 K=32: 64 examples in
micro-batches of --micro-batch) with 1 and with N processes, each process on --threads threads,
and prints the step time, the speed-up and scaling efficiency (speed-up / N), and the bytes each
rank all-reduced per step (engine/distributed.ProcessGroup counts the payload).

    python benchmarks/data_parallel.py [--nproc 2] [--threads 1] [--steps 5] [--model minilm]
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
        opt.step(problem, [(1, 0)], 1)  # warm-up
        group.bytes_sent = 0
        group.barrier()
        start = time.perf_counter()
        for step in range(args.steps):
            opt.step(problem, [(1, step + 1)], step + 2)
            group.any(False)  # the loop's per-step stop check
        group.barrier()
        elapsed = (time.perf_counter() - start) / args.steps
        if group.rank == 0:
            print(json.dumps({"step_s": elapsed, "bytes_per_step": group.bytes_sent / args.steps,
                              "params": problem.n_params, "examples": problem.splits["train"].size}))


def launch(nproc: int, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               __file__, "--child", "--model", args.model, "--steps", str(args.steps), "--device", args.device,
               "--micro-batch", str(args.micro_batch)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    one, many = launch(1, args), launch(args.nproc, args)
    speedup = one["step_s"] / many["step_s"]
    print(f"{args.model}: {one['params'] / 1e6:.1f}M parameters, {one['examples']} examples per step in micro-batches "
          f"of {args.micro_batch}, {args.threads} thread(s) per process, {args.device}")
    print(f"  1 process    {one['step_s'] * 1e3:8.1f} ms per ZO step")
    print(f"  {args.nproc} processes  {many['step_s'] * 1e3:8.1f} ms per ZO step   speed-up {speedup:.2f}x   "
          f"scaling efficiency {speedup / args.nproc:.0%}")
    print(f"  all-reduced per step and rank: {many['bytes_per_step']:.0f} bytes (two losses and the stop check, "
          f"float64)")


if __name__ == "__main__":
    main()
