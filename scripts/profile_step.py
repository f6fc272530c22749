"""Where a training step's time goes: torch.profiler over the workbench's own training loop.

    python scripts/profile_step.py --method batchensemble --ensemble-size 5 --device cpu
    python scripts/profile_step.py --method classic --batching repeat --device cuda --steps 100

Prints the operators that took the most time (self time on the CPU, or on the GPU for CUDA),
their share of the total, and how many operator calls (and, on CUDA, kernel launches) one step
makes. CIFAR-10-shaped synthetic data, the seed's MLP (3072-128-128-10) unless told otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_core.config import ModelConfig, TrainConfig
from bench_core.data import make_synthetic
from bench_core.devices import resolve_device, synchronize
from bench_core.models import build_model
from bench_core.training import steps_per_epoch, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["single", "classic", "batchensemble"], default="batchensemble")
    parser.add_argument("--classic-mode", choices=["vectorized", "sequential"], default="vectorized")
    parser.add_argument("--batching", choices=["repeat", "split"], default="repeat")
    parser.add_argument("--ensemble-size", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--shape", default="3x32x32", help="CxHxW of one example")
    parser.add_argument("--steps", type=int, default=50, help="profiled steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=15, help="operators to list")
    args = parser.parse_args()

    device = resolve_device(args.device)
    shape = tuple(int(v) for v in args.shape.split("x"))
    n_members = 1 if args.method == "single" else args.ensemble_size
    data = make_synthetic(args.steps * args.batch_size, 8, shape, 10, seed=0).to(device)
    torch.manual_seed(0)
    cfg = ModelConfig(hidden=args.hidden, ensemble_size=n_members, classic_mode=args.classic_mode)
    model = build_model(args.method, cfg, math.prod(shape), 10).to(device)
    train_cfg = TrainConfig(epochs=1, batch_size=args.batch_size, device=str(device))

    def epoch() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        for _ in train(model, data, train_cfg, method=args.method, batching=args.batching):
            pass
        synchronize(device)
        return time.perf_counter() - t0

    epoch()  # warm-up: allocator, optimizer state, kernels
    plain = epoch()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        epoch()
    batching = args.batching if args.method == "batchensemble" else "repeat"
    passes = n_members if args.method == "classic" and args.classic_mode == "sequential" else 1
    steps = steps_per_epoch(data.n_train, args.batch_size, n_members, batching) * passes
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, key) for e in events) or 1.0
    print(
        f"{args.method} ({args.classic_mode if args.method == 'classic' else args.batching}), E={n_members}, "
        f"batch {args.batch_size}, {device}: {plain / steps * 1e3:.3f} ms per step without the profiler"
    )
    print(f"{'operator':48s} {'share':>7s} {'ms/step':>9s} {'calls/step':>10s}")
    for e in sorted(events, key=lambda e: getattr(e, key), reverse=True)[: args.rows]:
        spent = getattr(e, key)
        print(f"{e.key[:48]:48s} {spent / total:7.1%} {spent / 1e3 / steps:9.3f} {e.count / steps:10.1f}")
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    line = f"aten operator calls per step: {ops / steps:.1f}"
    if device.type == "cuda":
        launch_calls = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel")
        launches = sum(e.count for e in events if e.key in launch_calls)
        line += f"; CUDA kernel launches per step: {launches / steps:.1f}"
    print(line)


if __name__ == "__main__":
    main()
