"""Training throughput of the CIFAR-10 score networks (NCSN++ / DDPM++): images/s, memory, FLOP/s.

One training step is the one ``python -m minisgm.train`` runs, called from the package:
:func:`minisgm.train.train_step` (the continuous-time DSM loss of Song et al. 2021 eq. 7,
backward, gradient clipping, Adam, fused on CUDA) and :func:`minisgm.train.ema_update`, on the
model, SDE and optimizer that :mod:`minisgm.build` makes from the preset's config. Images are
random (no data set is read): throughput does not depend on pixel values.

Each preset is timed in three modes: fp32, bf16 autocast, and bf16 autocast with
``torch.compile`` (``--no-compile`` skips it; compiling takes minutes, on a CPU many).
FLOPs per image are counted once per preset with ``torch.utils.flop_counter.FlopCounterMode``
on the meta device (forward + backward of the network; convolutions, matmuls and attention;
normalisations and pointwise ops are not counted), so "TFLOP/s" is model FLOPs per second and
"% peak" compares it with the device's dense bf16 tensor-core peak. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident set size (RSS,
sampled during the timed steps) on CPU. Prints a markdown table.

    python benchmarks/train_throughput.py                      # all presets, cuda if available
    python benchmarks/train_throughput.py --device cpu --presets cifar10_small --batch-size 8 --steps 2
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from minisgm.build import build_model, build_sde, dataset_info, resolve_device
from minisgm.config import Config, get_preset
from minisgm.models.ncsnpp import count_parameters
from minisgm.train import backend_flags, build_optimizer, ema_update, lr_at, train_step

PRESETS = ["cifar10_small", "cifar10_ncsnpp_ve", "cifar10_ddpmpp_vp", "cifar10_ncsnpp_deep_ve", "cifar10_ddpmpp_deep_vp"]
MODES = ["fp32", "bf16", "bf16+compile"]

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets.
BF16_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
]


def bf16_peak_tflops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak of a known GPU, None on CPU or an unknown device."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS:
        if all(word in name for word in key.split()):
            return peak
    return None


def flops_per_image(cfg: Config) -> int:
    """Forward + backward FLOPs of one image through the preset's network, counted on the meta
    device (nothing is run)."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = dataset_info(cfg.data).shape
    with torch.device("meta"):
        model = build_model(cfg)
        x = torch.zeros(1, *shape, requires_grad=True)
        c_noise = torch.zeros(1)
    with FlopCounterMode(display=False) as counter:
        model.network(x, c_noise).sum().backward()
    return counter.get_total_flops()


class PeakRSS:
    """Peak resident set size of this process while the context is open (Linux /proc)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def make_step(cfg: Config, device: torch.device, mode: str, batch_size: int,
              channels_last: bool, seed: int = 0) -> Callable[[], torch.Tensor]:
    """Model, EMA, optimizer and a random batch from the preset's config; ``step() -> loss``.

    ``mode`` sets ``train.mixed_precision`` (bf16) and ``train.compile`` as ``minisgm.train``
    would; the step itself is :func:`minisgm.train.train_step` plus the EMA update.
    """
    cfg = copy.deepcopy(cfg)
    tc = cfg.train
    tc.mixed_precision, tc.compile = mode.startswith("bf16"), mode.endswith("+compile")
    torch.manual_seed(seed)
    sde = build_sde(cfg.sde)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(cfg, sde).to(device).to(memory_format=fmt)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = build_optimizer(tc, model, device)
    net = torch.compile(model) if tc.compile else model
    g = torch.Generator(device=device).manual_seed(seed)
    x01 = torch.rand(batch_size, *dataset_info(cfg.data).shape, generator=g, device=device)
    x = (2 * x01 - 1 if cfg.data.centered else x01).contiguous(memory_format=fmt)
    lr = lr_at(tc.warmup + 1, tc)

    def step() -> torch.Tensor:
        loss, _ = train_step(net, opt, sde, [(x, None, g)], tc, lr)
        ema_update(ema, model, tc.ema_rate)
        return loss

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(cfg: Config, device: torch.device, mode: str, batch_size: int, steps: int,
              warmup: int, channels_last: bool) -> Dict[str, float]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = make_step(cfg, device, mode, batch_size, channels_last)
    t0 = time.perf_counter()
    for _ in range(warmup):  # the first call compiles / autotunes / allocates
        loss = step()
    sync(device)
    warm_s = time.perf_counter() - t0
    rss = PeakRSS() if device.type == "cpu" else None
    if rss is not None:
        rss.__enter__()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    dt = time.perf_counter() - t0
    if rss is not None:
        rss.__exit__(None, None, None)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {float(loss)} in mode {mode}")
    return {"img_s": steps * batch_size / dt, "step_ms": 1e3 * dt / steps, "peak_mib": peak / 2**20,
            "warmup_s": warm_s}


def checked_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """``--device`` through :func:`minisgm.build.resolve_device`; ``parser.error`` on a bad one."""
    try:
        return resolve_device(name)
    except ValueError as err:
        parser.error(str(err))


def checked_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 valid_presets: List[str]) -> Tuple[List[str], List[str], torch.device]:
    """``(presets, modes, device)`` from the shared options; ``parser.error`` on bad values."""
    presets = [p for p in args.presets.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    for p in presets:
        if p not in valid_presets:
            parser.error(f"unknown preset {p!r}; choose from {list(valid_presets)}")
    for m in modes:
        if m not in MODES:
            parser.error(f"unknown mode {m!r}; choose from {MODES}")
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch-size and --steps must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    return presets, modes, checked_device(parser, args.device)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help=f"comma-separated, from {PRESETS}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {MODES}")
    parser.add_argument("--no-compile", action="store_true", help="skip the bf16+compile mode")
    parser.add_argument("--contiguous", action="store_true",
                        help="NCHW memory format (default: channels_last, as the trainer uses)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    presets, modes, device = checked_args(parser, args, PRESETS)
    modes = [m for m in modes if not (args.no_compile and "compile" in m)]
    peak = bf16_peak_tflops(device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch_size}; {args.steps} timed steps "
          f"after {args.warmup} warm-up; {'NCHW' if args.contiguous else 'channels_last'}; "
          f"dense bf16 peak: {f'{peak:g} TFLOP/s' if peak else 'n/a'}")
    if device.type == "cuda":
        print("as python -m minisgm.train runs (minisgm.train.backend_flags): TF32 matmul and cuDNN conv, "
              "cudnn.benchmark on")
    print("step = minisgm.train.train_step (sde_loss forward + backward + clip_grad_norm + Adam"
          f"{' (fused)' if device.type == 'cuda' else ''}) + ema_update; FLOPs = network fwd+bwd (FlopCounterMode)")
    mem = "peak alloc (MiB)" if device.type == "cuda" else "peak RSS (MiB)"
    print()
    print(f"| preset | params (M) | mode | img/s | step (ms) | {mem} | GFLOP/img | TFLOP/s | % bf16 peak | warm-up (s) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for preset in presets:
        cfg = get_preset(preset)
        with torch.device("meta"):
            n_params = count_parameters(build_model(cfg))
        flops = flops_per_image(cfg)
        for mode in modes:
            try:  # with the trainer's own backend settings (cuDNN autotuning, TF32 on CUDA)
                with backend_flags(False, device.type):
                    r = bench_one(cfg, device, mode, args.batch_size, args.steps, args.warmup, not args.contiguous)
            except torch.cuda.OutOfMemoryError:
                print(f"| {preset} | {n_params / 1e6:.1f} | {mode} | OOM | | | {flops / 1e9:.1f} | | | |", flush=True)
                continue
            tflops = flops * r["img_s"] / 1e12
            frac = f"{100 * tflops / peak:.1f}" if peak else "n/a"
            print(f"| {preset} | {n_params / 1e6:.1f} | {mode} | {r['img_s']:.1f} | {r['step_ms']:.1f} | "
                  f"{r['peak_mib']:.0f} | {flops / 1e9:.2f} | {tflops:.3f} | {frac} | {r['warmup_s']:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
