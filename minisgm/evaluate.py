"""Evaluate a trained run: ``python -m minisgm.evaluate --ckpt RUN_DIR --metric bpd|fid|digits_fd``.

``bpd``: bits/dim of held-out data under the probability-flow ODE (:func:`minisgm.likelihood.bits_per_dim`;
Song et al. 2021, sec. 4.3): the digits' test split (unseen with ``data.holdout``), CIFAR-10's test batch,
your own training images. ``fid``: FID of ``--n`` samples against the training set's Inception statistics
(:mod:`minisgm.fid`; cached in ``~/.cache/minisgm``). ``digits_fd``: the Frechet distance in a digit
classifier's features (:func:`minisgm.digit_features.digits_frechet_distance`) of ``--n`` samples to the
test digits, next to that of ``n`` real training digits (a perfect model's floor). ``bpd`` takes the ODE
solver's options (``--rtol``, ``--atol``, ``--hutchinson``), the sample-based metrics the sampler's
(``--sampler``, ``--steps`` and one sampler's options, e.g. ``--corrector`` for ``dpm_solver``); the other
kind is an error. Each result is printed as one line and appended to ``RUN_DIR/eval.jsonl``. Book:
:ref:`sec-scaling-up`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch

from .build import (SAMPLER_OPTIONS, SAMPLERS, _progress_bar, add_sampler_options, data_path, dataset_info, generate,
                    load_images, n_classes_of, open_run, sampler_options, score_fn_of, to_unit_range)
from .checkpoint import CheckpointError
from .config import ConfigError
from .samplers import NonFiniteSampleError

__all__ = ["evaluate_bpd", "evaluate_digits_fd", "evaluate_fid", "summary", "main"]

METRICS = ("bpd", "fid", "digits_fd")
Progress = Optional[Callable[[int], None]]


def evaluate_bpd(model, cfg, sde, n: int = 0, batch_size: int = 128, hutchinson: Optional[str] = None,
                 rtol: float = 1e-5, atol: float = 1e-5, seed: int = 0, device="cpu", progress: Progress = None) -> Dict[str, Any]:
    """Mean bits/dim (and its standard error) of ``n`` held-out images (0: all of them);
    ``progress(k)`` is called after each batch of ``k`` images."""
    from .likelihood import bits_per_dim

    if cfg.data.class_conditional:
        raise ValueError("bits/dim of a class-conditional run is not defined here (it needs p(x) = sum_y p(x|y) p(y))")
    info = dataset_info(cfg.data)
    if not info.images:
        raise ValueError(f"bits/dim needs image data, this run trained on {cfg.data.dataset!r}")
    try:  # images not trained on (digits, CIFAR-10); folders and .npz files have no test split
        images, _ = load_images(cfg.data, train=cfg.data.dataset in ("folder", "npz"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}\nGive this run's data with --data-path.") from None
    x_int = images[: n if n > 0 else None].long()
    # The model saw u in [0, 1] (centered: 2u - 1); bits_per_dim maps u -> scale u + shift.
    scale, shift = (2.0, -1.0) if cfg.data.centered else (1.0, 0.0)
    g = torch.Generator(device).manual_seed(seed)
    fn = score_fn_of(model)
    bpds, nfes = [], []
    for i in range(0, x_int.shape[0], batch_size):
        b, nfe = bits_per_dim(fn, sde, x_int[i : i + batch_size].to(device), info.levels, scale=scale,
                              shift=shift, generator=g, rtol=rtol, atol=atol, hutchinson=hutchinson)
        bpds.append(b.detach().cpu().double())
        nfes.append(nfe)
        if progress is not None:
            progress(b.numel())
    b = torch.cat(bpds)
    return {"metric": "bpd", "value": float(b.mean()), "stderr": float(b.std() / b.numel() ** 0.5) if b.numel() > 1 else 0.0,
            "n": int(b.numel()), "nfe_mean": float(np.mean(nfes)), "estimator": hutchinson or "exact",
            "test_seen_in_training": cfg.data.dataset in ("folder", "npz") or (cfg.data.dataset == "digits" and not cfg.data.holdout)}


def _samples01(model, cfg, sde, n: int, sampler: str, steps: int, batch_size: int, seed: int, device,
               progress: Progress = None, sampler_options: Optional[Dict[str, Any]] = None) -> torch.Tensor:
    k = n_classes_of(cfg.data)
    y = torch.arange(n, device=device) % k if k else None
    x, _ = generate(model, cfg, sde, n, sampler=sampler, n_steps=steps, generator=torch.Generator(device).manual_seed(seed),
                    y=y, device=device, batch_size=batch_size, progress=progress, **(sampler_options or {}))
    return to_unit_range(x, cfg.data).clamp(0, 1)


def evaluate_digits_fd(model, cfg, sde, n: int = 0, sampler: str = "em", steps: int = 200, batch_size: int = 0,
                       seed: int = 0, device="cpu", progress: Progress = None,
                       sampler_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Digit-classifier Frechet distance of ``n`` samples (0: as many as test digits) to the held-out digits,
    and ``real_data_floor``: the same distance for ``n`` real training digits. ``sampler_options``
    (e.g. ``{"corrector": True}`` for ``dpm_solver``) go to the sampler and into the result."""
    from .data import load_digits
    from .digit_features import digits_frechet_distance, digits_split

    if cfg.data.dataset != "digits":
        raise ValueError(f"digits_fd needs a run trained on digits, this one used {cfg.data.dataset!r}")
    images, _ = load_digits()
    train_idx, test_idx = digits_split()
    test = images[test_idx]
    n = n or test.shape[0]
    x = _samples01(model, cfg, sde, n, sampler, steps, batch_size, seed, device, progress, sampler_options).cpu()
    fd = digits_frechet_distance(x, test)
    # The same statistic for n real training digits: what a perfect sampler would score.
    perm = torch.randperm(train_idx.numel(), generator=torch.Generator().manual_seed(seed))[:n]
    floor = digits_frechet_distance(images[train_idx[perm]], test)
    return {"metric": "digits_fd", "value": fd, "real_data_floor": floor, "n": n, "n_test": int(test.shape[0]),
            "test_seen_in_training": not cfg.data.holdout, "sampler": sampler, "steps": steps,
            **_options_entry(sampler_options)}


def evaluate_fid(model, cfg, sde, n: int = 50_000, sampler: str = "em", steps: int = 1000, batch_size: int = 500,
                 seed: int = 0, device="cpu", ref_n: int = 0, progress: Progress = None,
                 sampler_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """FID of ``n`` samples against the Inception statistics of the training set (cached); ``sampler_options``
    as in :func:`evaluate_digits_fd`."""
    from .fid import fid_from_stats, inception_stats, load_inception, reference_stats_path

    if cfg.data.dataset not in ("cifar10", "folder", "npz") or dataset_info(cfg.data).shape[0] != 3:
        raise ValueError(f"fid is for RGB image runs (use digits_fd for digits); this run used {cfg.data.dataset!r}")
    path = str(Path(data_path(cfg.data)).expanduser().resolve())
    inception = load_inception(device)
    cache = reference_stats_path(f"{cfg.data.dataset}-train|{path}|{ref_n}")
    if cache.is_file():
        with np.load(cache) as z:
            ref = (z["mu"], z["cov"])
    else:
        images, _ = load_images(cfg.data, train=True)
        if ref_n > 0:
            images = images[:ref_n]
        ref = inception_stats(images, inception, batch_size=200)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, mu=ref[0], cov=ref[1])
    x = _samples01(model, cfg, sde, n, sampler, steps, batch_size, seed, device, progress, sampler_options)
    gen = inception_stats(x, inception, batch_size=200)
    return {"metric": "fid", "value": fid_from_stats(gen, ref), "n": n, "sampler": sampler, "steps": steps,
            "reference": str(cache), **_options_entry(sampler_options)}


def _options_entry(sampler_options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The sampler options as a result entry (none when there are none: older records stay alike)."""
    return {"sampler_options": dict(sampler_options)} if sampler_options else {}


def _sampler_text(res: Dict[str, Any]) -> str:
    extra = "".join(f", {k}={v}" for k, v in res.get("sampler_options", {}).items())
    return f"{res['sampler']} {res['steps']} steps{extra}"


def summary(res: Dict[str, Any]) -> str:
    """One readable line for a result of :func:`evaluate_bpd` / ``_digits_fd`` / ``_fid``."""
    seen = " (data seen in training)" if res.get("test_seen_in_training") else ""
    if res["metric"] == "bpd":
        return (f"bits/dim {res['value']:.3f} +- {res['stderr']:.3f} on {res['n']} held-out images{seen} "
                f"({res['estimator']} divergence, {res['nfe_mean']:.0f} NFE per image)")
    if res["metric"] == "digits_fd":
        return (f"digits Frechet distance {res['value']:.2f} ({res['n']} samples, {_sampler_text(res)}) "
                f"vs {res['real_data_floor']:.2f} for {res['n']} real digits{seen}")
    return f"FID {res['value']:.2f} ({res['n']} samples, {_sampler_text(res)})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m minisgm.evaluate``; exit code 2 for bad options, data or checkpoints."""
    p = argparse.ArgumentParser(prog="python -m minisgm.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="run folder or checkpoint file")
    p.add_argument("--metric", required=True, choices=METRICS)
    p.add_argument("--n", type=int, default=0, help="samples (fid, digits_fd) or test images (bpd); 0: metric default")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS), help="fid, digits_fd: default the run's sample.sampler")
    p.add_argument("--steps", type=int, default=None, help="fid, digits_fd: sampler steps (default: the run's sample.n_steps)")
    add_sampler_options(p)  # fid, digits_fd: --snr (pc), --corrector, --gaussian-std (dpm_solver), --eta, --churn
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--hutchinson", default=None, choices=["gaussian", "rademacher"], help="bpd: trace estimator (default: exact)")
    p.add_argument("--rtol", type=float, default=None, help="bpd: ODE solver tolerance (default 1e-5)")
    p.add_argument("--atol", type=float, default=None, help="bpd: ODE solver tolerance (default 1e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: automatic)")
    p.add_argument("--data-path", default=None, help="the run's data (CIFAR-10 archive, image folder, .npz), if moved")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.n < 0 or args.batch_size < 0 or args.threads < 0 or (args.steps is not None and args.steps < 1):
        p.error("--n, --batch-size and --threads must be >= 0, --steps >= 1")
    if not all(v is None or v > 0 for v in (args.rtol, args.atol)):
        p.error("--rtol and --atol must be positive")
    # Options of the other kind of metric are errors, not silently ignored.
    sampling, ode = ("sampler", "steps", *SAMPLER_OPTIONS), ("hutchinson", "rtol", "atol")
    wrong = [name for name in (sampling if args.metric == "bpd" else ode) if getattr(args, name.replace("-", "_")) is not None]
    if wrong:
        opts = ", ".join(f"--{name}" for name in wrong)
        p.error(f"{opts}: not an option of --metric {args.metric} (bpd integrates the probability-flow ODE: "
                "--rtol, --atol, --hutchinson; fid and digits_fd sample: --sampler, --steps and its options)")
    try:
        (model, cfg, sde, step), device = open_run(args)
    except (ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.data_path is not None:
        cfg.data.path = args.data_path
    sampler = args.sampler or cfg.sample.sampler
    steps = args.steps or cfg.sample.n_steps
    options = sampler_options(p, args, sampler)
    tolerances = {name: getattr(args, name) for name in ("rtol", "atol") if getattr(args, name) is not None}
    t0 = time.perf_counter()
    bar = None
    try:
        if args.metric == "bpd":
            bar = None if args.no_progress else _progress_bar(args.n or None, "bits/dim", "image")
            res = evaluate_bpd(model, cfg, sde, n=args.n, batch_size=args.batch_size or 128, hutchinson=args.hutchinson,
                               seed=args.seed, device=device, progress=_update(bar), **tolerances)
        else:
            n = args.n or (359 if args.metric == "digits_fd" else 50_000)
            bs = args.batch_size or (n if args.metric == "digits_fd" else 500)
            total = None if sampler == "ode" else -(-n // bs) * steps
            bar = None if args.no_progress else _progress_bar(total, f"{sampler} sampling")
            kw = dict(n=n, sampler=sampler, steps=steps, batch_size=bs, seed=args.seed, device=device, progress=_update(bar),
                      sampler_options=options)
            res = (evaluate_digits_fd if args.metric == "digits_fd" else evaluate_fid)(model, cfg, sde, **kw)
    except (ValueError, FileNotFoundError, NotADirectoryError, ConfigError, NonFiniteSampleError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if not isinstance(err, NonFiniteSampleError) else 3
    finally:
        if bar is not None:
            bar.close()
    res.update(step=step, ema=not args.no_ema, seconds=round(time.perf_counter() - t0, 2))
    run_dir = Path(args.ckpt) if Path(args.ckpt).is_dir() else Path(args.ckpt).parent
    with open(run_dir / "eval.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    print(f"{summary(res)}; step {step}, {'EMA' if not args.no_ema else 'raw'} weights, {res['seconds']:.0f} s")
    print(json.dumps(res))
    return 0


def _update(bar) -> Progress:
    return None if bar is None else bar.update


if __name__ == "__main__":
    raise SystemExit(main())
