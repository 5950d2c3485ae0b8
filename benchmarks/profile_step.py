"""Where the time of one training step goes: the kernels of a profiled step, grouped.

The H200 run of ``train_throughput.py`` (``benchmarks/results/h200-2026-11-30``) reached 13.7 % of
the dense bf16 peak for DDPM++ with bf16 + ``torch.compile``, and bf16 without compilation was
barely faster than fp32. This script says why, for the next GPU session: it profiles a few
steps (``torch.profiler``, after warm-up and compilation) and prints the device time per step
split into matrix work (convolutions and GEMMs: cuDNN, cuBLAS, CUTLASS kernels), Triton kernels
(what ``torch.compile`` generated: fused normalisation and pointwise work), other kernels, and
the idle gaps between kernels (launch overhead, host work), then the 25 most expensive kernels.
Written after that session: its CUDA part has not run on a GPU yet (the CPU part has).

    python benchmarks/profile_step.py --preset cifar10_ddpmpp_vp --mode bf16+compile
    python benchmarks/profile_step.py --device cpu --preset cifar10_small --batch-size 2 --mode fp32
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from train_throughput import MODES, checked_device, make_step, sync

from minisgm.config import get_preset
from minisgm.train import backend_flags

MATRIX = re.compile(r"conv|gemm|cutlass|cudnn|sm\d\d_|xmma|implicit|wgrad|dgrad|matmul", re.I)


def group(name: str) -> str:
    if name.startswith("triton"):
        return "Triton (compiled fusions)"
    if MATRIX.search(name):
        return "matrix (conv / GEMM)"
    return "other kernels"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="cifar10_ddpmpp_vp")
    parser.add_argument("--mode", default="bf16+compile", choices=MODES)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch-size and --steps must be >= 1, --warmup >= 0")
    device = checked_device(parser, args.device)
    with backend_flags(False, device.type):
        step = make_step(get_preset(args.preset), device, args.mode, args.batch_size, channels_last=True)
        for _ in range(args.warmup):
            step()
        sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            sync(device)
    print(f"{args.preset}, {args.mode}, batch {args.batch_size}, {args.steps} profiled steps on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; torch {torch.__version__}")
    if device.type != "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = defaultdict(float)
    for e in kernels:
        busy[group(e.name)] += e.device_time  # microseconds
    start = min(e.time_range.start for e in kernels)
    end = max(e.time_range.end for e in kernels)
    span = (end - start) / args.steps
    total = sum(busy.values()) / args.steps
    print(f"\ndevice time per step: {span / 1e3:.1f} ms from first to last kernel, "
          f"{total / 1e3:.1f} ms in kernels ({len(kernels) / args.steps:.0f} kernels per step)")
    print("\n| group | ms per step | share of the step |\n| --- | ---: | ---: |")
    for name, t in sorted(busy.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {t / args.steps / 1e3:.2f} | {t / args.steps / span:.0%} |")
    print(f"| idle between kernels | {(span - total) / 1e3:.2f} | {(span - total) / span:.0%} |")
    per_name = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        per_name[e.name][0] += e.device_time
        per_name[e.name][1] += 1
    print("\n| kernel | group | ms per step | calls per step |\n| --- | --- | ---: | ---: |")
    for name, (t, n) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:25]:
        short = name if len(name) <= 90 else name[:87] + "..."
        print(f"| `{short}` | {group(name)} | {t / args.steps / 1e3:.3f} | {n / args.steps:g} |")


if __name__ == "__main__":
    main()
