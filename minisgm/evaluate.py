"""Evaluate a trained run: ``python -m minisgm.evaluate --ckpt RUN_DIR --metric bpd|fid|digits_fd``.

* ``bpd``: bits per dimension of held-out data under the probability-flow ODE likelihood
  (:func:`minisgm.likelihood.bits_per_dim`, uniform dequantisation; Song et al. 2021, sec. 4.3).
  Digits use the fixed test split of :func:`minisgm.digit_features.digits_split` (unseen in
  training with ``data.holdout``, the default), CIFAR-10 its test batch.
* ``fid``: FID of ``--n`` samples against Inception statistics of the training set
  (:mod:`minisgm.fid`; the statistics are computed once and cached in ``~/.cache/minisgm``).
* ``digits_fd``: the Frechet distance in the features of a small digit classifier
  (:func:`minisgm.digit_features.digits_frechet_distance`) between ``--n`` samples and the
  held-out test digits; also printed: the same distance between real training digits and the
  test digits (the floor a perfect model would reach with this ``n``).

Each result is printed and appended as one JSON line to ``RUN_DIR/eval.jsonl``.
Book: :ref:`sec-scaling-up`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

__all__ = ["evaluate_bpd", "evaluate_digits_fd", "evaluate_fid", "main"]

METRICS = ("bpd", "fid", "digits_fd")


def _require_data_path(cfg) -> None:
    if not cfg.data.path:
        raise ValueError("this run's config has no data.path (e.g. an imported checkpoint): "
                         "pass the CIFAR-10 archive or folder with --data-path")


def _load_cifar10(cfg, train: bool):
    """The run's CIFAR-10 split; a missing data set names ``--data-path`` as the way out."""
    from .data import load_cifar10

    _require_data_path(cfg)
    try:
        return load_cifar10(cfg.data.path, train=train)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}\nGive this run's CIFAR-10 data with --data-path.") from None


def _test_levels(cfg, n: int) -> tuple:
    """Held-out integer images ``[n, C, H, W]`` and the number of grey levels."""
    if cfg.data.dataset == "digits":
        from .data import load_digits
        from .digit_features import digits_split

        levels, _ = load_digits(return_int=True)
        test_idx = digits_split()[1]
        return levels[test_idx][:n], 17
    if cfg.data.dataset == "cifar10":
        images, _ = _load_cifar10(cfg, train=False)
        return images[:n].long(), 256
    raise ValueError(f"bits/dim needs an image data set (digits or cifar10), this run trained on {cfg.data.dataset!r}")


def evaluate_bpd(model, cfg, sde, n: int = 0, batch_size: int = 128, hutchinson: Optional[str] = None,
                 rtol: float = 1e-5, atol: float = 1e-5, seed: int = 0, device="cpu") -> Dict[str, Any]:
    """Mean bits/dim (and its standard error) of ``n`` held-out images (0: all of them)."""
    from .likelihood import bits_per_dim
    from .train import score_fn_of

    if cfg.data.class_conditional:
        raise ValueError("bits/dim of a class-conditional run is not defined here (it needs p(x) = sum_y p(x|y) p(y))")
    x_int, n_levels = _test_levels(cfg, n if n > 0 else 10**9)
    # The model saw u in [0, 1] (centered: 2u - 1); bits_per_dim maps u -> scale u + shift.
    scale, shift = (2.0, -1.0) if cfg.data.centered else (1.0, 0.0)
    g = torch.Generator(device).manual_seed(seed)
    fn = score_fn_of(model)
    bpds, nfes = [], []
    for i in range(0, x_int.shape[0], batch_size):
        b, nfe = bits_per_dim(fn, sde, x_int[i : i + batch_size].to(device), n_levels, scale=scale, shift=shift,
                              generator=g, eps=cfg.sde.eps, rtol=rtol, atol=atol, hutchinson=hutchinson)
        bpds.append(b.detach().cpu().double())
        nfes.append(nfe)
    b = torch.cat(bpds)
    return {"metric": "bpd", "value": float(b.mean()), "stderr": float(b.std() / max(1, b.numel()) ** 0.5) if b.numel() > 1 else 0.0,
            "n": int(b.numel()), "nfe_mean": float(np.mean(nfes)), "estimator": hutchinson or "exact",
            "test_seen_in_training": cfg.data.dataset == "digits" and not cfg.data.holdout}


def _samples01(model, cfg, sde, n: int, sampler: str, steps: int, batch_size: int, seed: int, device) -> torch.Tensor:
    from .sample import generate
    from .train import example_shape, n_classes_of

    g = torch.Generator(device).manual_seed(seed)
    k = n_classes_of(cfg.data)
    y = torch.arange(n, device=device) % k if k else None
    x = generate(model, sde, sampler, (n, *example_shape(cfg.data)), steps, generator=g, y=y, device=device,
                 snr=cfg.sample.snr, batch_size=batch_size)
    return ((x + 1) / 2 if cfg.data.centered else x).clamp(0, 1)


def evaluate_digits_fd(model, cfg, sde, n: int = 0, sampler: str = "em", steps: int = 200, batch_size: int = 0,
                       seed: int = 0, device="cpu") -> Dict[str, Any]:
    """Digit-classifier Frechet distance of ``n`` samples (0: as many as test digits) to the held-out digits.

    Also returns ``real_data_floor``: the same distance for ``n`` real training digits.
    """
    from .data import load_digits
    from .digit_features import digits_frechet_distance, digits_split

    if cfg.data.dataset != "digits":
        raise ValueError(f"digits_fd needs a run trained on digits, this one used {cfg.data.dataset!r}")
    images, _ = load_digits()
    train_idx, test_idx = digits_split()
    test = images[test_idx]
    n = n or test.shape[0]
    x = _samples01(model, cfg, sde, n, sampler, steps, batch_size, seed, device).cpu()
    fd = digits_frechet_distance(x, test)
    # The same statistic for n real training digits: what a perfect sampler would score.
    perm = torch.randperm(train_idx.numel(), generator=torch.Generator().manual_seed(seed))[:n]
    floor = digits_frechet_distance(images[train_idx[perm]], test)
    return {"metric": "digits_fd", "value": fd, "real_data_floor": floor, "n": n, "n_test": int(test.shape[0]),
            "test_seen_in_training": not cfg.data.holdout,
            "sampler": sampler, "steps": steps}


def evaluate_fid(model, cfg, sde, n: int = 50_000, sampler: str = "em", steps: int = 1000, batch_size: int = 500,
                 seed: int = 0, device="cpu", ref_n: int = 0) -> Dict[str, Any]:
    """FID of ``n`` samples against the Inception statistics of the training set (cached)."""
    from .fid import fid_from_stats, inception_stats, load_inception, reference_stats_path

    if cfg.data.dataset != "cifar10":
        raise ValueError(f"fid is for CIFAR-10 runs (use digits_fd for digits); this run used {cfg.data.dataset!r}")
    _require_data_path(cfg)
    inception = load_inception(device)
    path = str(Path(cfg.data.path).expanduser().resolve())
    cache = reference_stats_path(f"cifar10-train|{path}|{ref_n}")
    if cache.is_file():
        with np.load(cache) as z:
            ref = (z["mu"], z["cov"])
    else:
        images, _ = _load_cifar10(cfg, train=True)
        if ref_n > 0:
            images = images[:ref_n]
        ref = inception_stats(images, inception, batch_size=200)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, mu=ref[0], cov=ref[1])
    x = _samples01(model, cfg, sde, n, sampler, steps, batch_size, seed, device)
    gen = inception_stats(x, inception, batch_size=200)
    return {"metric": "fid", "value": fid_from_stats(gen, ref), "n": n, "sampler": sampler, "steps": steps,
            "reference": str(cache)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m minisgm.evaluate``."""
    from .sample import SAMPLERS, load_run_for_cli

    p = argparse.ArgumentParser(prog="python -m minisgm.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="run folder or checkpoint file")
    p.add_argument("--metric", required=True, choices=METRICS)
    p.add_argument("--n", type=int, default=0, help="samples (fid, digits_fd) or test images (bpd); 0: metric default")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS), help="default: the run's sample.sampler")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's sample.n_steps)")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--hutchinson", default=None, choices=["gaussian", "rademacher"], help="bpd: trace estimator (default: exact)")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-path", default=None, help="CIFAR-10 archive or folder (default: the run's data.path)")
    args = p.parse_args(argv)
    if args.n < 0:
        p.error(f"--n must be >= 0, got {args.n}")
    loaded = load_run_for_cli(args)
    if loaded is None:
        return 2
    model, cfg, sde, step, device = loaded
    if args.data_path is not None:
        cfg.data.path = args.data_path
    sampler = args.sampler or cfg.sample.sampler
    steps = args.steps or cfg.sample.n_steps
    t0 = time.perf_counter()
    try:
        if args.metric == "bpd":
            res = evaluate_bpd(model, cfg, sde, n=args.n, batch_size=args.batch_size or 128, hutchinson=args.hutchinson,
                               rtol=args.rtol, atol=args.atol, seed=args.seed, device=device)
        elif args.metric == "digits_fd":
            res = evaluate_digits_fd(model, cfg, sde, n=args.n, sampler=sampler, steps=steps,
                                     batch_size=args.batch_size, seed=args.seed, device=device)
        else:
            res = evaluate_fid(model, cfg, sde, n=args.n or 50_000, sampler=sampler, steps=steps,
                               batch_size=args.batch_size or 500, seed=args.seed, device=device)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    res.update(step=step, ema=not args.no_ema, seconds=round(time.perf_counter() - t0, 2))
    run_dir = Path(args.ckpt) if Path(args.ckpt).is_dir() else Path(args.ckpt).parent
    with open(run_dir / "eval.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
