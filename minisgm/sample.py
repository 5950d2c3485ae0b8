"""Draw samples from a trained run: ``python -m minisgm.sample --ckpt RUN_DIR --sampler pc --n 64``.

Writes the samples as ``.npz`` (``samples``: float32 ``[N, ...]`` in data space, images in
``[0, 1]``; ``labels`` for class-conditional runs; ``nfe``) and a PNG grid (a scatter plot for
2-D toy data) next to it. EMA weights are used unless ``--no-ema``.

The samplers themselves are the plain functions of :mod:`minisgm.samplers`; the table below,
from the command-line name to the function, is the only string dispatch in the package.
Book: :ref:`sec-samplers`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from . import samplers

__all__ = ["SAMPLERS", "generate", "grid_image", "save_grid", "save_scatter", "load_run", "main"]


def _em(score_fn, sde, shape, n_steps, generator, device, snr):
    return samplers.euler_maruyama_sample(score_fn, sde, shape, n_steps, generator=generator, device=device)


def _pc(score_fn, sde, shape, n_steps, generator, device, snr):
    return samplers.pc_sample(score_fn, sde, shape, n_steps, generator=generator, device=device, snr=snr)


def _ode(score_fn, sde, shape, n_steps, generator, device, snr):
    # Adaptive RK45: the step count is chosen by the solver (tolerances 1e-5, as in score-SDE).
    return samplers.ode_sample(score_fn, sde, shape, generator=generator, device=device)


def _heun(score_fn, sde, shape, n_steps, generator, device, snr):
    return samplers.heun_sample(score_fn, sde, shape, n_steps, generator=generator, device=device)


SAMPLERS: Dict[str, Callable[..., Tuple[Tensor, int]]] = {"em": _em, "pc": _pc, "ode": _ode, "heun": _heun}
"""Command-line sampler name -> call of the matching :mod:`minisgm.samplers` function."""


@torch.no_grad()
def generate(
    model: nn.Module,
    sde,
    sampler: str,
    shape: Sequence[int],
    n_steps: int,
    *,
    generator: Optional[torch.Generator] = None,
    y: Optional[Tensor] = None,
    device: torch.device | str | None = None,
    snr: float = 0.16,
    batch_size: int = 0,
    autocast: bool = False,
    return_nfe: bool = False,
):
    """Samples ``[N, ...]`` in the model's space, drawn in batches of ``batch_size`` (0: all at once).

    ``y`` (``[N]`` class labels) is passed to class-conditional models.
    """
    from .train import score_fn_of

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    shape = tuple(int(s) for s in shape)
    n = shape[0]
    bs = n if batch_size <= 0 else min(batch_size, n)
    was_training = model.training
    model.eval()
    out, nfe_total = [], 0
    try:
        for i in range(0, n, bs):
            yb = None if y is None else y[i : i + bs]
            fn = score_fn_of(model, yb, autocast)
            x, nfe = SAMPLERS[sampler](fn, sde, (min(bs, n - i), *shape[1:]), n_steps, generator, device, snr)
            out.append(x.float())
            nfe_total += nfe
    finally:
        model.train(was_training)
    x = torch.cat(out)
    return (x, nfe_total) if return_nfe else x


def grid_image(images: Tensor | np.ndarray, ncol: Optional[int] = None, pad: int = 0, scale: int = 0) -> np.ndarray:
    """Tile images ``[N, C, H, W]`` with values in ``[0, 1]`` into one ``[rows*H, cols*W, 3]`` uint8 array.

    ``scale`` repeats pixels (nearest neighbour) so small images stay visible; 0 picks
    ``max(1, 64 // H)``. ``pad`` is the white gap between images in output pixels (0: ``max(1, scale // 2)``).
    """
    x = images.detach().float().cpu().numpy() if torch.is_tensor(images) else np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [N, 1 or 3, H, W], got {list(x.shape)}")
    n, c, h, w = x.shape
    x = np.clip(np.nan_to_num(x), 0.0, 1.0)
    if c == 1:
        x = np.repeat(x, 3, axis=1)
    scale = scale or max(1, 64 // h)
    pad = pad or max(1, scale // 2)
    x = x.repeat(scale, axis=2).repeat(scale, axis=3)
    h, w = h * scale, w * scale
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    canvas = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, ncol)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = x[i].transpose(1, 2, 0)
    return (canvas * 255 + 0.5).astype(np.uint8)


def save_grid(images: Tensor | np.ndarray, path: str | Path, ncol: Optional[int] = None) -> Path:
    """Write images ``[N, C, H, W]`` in ``[0, 1]`` as one PNG grid."""
    import matplotlib.image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, grid_image(images, ncol))
    return path


def save_scatter(points: Tensor | np.ndarray, path: str | Path, lim: float = 0.0) -> Path:
    """Write 2-D points ``[N, 2]`` as a PNG scatter plot."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    p = points.detach().float().cpu().numpy() if torch.is_tensor(points) else np.asarray(points)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"points must have shape [N, 2], got {list(p.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.add_subplot()
    ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.5)
    lim = lim or float(np.nanpercentile(np.abs(p), 99.5)) * 1.1 or 1.0
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    fig.savefig(path)
    return path


def load_run(ckpt: str | Path, device: torch.device | str = "cpu", use_ema: bool = True):
    """Rebuild ``(model, config, sde, step)`` from a run folder or checkpoint file.

    The model is in eval mode on ``device`` with the EMA weights (or the raw ones).
    """
    from .checkpoint import load_checkpoint, load_state_dict_checked
    from .config import config_from_dict
    from .train import build_model, build_sde, example_shape, n_classes_of

    state = load_checkpoint(ckpt, map_location=device)
    cfg = config_from_dict(state["config"])
    model = build_model(cfg, example_shape(cfg.data), n_classes_of(cfg.data))
    load_state_dict_checked(model, state["ema" if use_ema else "model"], "EMA" if use_ema else "model")
    model.to(device).eval().requires_grad_(False)
    return model, cfg, build_sde(cfg.sde), int(state["step"])


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_run_for_cli(args: argparse.Namespace):
    """``(model, cfg, sde, step, device)`` from ``--ckpt``, ``--device``, ``--no-ema``; None after
    printing why the checkpoint cannot be used (the CLIs then exit with code 2)."""
    from .checkpoint import CheckpointError

    device = resolve_device(args.device)
    try:
        return (*load_run(args.ckpt, device, use_ema=not args.no_ema), device)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m minisgm.sample``."""
    p = argparse.ArgumentParser(prog="python -m minisgm.sample", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="run folder (uses its checkpoint.pt) or a checkpoint file")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS), help="default: the run's sample.sampler")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--steps", type=int, default=None, help="discretisation steps (default: the run's sample.n_steps; ignored by ode)")
    p.add_argument("--snr", type=float, default=None, help="PC corrector signal-to-noise ratio")
    p.add_argument("--batch-size", type=int, default=0, help="samples per sampler call (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="label", type=int, default=None, help="class label for conditional runs (default: cycle 0..9)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--out", default=None, help="output .npz (default RUN_DIR/samples.npz); the PNG goes next to it")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    loaded = load_run_for_cli(args)
    if loaded is None:
        return 2
    model, cfg, sde, step, device = loaded
    from .train import example_shape, n_classes_of

    sampler = args.sampler or cfg.sample.sampler
    n_steps = args.steps or cfg.sample.n_steps
    snr = cfg.sample.snr if args.snr is None else args.snr
    y = None
    k = n_classes_of(cfg.data)
    if cfg.data.class_conditional and k:
        if args.label is not None and not 0 <= args.label < k:
            p.error(f"--class must lie in 0..{k - 1}, got {args.label}")
        y = torch.full((args.n,), args.label, device=device) if args.label is not None else torch.arange(args.n, device=device) % k
    elif args.label is not None:
        p.error("--class needs a class-conditional run (data.class_conditional)")
    g = torch.Generator(device).manual_seed(args.seed)
    t0 = time.perf_counter()
    x, nfe = generate(model, sde, sampler, (args.n, *example_shape(cfg.data)), n_steps, generator=g, y=y,
                      device=device, snr=snr, batch_size=args.batch_size, return_nfe=True)
    seconds = time.perf_counter() - t0
    images = cfg.data.dataset in ("digits", "cifar10")
    if images:
        x = ((x + 1) / 2 if cfg.data.centered else x).clamp(0, 1)
    run_dir = Path(args.ckpt) if Path(args.ckpt).is_dir() else Path(args.ckpt).parent
    out = Path(args.out) if args.out else run_dir / "samples.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"samples": x.cpu().numpy().astype(np.float32), "nfe": np.int64(nfe), "step": np.int64(step)}
    if y is not None:
        arrays["labels"] = y.cpu().numpy()
    np.savez(out, **arrays)
    png = out.with_suffix(".png")
    if images:
        save_grid(x[:256], png)
    else:
        save_scatter(x, png)
    print(f"{args.n} samples ({sampler}, {nfe} score evaluations, {seconds:.1f} s) from step {step} -> {out}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
