"""Train a score model: ``python -m minisgm.train [--preset NAME] [--train.lr 1e-4 ...]``.

One loop serves a 2-D toy, the 8x8 digits and CIFAR-10. Each optimizer step draws a global
batch, splits it into ``world_size x grad_accum`` shards (one per rank and micro-batch), and
minimises the continuous-time denoising score matching loss of Song et al. (2021), eq. (7),
:func:`minisgm.score_matching.sde_loss`, with Adam, linear warm-up, gradient clipping and an
exponential moving average (EMA) of the weights (Song et al. 2021, app. H).

Reproducibility: the data order and every noise draw of shard ``k`` at step ``s`` come from a
generator seeded with ``(seed, s, k)``, so a run is a function of its config; a run killed at
any moment and resumed from its last checkpoint ends with exactly the same weights (on CPU, or
on GPU with ``--train.deterministic``), and ``n`` ranks of ``torchrun`` compute the same
update as one process with ``grad_accum = n``. Book: :ref:`sec-scaling-up`.

Run folder (``runs/<preset>-<timestamp>`` unless ``--run-dir``)::

    config.json        the resolved config
    checkpoint.pt      the latest checkpoint (plus checkpoint-<step>.pt with keep_snapshots)
    metrics.jsonl      one JSON line per log interval: step, loss, lr, grad_norm, images_per_s
    samples/step-<step>.png   sample grids drawn with the EMA weights
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from . import sde as sde_lib
from .score_matching import sde_loss
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    get_rng_state,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
    set_rng_state,
)
from .config import (
    Config,
    ConfigError,
    ModelConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    describe,
    get_preset,
    parse_overrides,
    PRESETS,
    validate,
)

__all__ = [
    "build_sde",
    "build_model",
    "build_data",
    "example_shape",
    "n_classes_of",
    "score_fn_of",
    "lr_at",
    "ema_update",
    "Dist",
    "setup_distributed",
    "TrainingDiverged",
    "train",
    "main",
]

TOY_DATASETS = ("two_moons", "swiss_roll", "checkerboard", "rings", "spirals", "eight_gaussians")


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite."""


# ----------------------------------------------------------------------------------------------
# Building blocks from the config
# ----------------------------------------------------------------------------------------------
def build_sde(cfg) -> sde_lib.SDE:
    """The SDE object of ``cfg.sde`` (a :class:`~minisgm.config.SDEConfig`)."""
    if cfg.kind == "ve":
        return sde_lib.VESDE(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, exact_variance=cfg.exact_variance)
    if cfg.kind == "vp":
        return sde_lib.VPSDE(beta_min=cfg.beta_min, beta_max=cfg.beta_max)
    if cfg.kind == "subvp":
        return sde_lib.SubVPSDE(beta_min=cfg.beta_min, beta_max=cfg.beta_max)
    raise ConfigError(f"sde.kind must be ve, vp or subvp, got {cfg.kind!r}")


class Data:
    """A training set with a deterministic, resumable batch order.

    ``batch(step, shard, n_shards, batch_size, generator)`` returns shard ``shard`` of the global
    batch of optimizer step ``step`` (0-based). Finite data sets walk through one random
    permutation per epoch, the permutation of epoch ``e`` seeded by ``(seed, e)``; the global
    batch of step ``s`` covers positions ``s B ... s B + B - 1`` of that endless sequence.
    Toy data are drawn fresh from the shard's generator. Flips and dequantisation use the
    shard's generator as well, so everything depends only on ``(seed, step, shard)``.
    """

    def __init__(self, cfg, seed: int, device: torch.device):
        self.cfg, self.seed, self.device = cfg, seed, device
        self.images: Optional[Tensor] = None
        self.labels: Optional[Tensor] = None
        self.toy: Optional[Callable] = None
        self.levels = 0
        name = cfg.dataset
        if name == "digits":
            from .data import load_digits

            levels, labels = load_digits(return_int=True)
            if cfg.holdout:
                # The test digits stay unseen, so bits/dim and the digits FD of evaluate.py
                # measure generalisation (the split is the digit classifier's as well).
                from .digit_features import digits_split

                train_idx = digits_split()[0]
                levels, labels = levels[train_idx], labels[train_idx]
            self.images, self.levels = levels.to(torch.uint8), 17
            self.labels = labels
            self.n_classes = 10
        elif name == "cifar10":
            from .data import load_cifar10

            if not cfg.path:
                raise ConfigError("data.path must name the CIFAR-10 folder for dataset=cifar10 (e.g. --data.path data/cifar10)")
            images, labels = load_cifar10(cfg.path, train=True)
            self.images, self.labels, self.levels = images, torch.as_tensor(labels), 256
            self.n_classes = 10
        elif name in TOY_DATASETS:
            from . import data as data_mod

            self.toy = getattr(data_mod, name)
            self.n_classes = 0
        else:
            raise ConfigError(f"unknown data.dataset {name!r}; choose digits, cifar10 or one of {', '.join(TOY_DATASETS)}")
        if self.images is not None:
            self.images = self.images.to(device)
            self.labels = self.labels.to(device)
        self._perm_epoch, self._perm = -1, None

    @property
    def shape(self) -> Tuple[int, ...]:
        """Shape of one example."""
        return (2,) if self.toy is not None else tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return 0 if self.images is None else self.images.shape[0]

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0x5EED))
            self._perm = torch.randperm(len(self), generator=g).to(self.device)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int, batch_size: int) -> Tensor:
        """Dataset indices ``[batch_size]`` of the global batch of ``step``."""
        n = len(self)
        pos = step * batch_size + torch.arange(batch_size)
        epochs = pos // n
        out = torch.empty(batch_size, dtype=torch.long, device=self.device)
        for e in epochs.unique().tolist():
            mask = epochs == e
            out[mask.to(self.device)] = self._permutation(e)[(pos[mask] % n).to(self.device)]
        return out

    def to_model_scale(self, x01: Tensor) -> Tensor:
        """Images in ``[0, 1]`` -> model space (``[-1, 1]`` when ``centered``)."""
        return x01 * 2 - 1 if self.cfg.centered else x01

    def from_model_scale(self, x: Tensor) -> Tensor:
        """Model space -> images in ``[0, 1]`` (not clipped)."""
        return (x + 1) / 2 if self.cfg.centered else x

    def batch(self, step: int, shard: int, n_shards: int, batch_size: int, generator: torch.Generator) -> Tuple[Tensor, Optional[Tensor]]:
        """Shard ``shard`` of ``n_shards`` of step ``step``'s global batch: ``(x, y or None)``."""
        b = batch_size // n_shards
        if self.toy is not None:
            x = self.toy(b, generator=generator, device=self.device)
            return x.to(self.device, torch.float32), None
        idx = self.indices(step, batch_size)[shard * b : (shard + 1) * b]
        k = self.images[idx].to(torch.float32)
        if self.cfg.uniform_dequantization:
            u = torch.rand(k.shape, generator=generator, device=generator.device).to(self.device)
            x01 = (k + u) / self.levels
        else:
            x01 = k / (self.levels - 1)
        if self.cfg.random_flip:
            flip = torch.rand(b, generator=generator, device=generator.device).to(self.device) < 0.5
            x01 = torch.where(flip[:, None, None, None], x01.flip(-1), x01)
        y = self.labels[idx] if self.cfg.class_conditional else None
        return self.to_model_scale(x01), y


def example_shape(data_cfg) -> Tuple[int, ...]:
    """Shape of one training example of ``data_cfg`` (without loading the data)."""
    if data_cfg.dataset == "digits":
        return (1, 8, 8)
    if data_cfg.dataset == "cifar10":
        return (3, 32, 32)
    if data_cfg.dataset in TOY_DATASETS:
        return (2,)
    raise ConfigError(f"unknown data.dataset {data_cfg.dataset!r}; choose digits, cifar10 or one of {', '.join(TOY_DATASETS)}")


def n_classes_of(data_cfg) -> int:
    """Number of classes a conditional model needs (0 for unconditional runs and toy data)."""
    return 10 if data_cfg.class_conditional and data_cfg.dataset in ("digits", "cifar10") else 0


def build_data(cfg: Config, device: torch.device) -> Data:
    """The training data of ``cfg.data`` (loaded once, kept on ``device``)."""
    return Data(cfg.data, cfg.train.seed, device)


def build_model(cfg: Config, data_shape: Sequence[int], n_classes: int = 0) -> nn.Module:
    """The score network ``model(x, t[, y]) -> score`` of ``cfg.model``.

    The network's output is divided by the SDE's marginal std ``s(t)`` (it predicts ``-z`` or
    ``s(t)`` times the score; Song & Ermon 2020, technique 3), so the model is built with the SDE.
    For NCSN++ the data-dependent fields (``centered``, ``num_classes``, image size and channels)
    are taken from the data config.
    """
    m = cfg.model
    sde = build_sde(cfg.sde)
    marginal_std = lambda t: sde.marginal_coeffs(t)[1]  # noqa: E731
    num_classes = n_classes or None
    if isinstance(m, ModelConfig):
        from .models import ScoreMLP, SmallUNet

        if m.arch == "mlp":
            if len(data_shape) != 1:
                raise ConfigError(f"model.arch=mlp needs flat (toy) data, got examples of shape {list(data_shape)}")
            return ScoreMLP(dim=data_shape[0], hidden=m.hidden, n_layers=m.n_layers, embed_dim=m.embed_dim,
                            embedding=m.embedding, marginal_std=marginal_std, num_classes=num_classes)
        if len(data_shape) != 3:
            raise ConfigError(f"model.arch=unet needs images [C, H, W], got examples of shape {list(data_shape)}")
        return SmallUNet(
            in_channels=data_shape[0], base_channels=m.nf, channel_mults=tuple(m.ch_mult),
            num_res_blocks=m.num_res_blocks, embed_dim=m.embed_dim, num_classes=num_classes,
            dropout=m.dropout, marginal_std=marginal_std, attention=m.attention, embedding=m.embedding,
        )
    import dataclasses

    from .models.ncsnpp import NCSNpp

    if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
        raise ConfigError(f"NCSN++ needs square images [C, H, H], got examples of shape {list(data_shape)}")
    m = dataclasses.replace(m, centered=cfg.data.centered, num_classes=num_classes,
                            num_channels=data_shape[0], image_size=data_shape[1])
    return NCSNpp(m, sde)


def score_fn_of(model: nn.Module, y: Optional[Tensor] = None, autocast: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
    """``score_fn(x, t)`` of a model, with class labels ``y`` bound if given; float32 output."""
    device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        ctx = torch.autocast(device_type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            out = model(x, t) if y is None else model(x, t, y)
        return out.float()

    return score_fn


def lr_at(step: int, cfg) -> float:
    """Learning rate of optimizer step ``step`` (1-based): ``lr min(1, step / warmup)`` (score-SDE)."""
    if cfg.warmup > 0:
        return cfg.lr * min(1.0, step / cfg.warmup)
    return cfg.lr


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """``theta_ema <- rate theta_ema + (1 - rate) theta`` for every parameter (buffers are copied)."""
    ema_p = [p for p in ema.parameters()]
    p = [q.detach() for q in model.parameters()]
    torch._foreach_lerp_(ema_p, p, 1.0 - rate)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def _mix(*ints: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), so (seed, step, shard) seeds do not collide."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h ^= (int(v) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


# ----------------------------------------------------------------------------------------------
# Distributed plumbing
# ----------------------------------------------------------------------------------------------
@dataclass
class Dist:
    """Where this process sits: ``rank`` of ``world_size`` processes, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={pref!r} but CUDA is not available here; use --train.device cpu")
        return torch.device(pref if ":" in pref else f"cuda:{local_rank}")
    if pref == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {pref!r}")


def setup_distributed(device_pref: str = "auto") -> Dist:
    """Join the process group when launched by ``torchrun`` (env ``WORLD_SIZE > 1``).

    NCCL on GPUs, gloo on CPUs. Each rank uses ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(device_pref, local)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend)
    return Dist(rank, world, local, device)


def _all_reduce(t: Tensor, d: Dist, op: str = "sum") -> Tensor:
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def _broadcast_str(s: str, d: Dist) -> str:
    if not d.enabled:
        return s
    import torch.distributed as dist

    obj = [s]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


# ----------------------------------------------------------------------------------------------
# The run folder
# ----------------------------------------------------------------------------------------------
def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics lines written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    path.write_text("".join(l + "\n" for l in keep))


def _save_grid(model: nn.Module, sde, data: Data, cfg: Config, path: Path, device: torch.device) -> None:
    from .sample import generate, save_grid, save_scatter

    n = cfg.sample.n_samples
    g = torch.Generator(device).manual_seed(cfg.sample.seed)
    y = None
    if cfg.data.class_conditional and data.n_classes:
        y = torch.arange(n, device=device) % data.n_classes
    x = generate(model, sde, cfg.sample.sampler, (n, *data.shape), cfg.sample.n_steps, generator=g, y=y,
                 device=device, snr=cfg.sample.snr, autocast=cfg.train.mixed_precision and device.type == "cuda")
    if data.toy is not None:
        save_scatter(x, path)
    else:
        save_grid(data.from_model_scale(x).clamp(0, 1), path)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def train(
    cfg: Config,
    run_dir: Optional[os.PathLike] = None,
    resume: bool = True,
    progress: bool = True,
    dist_info: Optional[Dist] = None,
) -> Path:
    """Train ``cfg`` into ``run_dir`` (resuming from its ``checkpoint.pt`` if there is one).

    Returns the run folder. Raises :class:`TrainingDiverged` if the loss becomes NaN/inf (the
    last good checkpoint is kept) and :class:`~minisgm.checkpoint.CheckpointError` if an existing
    checkpoint is corrupt or does not fit the model.
    """
    validate(cfg)
    tc = cfg.train
    d = dist_info or setup_distributed(tc.device)
    device = d.device
    n_shards = d.world_size * tc.grad_accum
    if tc.batch_size % n_shards:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} must be divisible by world_size x grad_accum = "
            f"{d.world_size} x {tc.grad_accum} (every shard gets the same number of examples)"
        )
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Run folder: rank 0 names it, the others learn it (all ranks read a checkpoint on resume).
    if run_dir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = str(Path("runs") / f"{cfg.preset}-{stamp}")
    run_dir = Path(_broadcast_str(str(run_dir), d))
    ckpt_path = run_dir / CHECKPOINT_NAME

    # Same initialisation on every rank; the global RNGs are then re-seeded per rank (dropout).
    torch.manual_seed(tc.seed)
    sde = build_sde(cfg.sde)
    data = build_data(cfg, device)
    model = build_model(cfg, data.shape, n_classes_of(cfg.data)).to(device)
    if tc.channels_last and len(data.shape) == 3:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    torch.manual_seed(_mix(tc.seed, d.rank, 0xD0))
    np.random.seed(_mix(tc.seed, d.rank) % 2**32)
    random.seed(_mix(tc.seed, d.rank, 1))
    fused = tc.fused_adam and device.type == "cuda"
    opt = torch.optim.Adam(
        model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.adam_eps,
        weight_decay=tc.weight_decay, fused=fused or None,
    )
    # The generator that draws data order, time and noise; re-seeded at every shard from
    # (seed, step, shard). Its state is checkpointed with the other RNG states.
    gen = torch.Generator(device)

    step = 0
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        load_state_dict_checked(model, state["model"], "model")
        load_state_dict_checked(ema, state["ema"], "EMA")
        if "optimizer" not in state:
            raise CheckpointError(
                f"{ckpt_path} holds weights without an optimizer state (imported with minisgm.convert?): "
                "it can be sampled and evaluated, not resumed"
            )
        try:
            opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"the optimizer state in {ckpt_path} does not fit this model: {err}") from None
        step = int(state["step"])
        if "rng" in state:
            set_rng_state(state["rng"], {"data": gen})
        if d.is_main:
            print(f"Resuming {run_dir} from step {step}", flush=True)

    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
        _truncate_metrics(run_dir / "metrics.jsonl", step)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"Training {cfg.preset} ({n_params / 1e6:.2f}M parameters, {type(sde).__name__}) on {device}"
              f"{f' x {d.world_size} ranks' if d.enabled else ''} -> {run_dir}", flush=True)

    net: nn.Module = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        net = torch.compile(net)

    def checkpoint(step: int) -> None:
        state = {
            "step": step,
            "config": config_to_dict(cfg),
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "rng": get_rng_state({"data": gen}),
            "world_size": d.world_size,
        }
        save_checkpoint(state, ckpt_path)
        if tc.keep_snapshots:
            save_checkpoint(state, run_dir / f"checkpoint-{step:08d}.pt")

    params = [p for p in model.parameters() if p.requires_grad]
    autocast = tc.mixed_precision
    loss_sum = torch.zeros((), device=device)
    gnorm_sum = torch.zeros((), device=device)
    bad = torch.zeros((), device=device)  # 1 once a non-finite loss or gradient norm was seen
    n_logged, t_log = 0, time.perf_counter()
    last_good = step if ckpt_path.exists() else None
    start = step
    stop_at = tc.n_steps if tc.max_steps_per_run <= 0 else min(tc.n_steps, start + tc.max_steps_per_run)

    pbar = None
    if progress and d.is_main:
        from tqdm.auto import tqdm

        pbar = tqdm(total=tc.n_steps, initial=start, desc=cfg.preset, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

    def check_finite(at: int) -> None:
        flag = _all_reduce(bad.clone(), d, "max")
        if float(flag) > 0:
            where = f"{ckpt_path} (step {last_good})" if last_good is not None else "none was written"
            raise TrainingDiverged(
                f"the loss or gradient norm became NaN/inf before step {at}; stopped without saving. "
                f"Last good checkpoint: {where}. Lower --train.lr, or check the data."
            )

    model.train()
    while step < stop_at:
        step += 1
        lr = lr_at(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        for micro in range(tc.grad_accum):
            shard = d.rank * tc.grad_accum + micro
            gen.manual_seed(_mix(tc.seed, step, shard))
            x, y = data.batch(step - 1, shard, n_shards, tc.batch_size, gen)
            if tc.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            sync_ctx = net.no_sync() if (d.enabled and micro < tc.grad_accum - 1 and hasattr(net, "no_sync")) else contextlib.nullcontext()
            with sync_ctx:
                loss = sde_loss(score_fn_of(net, y, autocast), sde, x, eps=cfg.sde.eps,
                                likelihood_weighting=tc.likelihood_weighting, generator=gen)
                (loss / tc.grad_accum).backward()
            loss_sum += loss.detach() / tc.grad_accum
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        bad = torch.maximum(bad, (~torch.isfinite(loss_sum + gnorm)).float())
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, tc.ema_rate)
        gnorm_sum += gnorm.detach()
        n_logged += 1
        if pbar is not None:
            pbar.update(1)

        last = step == stop_at
        if step % tc.log_every == 0 or last:
            stats = _all_reduce(torch.stack([loss_sum, gnorm_sum]), d) / d.world_size
            check_finite(step)
            elapsed = time.perf_counter() - t_log
            rec = {
                "step": step,
                "loss": float(stats[0]) / n_logged,
                "lr": lr,
                "grad_norm": float(stats[1]) / n_logged,
                "images_per_s": n_logged * tc.batch_size / max(elapsed, 1e-9),
                "time": time.time(),
            }
            if d.is_main:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if pbar is not None:
                    pbar.set_postfix(loss=f"{rec['loss']:.4g}", lr=f"{lr:.2g}")
            loss_sum.zero_()
            gnorm_sum.zero_()
            n_logged, t_log = 0, time.perf_counter()
        if step % tc.ckpt_every == 0 or last:
            check_finite(step)
            if d.is_main:
                checkpoint(step)
            last_good = step
        if d.is_main and tc.sample_every > 0 and (step % tc.sample_every == 0 or step == tc.n_steps):
            _save_grid(ema, sde, data, cfg, run_dir / "samples" / f"step-{step:08d}.png", device)

    if pbar is not None:
        pbar.close()
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()
    return run_dir


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minisgm.train",
        allow_abbrev=False,
        description="Train a score-based generative model. Any config field can be overridden "
        "with --section.field VALUE (e.g. --train.lr 1e-4, --model.ch_mult 1,2,2, --train.compile).",
        epilog=f"Presets: {', '.join(PRESETS)}. Multi-GPU: torchrun --nproc_per_node N -m minisgm.train ...",
    )
    p.add_argument("--preset", default="digits_vp", help="named preset (default: digits_vp)")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/<preset>-<timestamp>); resumed if it holds a checkpoint")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved config (overrides still apply)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--help-config", action="store_true", help="list every config field of the preset and exit")
    return p


def resolve_config(argv: Sequence[str]) -> Tuple[Config, argparse.Namespace]:
    """Parse the command line into a config (exit code 2 with a message on any error)."""
    parser = _arg_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.resume is not None:
            cfg_path = Path(args.resume) / "config.json"
            if not cfg_path.is_file():
                parser.error(f"--resume {args.resume}: no config.json there (is it a run folder?)")
            cfg = config_from_dict(json.loads(cfg_path.read_text()))
            if args.run_dir is not None and Path(args.run_dir) != Path(args.resume):
                parser.error("--resume and --run-dir name different folders; give one")
            args.run_dir = args.resume
        else:
            cfg = get_preset(args.preset)
        if args.help_config:
            print(describe(cfg))
            raise SystemExit(0)
        apply_overrides(cfg, parse_overrides(cfg, rest))
    except ConfigError as err:
        parser.error(str(err))
    return cfg, args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m minisgm.train``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, args = resolve_config(argv)
    d = None
    try:
        d = setup_distributed(cfg.train.device)
        run_dir = train(cfg, args.run_dir, resume=True, progress=not args.no_progress, dist_info=d)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (TrainingDiverged, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        if d is not None and d.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if d.is_main:
        print(f"Run folder: {run_dir}")
        print(f"  config:      {run_dir / 'config.json'}")
        print(f"  checkpoint:  {run_dir / CHECKPOINT_NAME}")
        print(f"  metrics:     {run_dir / 'metrics.jsonl'}")
        print(f"  samples:     {run_dir / 'samples'}/")
        print(f"Sample: python -m minisgm.sample --ckpt {run_dir} --out {run_dir / 'samples.npz'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
