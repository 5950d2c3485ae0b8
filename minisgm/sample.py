"""Draw samples from a trained run: ``python -m minisgm.sample --ckpt RUN_DIR --sampler pc --n 64``.

Writes the samples as ``.npz`` (``samples``: float32 ``[N, ...]`` in data space, images in
``[0, 1]``; ``labels`` for class-conditional runs; ``nfe``; ``step``) and a PNG grid (a scatter
plot for 2-D toy data) next to it. EMA weights are used unless ``--no-ema``. The sampler names
are those of :data:`minisgm.build.SAMPLERS`, each sampler's own options (``--snr``, ``--corrector``,
``--gaussian-std``, ``--eta``, ``--churn``) those of :data:`minisgm.build.SAMPLER_OPTIONS`. Book: :ref:`sec-samplers`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .build import (SAMPLERS, _progress_bar, add_sampler_options, dataset_info, generate, n_classes_of, open_run,
                    sampler_options, to_unit_range)
from .checkpoint import CheckpointError
from .images import save_grid, save_scatter
from .samplers import NonFiniteSampleError

__all__ = ["main", "output_paths"]


def output_paths(out: Optional[str], ckpt: str) -> Tuple[Path, Path]:
    """``(npz, png)`` paths: ``--out`` as given (``.npz`` added if it has no suffix; a folder gets
    ``samples.npz`` inside), or ``RUN_DIR/samples.npz``."""
    run_dir = Path(ckpt) if Path(ckpt).is_dir() else Path(ckpt).parent
    if out is None:
        npz = run_dir / "samples.npz"
    elif Path(out).is_dir() or out.endswith(("/", "\\")):
        npz = Path(out) / "samples.npz"
    else:
        npz = Path(out) if Path(out).suffix == ".npz" else Path(out + ".npz")
    return npz, npz.with_suffix(".png")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m minisgm.sample``; exit code 2 for bad options or checkpoints,
    3 for non-finite samples."""
    p = argparse.ArgumentParser(prog="python -m minisgm.sample", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="run folder (uses its checkpoint.pt) or a checkpoint file")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS), help="default: the run's sample.sampler")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's sample.n_steps; "
                   "for ode, a bound on the adaptive solver's steps; heun and edm evaluate the model twice per step)")
    add_sampler_options(p)  # --snr (pc), --corrector, --gaussian-std (dpm_solver), --eta (ddim), --churn (edm)
    p.add_argument("--batch-size", type=int, default=0, help="samples per sampler call (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="label", type=int, default=None, help="class label for conditional runs (default: cycle 0..K-1)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: automatic)")
    p.add_argument("--out", default=None, help="output .npz (default RUN_DIR/samples.npz); the PNG goes next to it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("n", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.batch_size < 0 or args.threads < 0:
        p.error("--batch-size and --threads must be >= 0")
    try:
        (model, cfg, sde, step), device = open_run(args)
    except (ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sampler = args.sampler or cfg.sample.sampler
    n_steps = args.steps or cfg.sample.n_steps
    k = n_classes_of(cfg.data)
    y = None
    if k:
        if args.label is not None and not 0 <= args.label < k:
            p.error(f"--class must lie in 0..{k - 1}, got {args.label}")
        y = torch.full((args.n,), args.label, device=device) if args.label is not None else torch.arange(args.n, device=device) % k
    elif args.label is not None:
        p.error("--class needs a class-conditional run (data.class_conditional)")
    options = sampler_options(p, args, sampler)
    bs = args.batch_size or args.n
    bar = None if args.no_progress or sampler == "ode" else _progress_bar(-(-args.n // bs) * n_steps, f"{sampler} sampling")
    t0 = time.perf_counter()
    try:
        x, nfe = generate(model, cfg, sde, args.n, sampler=sampler, n_steps=n_steps, generator=torch.Generator(device).manual_seed(args.seed),
                          y=y, device=device, batch_size=args.batch_size, progress=None if bar is None else bar.update, **options)
    except NonFiniteSampleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    images = dataset_info(cfg.data).images
    if images:
        x = to_unit_range(x, cfg.data).clamp(0, 1)
    npz, png = output_paths(args.out, args.ckpt)
    npz.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"samples": x.cpu().numpy().astype(np.float32), "nfe": np.int64(nfe), "step": np.int64(step)}
    if y is not None:
        arrays["labels"] = y.cpu().numpy()
    np.savez(npz, **arrays)
    title = f"{cfg.preset}, step {step}: {sampler}, {nfe // -(-args.n // bs)} NFE"
    if images:
        save_grid(x[:256], png, title=title)
    else:
        save_scatter(x, png, title=title)
    print(f"{args.n} samples from step {step} ({sampler}, {nfe} score evaluations, {seconds:.1f} s) -> {npz}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
