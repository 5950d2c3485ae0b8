"""Side by side: minisgm's NCSN++/DDPM++ training step against score_sde_pytorch's own.

The reference is the official PyTorch code of Song et al. (2021),
https://github.com/yang-song/score_sde_pytorch (Apache-2.0). Nothing of it is part of minisgm:
it is imported at run time from the checkout named by ``--ref`` (clone it yourself; these
scripts never download anything). Its side runs exactly what its ``run_lib.train`` runs per
step: the model from ``models.utils.create_model`` (wrapped in ``DataParallel`` as there), the
loss, Adam with warm-up and gradient clipping from ``losses.get_step_fn`` /
``losses.optimization_manager``, and its ``ExponentialMovingAverage``, all configured by its
own config files (``configs/ve/cifar10_ncsnpp_continuous.py`` and friends), in fp32 as it
trains. minisgm's side is the step of ``benchmarks/train_throughput.py`` (what
``python -m minisgm.train`` runs: ``sde_loss``, backward, clipping, Adam, EMA) in fp32, bf16
autocast and bf16 + ``torch.compile``, channels_last. Both draw random 32x32 batches.

Before timing, the script checks that the two networks are the same function: it prints both
parameter counts, both forward+backward FLOP counts per image (``FlopCounterMode``), and the
largest difference of the raw network outputs, relative to the largest output, after random
weights in the reference are copied into minisgm's network (:func:`minisgm.convert.convert_state_dict`;
float32 rounding gives about 1e-6, a 1 % change of one convolution about 1e-3).

The reference's up/down-sampling imports a CUDA extension (``op/``) that is compiled at
import (it needs nvcc and ninja). ``--op auto`` tries that and falls back to the reference's
own pure-PyTorch ``upfirdn2d_native`` (what it uses on CPU anyway); the table says which ran.
Its config files import ``ml_collections``; when that package is missing a small stand-in
(attribute namespaces) is used, which is all those files need.

    git clone https://github.com/yang-song/score_sde_pytorch ../score_sde_pytorch
    python benchmarks/vs_score_sde.py --ref ../score_sde_pytorch            # cuda if available
    python benchmarks/vs_score_sde.py --ref ../score_sde_pytorch --device cpu --batch-size 4 \\
        --steps 2 --warmup 1 --modes fp32 --presets ddpmpp_cifar10

The issue's goal: minisgm at least 2.5x the reference's training throughput at batch 128.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import MODES, bench_one, checked_args, flops_per_image, sync  # noqa: E402

from minisgm.config import get_preset  # noqa: E402
from minisgm.convert import convert_state_dict  # noqa: E402
from minisgm.models import ncsnpp  # noqa: E402
from minisgm.models.ncsnpp import NCSNpp, count_parameters  # noqa: E402

# minisgm preset -> the reference's config file (the paper's continuous-time CIFAR-10 models)
REFERENCE_CONFIGS = {
    "ncsnpp_cifar10": "configs/ve/cifar10_ncsnpp_continuous.py",
    "ddpmpp_cifar10": "configs/vp/cifar10_ddpmpp_continuous.py",
    "ncsnpp_deep_cifar10": "configs/ve/cifar10_ncsnpp_deep_continuous.py",
    "ddpmpp_deep_cifar10": "configs/vp/cifar10_ddpmpp_deep_continuous.py",
}
# model preset -> minisgm's training preset of the same model (whose train_step is timed)
CONFIG_PRESET = {
    "ncsnpp_cifar10": "cifar10_ncsnpp_ve",
    "ddpmpp_cifar10": "cifar10_ddpmpp_vp",
    "ncsnpp_deep_cifar10": "cifar10_ncsnpp_deep_ve",
    "ddpmpp_deep_cifar10": "cifar10_ddpmpp_deep_vp",
}


class ReferenceUnavailable(RuntimeError):
    """The reference checkout is missing or cannot be imported."""


def _ml_collections_stand_in() -> None:
    """Register a minimal ``ml_collections`` if the real one is not installed."""
    if importlib.util.find_spec("ml_collections") is not None:
        return
    mod = types.ModuleType("ml_collections")

    class ConfigDict(types.SimpleNamespace):
        """Attribute namespace: the reference's config files only set and read attributes."""

    mod.ConfigDict = ConfigDict
    sys.modules["ml_collections"] = mod


def _import_op(op_mode: str) -> str:
    """Import the reference's ``op`` package; returns "extension" or "native" (what will run)."""
    if op_mode in ("auto", "extension"):
        try:
            importlib.import_module("op")
            return "extension"
        except Exception as err:  # no nvcc/ninja, or no CUDA: the JIT build fails at import
            if op_mode == "extension":
                raise ReferenceUnavailable(f"the reference's CUDA extension (op/) did not build: {err}") from None
            for name in [m for m in sys.modules if m == "op" or m.startswith("op.")]:
                del sys.modules[name]
    # Native: skip the JIT build at import and send every call to the reference's own
    # pure-PyTorch upfirdn2d_native (its CPU path).
    import torch.utils.cpp_extension as cpp

    real_load = cpp.load
    cpp.load = lambda *a, **k: None
    try:
        op = importlib.import_module("op")
    finally:
        cpp.load = real_load
    native = sys.modules["op.upfirdn2d"].upfirdn2d_native

    def upfirdn2d(input, kernel, up=1, down=1, pad=(0, 0)):
        return native(input, kernel, up, up, down, down, pad[0], pad[1], pad[0], pad[1])

    op.upfirdn2d = upfirdn2d
    return "native"


def load_reference(ref: Path, op_mode: str) -> Tuple[Dict[str, types.ModuleType], str]:
    """Import the reference's modules from the checkout ``ref``."""
    if not (ref / "losses.py").is_file() or not (ref / "models" / "ncsnpp.py").is_file():
        raise ReferenceUnavailable(f"--ref {ref}: not a score_sde_pytorch checkout (no losses.py / models/ncsnpp.py)")
    sys.path.insert(0, str(ref))
    _ml_collections_stand_in()
    op_used = _import_op(op_mode)
    mods = {name: importlib.import_module(name) for name in
            ("sde_lib", "losses", "models.utils", "models.ncsnpp", "models.ema")}
    return mods, op_used


def reference_config(ref: Path, preset: str, device: torch.device):
    path = ref / REFERENCE_CONFIGS[preset]
    spec = importlib.util.spec_from_file_location(f"ref_config_{preset}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.device = device
    return config


def reference_sde(mods, config):
    """The SDE object ``run_lib.train`` builds from ``config.training.sde``."""
    m, name = config.model, config.training.sde.lower()
    if name == "vesde":
        return mods["sde_lib"].VESDE(sigma_min=m.sigma_min, sigma_max=m.sigma_max, N=m.num_scales)
    if name == "vpsde":
        return mods["sde_lib"].VPSDE(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales)
    return mods["sde_lib"].subVPSDE(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales)


def reference_step(mods, config, device: torch.device, batch_size: int, seed: int = 0) -> Tuple[Callable[[], torch.Tensor], torch.nn.Module]:
    """The reference's training step on a fixed random batch: ``step() -> loss``."""
    torch.manual_seed(seed)
    losses = mods["losses"]
    model = mods["models.utils"].create_model(config)
    ema = mods["models.ema"].ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
    optimizer = losses.get_optimizer(config, model.parameters())
    state = dict(optimizer=optimizer, model=model, ema=ema, step=0)
    step_fn = losses.get_step_fn(reference_sde(mods, config), train=True,
                                 optimize_fn=losses.optimization_manager(config),
                                 reduce_mean=config.training.reduce_mean,
                                 continuous=config.training.continuous,
                                 likelihood_weighting=config.training.likelihood_weighting)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.rand(batch_size, 3, 32, 32, generator=g, device=device)
    if config.data.centered:  # the reference's datasets.get_data_scaler
        x = x * 2.0 - 1.0

    def step() -> torch.Tensor:
        return step_fn(state, x).detach()

    return step, model


def reference_noise_label(config, batch: int, device: torch.device) -> torch.Tensor:
    """What the reference's continuous score_fn feeds the network: sigma (VE) or 999 t (VP)."""
    t = torch.full((batch,), 0.5, device=device)
    if config.training.sde.lower() == "vesde":
        return config.model.sigma_min * (config.model.sigma_max / config.model.sigma_min) ** t
    return t * 999


def reference_flops(model: torch.nn.Module, config, device: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, 32, 32, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        model(x, reference_noise_label(config, 1, device)).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@torch.no_grad()
def randomize_weights(ref_model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random weights everywhere, scaled by fan-in (1-D tensors: 1 + noise around their value).

    The published initialisation zeroes the last conv of every residual branch (init_scale =
    0), which would hide any difference inside those branches from a comparison.
    """
    for name, p in ref_model.named_parameters():
        r = torch.randn(p.shape, generator=generator).to(p.device)
        if p.dim() == 1:
            p.add_(0.1 * r)
        else:
            fan_in = p.shape[0] if name.endswith("W") else p[0].numel()  # NIN's W is [in, out]
            p.copy_(r / fan_in**0.5)


@torch.no_grad()
def output_difference(ref_model: torch.nn.Module, config, cfg, device: torch.device, batch: int = 4) -> float:
    """Max |F_ref - F_ours| / max |F_ref| of the raw networks with the reference's weights copied in."""
    model = NCSNpp(cfg).to(device).eval()
    ref_model = copy.deepcopy(ref_model).eval()
    g = torch.Generator().manual_seed(0)
    randomize_weights(ref_model, g)
    model.load_state_dict(convert_state_dict(ref_model.state_dict(), model))
    x = torch.rand(batch, 3, 32, 32, generator=g).to(device)
    if cfg.centered:
        x = 2 * x - 1
    label = reference_noise_label(config, batch, device)
    out_ref = ref_model(x, label)
    if cfg.scale_by_sigma:  # the reference divides by sigma inside; minisgm's network does not
        out_ref = out_ref * label.view(-1, 1, 1, 1)
        label = torch.log(label)
    out = model.network(x, label)
    return float((out - out_ref).abs().max() / out_ref.abs().max())


def time_steps(step: Callable[[], torch.Tensor], device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per step after ``warmup`` untimed steps."""
    for _ in range(warmup):
        loss = step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    if not torch.isfinite(loss):
        raise RuntimeError(f"the reference's loss is not finite: {float(loss)}")
    return (time.perf_counter() - t0) / steps


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, type=Path, help="a score_sde_pytorch checkout")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--presets", default="ncsnpp_cifar10,ddpmpp_cifar10",
                        help=f"comma-separated, from {list(REFERENCE_CONFIGS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"minisgm modes, from {MODES}")
    parser.add_argument("--op", default="auto", choices=["auto", "extension", "native"],
                        help="the reference's upfirdn2d: its CUDA extension or its native PyTorch path")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    presets, modes, device = checked_args(parser, args, list(REFERENCE_CONFIGS))
    try:
        mods, op_used = load_reference(args.ref.resolve(), args.op)
    except ReferenceUnavailable as err:
        parser.error(str(err))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch_size}; {args.steps} timed steps after "
          f"{args.warmup} warm-up; reference upfirdn2d: {op_used}")
    if device.type == "cuda":
        # The reference sets no TF32 flags; the trainer of minisgm enables TF32 for fp32 work.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        print("TF32 on for both sides; cudnn.benchmark on")
    print()
    print("| preset | params (M) ref / ours | GFLOP/img ref / ours | max output diff | ref fp32 img/s | "
          + " | ".join(f"ours {m} img/s" for m in modes) + " | best / ref |")
    print("| --- | --- | --- | ---: | ---: | " + " | ".join("---:" for _ in modes) + " | ---: |")
    for preset in presets:
        cfg = getattr(ncsnpp, preset)()
        config = reference_config(args.ref.resolve(), preset, device)
        step, ref_model = reference_step(mods, config, device, args.batch_size)
        ref_params = sum(p.numel() for p in ref_model.parameters())
        with torch.device("meta"):
            our_params = count_parameters(NCSNpp(cfg))
        ref_fl, our_fl = reference_flops(ref_model, config, device), flops_per_image(get_preset(CONFIG_PRESET[preset]))
        diff = output_difference(ref_model, config, cfg, device)
        ref_img_s = args.batch_size / time_steps(step, device, args.steps, args.warmup)
        del step, ref_model
        # minisgm's side: the training step of its own preset (minisgm.train.train_step)
        ours = [bench_one(get_preset(CONFIG_PRESET[preset]), device, m, args.batch_size, args.steps, args.warmup, True)["img_s"]
                for m in modes]
        print(f"| {preset} | {ref_params / 1e6:.2f} / {our_params / 1e6:.2f} | {ref_fl / 1e9:.2f} / {our_fl / 1e9:.2f} | "
              f"{diff:.1e} | {ref_img_s:.1f} | " + " | ".join(f"{v:.1f}" for v in ours) + f" | {max(ours) / ref_img_s:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
