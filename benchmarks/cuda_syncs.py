"""Host syncs per training step and per sampler step on CUDA, and the samplers' throughput.

A host sync is an operation that makes the CPU wait for the GPU (``.item()``, a device-to-host
copy, ``nonzero``, a Python ``if`` on a tensor): each one drains the GPU's queue of work. With
``torch.cuda.set_sync_debug_mode("warn")`` PyTorch warns at every such operation; this script
counts the warnings. A positive control (three ``.item()`` calls must count three) shows that
the count works on the machine at hand.

* training: :func:`minisgm.train.train_step` + :func:`minisgm.train.ema_update` (the step of
  ``python -m minisgm.train`` and ``benchmarks/train_throughput.py``), syncs per step after
  warm-up steps (Adam's lazy state, compilation);
* sampling: every sampler of ``minisgm.sample`` through :func:`minisgm.build.generate`, syncs
  per step = (syncs with ``2k`` steps - syncs with ``k`` steps) / k, so the checks before and after
  the loop cancel. ``ode`` (adaptive dopri5) reads its error estimate every step by design;
* throughput: images per second of DPM-Solver++ at 35 NFE and of 1000-step PC (reverse diffusion
  + one Langevin corrector step, 2000 NFE) in bf16 autocast and fp32, with random weights (speed
  does not depend on them). PC is timed over ``--pc-window`` of its 1000 steps (every step costs
  the same) and scaled to 1000.

    python benchmarks/cuda_syncs.py                                  # cuda, cifar10_ddpmpp_vp
    python benchmarks/cuda_syncs.py --device cpu --preset cifar10_small --batch-size 2 \\
        --sample-batch 2 --pc-window 2                               # runs; counts only on CUDA
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from typing import Callable, Iterator, List

import torch

from train_throughput import checked_device, make_step, sync

from minisgm.build import SAMPLERS, build_model, build_sde, generate
from minisgm.config import get_preset


class WindowDone(Exception):
    """Raised by the callback that ends a timed window of a long sampler."""


@contextlib.contextmanager
def counted_syncs(device: torch.device) -> Iterator[List[int]]:
    """``[n]``: the synchronizing CUDA operations inside the block (0 on CPU: nothing to count)."""
    box = [0]
    if device.type != "cuda":
        yield box
        return
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield box
        finally:
            torch.cuda.set_sync_debug_mode("default")
    box[0] = sum("synchroniz" in str(w.message) for w in seen)


def control(device: torch.device) -> int:
    x = torch.ones(3, device=device)
    with counted_syncs(device) as n:
        for i in range(3):
            x[i].item()
    return n[0]


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="cifar10_ddpmpp_vp")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch")
    parser.add_argument("--sample-batch", type=int, default=128)
    parser.add_argument("--pc-window", type=int, default=100, help="timed steps of the 1000-step PC sampler")
    args = parser.parse_args()
    if args.batch_size < 1 or args.sample_batch < 1 or not 1 <= args.pc_window <= 1000:
        parser.error("--batch-size and --sample-batch must be >= 1, 1 <= --pc-window <= 1000")
    device = checked_device(parser, args.device)
    cfg = get_preset(args.preset)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; preset {args.preset}")
    if device.type == "cuda":
        print(f"positive control: 3 .item() calls counted as {control(device)} syncs")
    else:
        print("(CPU: syncs are not counted; this run only checks that the script works)")

    print("\n| training step | syncs per step |\n| --- | ---: |")
    for mode in ("fp32", "bf16"):
        step = make_step(cfg, device, mode, args.batch_size, channels_last=True)
        for _ in range(2):
            step()
        sync(device)
        with counted_syncs(device) as n:
            for _ in range(5):
                step()
        print(f"| train_step + ema_update, {mode}, batch {args.batch_size} | {n[0] / 5:g} |", flush=True)
        del step

    sde = build_sde(cfg.sde)
    torch.manual_seed(0)
    model = build_model(cfg, sde).to(device).to(memory_format=torch.channels_last).eval()
    print("\n| sampler (generate, bf16) | syncs before + after the loop | syncs per step |\n| --- | ---: | ---: |")
    for sampler in SAMPLERS:
        counts = []
        for k in (4, 8):
            kw = dict(rtol=1e-2, atol=1e-2) if sampler == "ode" else {}
            with torch.no_grad(), counted_syncs(device) as n:
                generate(model, cfg, sde, 2, sampler=sampler, n_steps=k, device=device, autocast=True,
                         generator=torch.Generator(device=device).manual_seed(0), **kw)
            counts.append(n[0])
        if sampler == "ode":  # adaptive: n_steps does not set its steps
            print(f"| ode (adaptive dopri5) | {counts[0]} (whole solve) | - |", flush=True)
        else:
            per_step = (counts[1] - counts[0]) / 4
            print(f"| {sampler} | {counts[0] - 4 * per_step:g} | {per_step:g} |", flush=True)

    print(f"\n| sampler | NFE | precision | batch | img/s |\n| --- | ---: | --- | ---: | ---: |")
    for autocast in (True, False):
        prec = "bf16 autocast" if autocast else "fp32"
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            generate(model, cfg, sde, args.sample_batch, sampler="dpm_solver", n_steps=5, device=device,
                     autocast=autocast, generator=g)  # warm-up: cuDNN picks its kernels
            dt = timed(lambda: generate(model, cfg, sde, args.sample_batch, sampler="dpm_solver", n_steps=35,
                                        device=device, autocast=autocast, generator=g), device)
            print(f"| DPM-Solver++ (3M) | 35 | {prec} | {args.sample_batch} | {args.sample_batch / dt:.1f} |", flush=True)
            window = args.pc_window
            steps_done = [0]

            def stop_after_window(i, t, x):
                steps_done[0] += 1
                if steps_done[0] == window:
                    raise WindowDone

            def pc_window():
                try:
                    generate(model, cfg, sde, args.sample_batch, sampler="pc", n_steps=1000, device=device,
                             autocast=autocast, generator=g, callback=stop_after_window)
                except WindowDone:
                    pass

            dt = timed(pc_window, device) * 1000 / window
            print(f"| PC (reverse diffusion + Langevin), 1000 steps ({window} timed) | 2000 | {prec} | "
                  f"{args.sample_batch} | {args.sample_batch / dt:.2f} |", flush=True)


if __name__ == "__main__":
    main()
