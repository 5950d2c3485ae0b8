"""Training throughput of the CIFAR-10 score networks (NCSN++ / DDPM++): images/s, memory, FLOP/s.

One training step is what ``python -m minisgm.train`` runs: the continuous-time DSM loss
(:func:`minisgm.score_matching.sde_loss`, Song et al. 2021 eq. 7) on a batch of 32x32 images,
backward, gradient clipping at norm 1, Adam (fused on CUDA) and an EMA update of the weights.
Images are random (no data set is read): throughput does not depend on pixel values.

Each preset is timed in three modes: fp32, bf16 autocast, and bf16 autocast with
``torch.compile`` (``--no-compile`` skips it; compiling takes minutes, on a CPU many).
FLOPs per image are counted once per preset with ``torch.utils.flop_counter.FlopCounterMode``
on the meta device (forward + backward of the network; convolutions, matmuls and attention;
normalisations and pointwise ops are not counted), so "TFLOP/s" is model FLOPs per second and
"% peak" compares it with the device's dense bf16 tensor-core peak. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident set size (RSS,
sampled during the timed steps) on CPU. Prints a markdown table.

    python benchmarks/train_throughput.py                      # all presets, cuda if available
    python benchmarks/train_throughput.py --device cpu --presets ncsnpp_small --batch-size 8 --steps 2
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

from minisgm.models import ncsnpp
from minisgm.models.ncsnpp import NCSNpp, NCSNppConfig, count_parameters
from minisgm.score_matching import sde_loss
from minisgm.sde import SDE, VESDE, VPSDE

PRESETS = ["ncsnpp_small", "ddpmpp_small", "ncsnpp_cifar10", "ddpmpp_cifar10",
           "ncsnpp_deep_cifar10", "ddpmpp_deep_cifar10"]
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


def sde_for(cfg: NCSNppConfig) -> SDE:
    # NCSN++ presets are the paper's VE models, DDPM++ ones its VP models.
    return VESDE(sigma_min=0.01, sigma_max=50.0) if cfg.scale_by_sigma else VPSDE(beta_min=0.1, beta_max=20.0)


def flops_per_image(cfg: NCSNppConfig) -> int:
    """Forward + backward FLOPs of one image, counted on the meta device (nothing is run)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = NCSNpp(cfg)
        x = torch.zeros(1, cfg.num_channels, cfg.image_size, cfg.image_size, requires_grad=True)
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


def make_step(cfg: NCSNppConfig, device: torch.device, mode: str, batch_size: int,
              channels_last: bool, seed: int = 0) -> Tuple[Callable[[], float], torch.Tensor]:
    """Build model, optimiser, EMA and a batch; return ``step() -> loss`` (one training step)."""
    torch.manual_seed(seed)
    sde = sde_for(cfg)
    model = NCSNpp(cfg, sde).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = list(model.parameters())  # all trainable (the Fourier frequencies are a buffer)
    ema_params = list(ema.parameters())
    opt = torch.optim.Adam(params, lr=2e-4, fused=True if device.type == "cuda" else None)
    net = torch.compile(model) if mode.endswith("+compile") else model
    use_autocast = mode.startswith("bf16")
    lo = 0.0 if not cfg.centered else -1.0
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.rand(batch_size, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g,
                    device=device) * (1.0 - lo) + lo).contiguous(memory_format=fmt)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            loss = sde_loss(net, sde, x, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # score_sde's grad_clip = 1
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - 0.9999)
        return loss.detach()

    return step, x


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(cfg: NCSNppConfig, device: torch.device, mode: str, batch_size: int, steps: int,
              warmup: int, channels_last: bool) -> Dict[str, float]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step, _ = make_step(cfg, device, mode, batch_size, channels_last)
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
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    return presets, modes, device


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
        print(f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN conv {torch.backends.cudnn.allow_tf32}")
    print("step = sde_loss forward + backward + clip_grad_norm + Adam"
          f"{' (fused)' if device.type == 'cuda' else ''} + EMA; FLOPs = network fwd+bwd (FlopCounterMode)")
    mem = "peak alloc (MiB)" if device.type == "cuda" else "peak RSS (MiB)"
    print()
    print(f"| preset | params (M) | mode | img/s | step (ms) | {mem} | GFLOP/img | TFLOP/s | % bf16 peak | warm-up (s) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for preset in presets:
        cfg = getattr(ncsnpp, preset)()
        with torch.device("meta"):
            n_params = count_parameters(NCSNpp(cfg))
        flops = flops_per_image(cfg)
        for mode in modes:
            try:
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
