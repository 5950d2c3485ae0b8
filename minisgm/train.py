"""Train a score model: ``python -m minisgm.train [--preset NAME] [--train.lr 1e-4 ...]``.

One loop for toys, digits, CIFAR-10 and your images: the DSM loss of Song et al. (2021), eq. (7)
(:func:`minisgm.score_matching.sde_loss`), Adam, warm-up, clipping, EMA (app. H). Shard ``k`` of
step ``s`` draws data and noise from a generator seeded by ``(seed, s, k)``: a resumed run ends with
the same weights (on GPU with ``--train.deterministic``), and ``n`` torchrun ranks make the update
of ``grad_accum = n``. The run folder (default ``runs/<preset>-<timestamp>``; one process at a time)
holds ``config.json``, ``checkpoint.pt`` (+ ``.prev.pt``), ``history.jsonl``, ``metrics.jsonl``,
``samples/``. Book: :ref:`sec-scaling-up`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .build import TrainingData, _mix, build_data, build_model, build_sde, configure_threads, generate, score_fn_of, to_unit_range
from .checkpoint import (CHECKPOINT_NAME, CheckpointError, RunFolderBusy, find_checkpoint, get_rng_state,
                         load_checkpoint, load_state_dict_checked, lock_run_folder, previous_checkpoint,
                         remove_stale_temporaries, save_checkpoint, set_rng_state)
from .config import (PRESETS, Config, ConfigError, _leaves, apply_overrides, config_from_dict, config_to_dict,
                     describe, get_preset, parse_overrides, validate)
from .images import save_grid, save_scatter
from .samplers import NonFiniteSampleError
from .score_matching import sde_loss

__all__ = ["lr_at", "ema_update", "build_optimizer", "train_step", "Dist", "setup_distributed",
           "TrainingDiverged", "TrainingStopped", "train", "resolve_config", "main"]


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite."""


class TrainingStopped(RuntimeError):
    """SIGINT or SIGTERM stopped the run at a step boundary, after a checkpoint (``signum``)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# ----- One optimizer step ---------------------------------------------------------------------
def lr_at(step: int, tc) -> float:
    """Learning rate of optimizer step ``step`` (1-based): ``lr min(1, step / warmup)`` (score-SDE)."""
    return tc.lr * min(1.0, step / tc.warmup) if tc.warmup > 0 else tc.lr


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """``theta_ema <- rate theta_ema + (1 - rate) theta`` for every parameter (buffers are copied)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - rate)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def build_optimizer(tc, model: nn.Module, device: torch.device) -> torch.optim.Adam:
    """Adam of ``cfg.train`` (fused on CUDA when ``fused_adam``)."""
    fused = tc.fused_adam and device.type == "cuda"
    return torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.adam_eps,
                            weight_decay=tc.weight_decay, fused=fused or None)


def train_step(net: nn.Module, opt: torch.optim.Optimizer, sde,
               micro_batches: Sequence[Tuple[Tensor, Optional[Tensor], torch.Generator]], tc, lr: float,
               eps: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """One optimizer step at rate ``lr`` over ``micro_batches`` (``(x, y or None, generator)`` each).

    Each micro-batch backpropagates its DSM loss / n (under DDP only the last one all-reduces);
    ``grad_clip <= 0`` disables clipping. Returns ``(mean loss, gradient norm before clipping)``
    as 0-d tensors: nothing is read back to the host.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    n = len(micro_batches)
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    for k, (x, y, gen) in enumerate(micro_batches):
        sync = contextlib.nullcontext() if k == n - 1 or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            loss = sde_loss(score_fn_of(net, y, tc.mixed_precision), sde, x, eps=eps, generator=gen,
                            likelihood_weighting=tc.likelihood_weighting, importance_sampling=tc.importance_sampling)
            (loss / n).backward()
        loss_sum += loss.detach() / n
    params = [p for group in opt.param_groups for p in group["params"]]
    gnorm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else math.inf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, gnorm.detach()


# ----- Distributed plumbing and stop signals --------------------------------------------------
@dataclass
class Dist:
    """Where this process sits: ``rank`` of ``world_size`` processes, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    flags: object = field(default=None, repr=False)  # a gloo group for host-side flags (stop signals)

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
        try:
            return torch.device(pref if ":" in pref else f"cuda:{local_rank}")
        except RuntimeError:
            raise ConfigError(f"train.device={pref!r} is not a device name (cuda or cuda:N)") from None
    if pref == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {pref!r}")


def setup_distributed(device_pref: str = "auto") -> Dist:
    """Join the process group when launched by ``torchrun`` (env ``WORLD_SIZE > 1``): NCCL on GPUs (rank
    on ``cuda:LOCAL_RANK``), gloo on CPUs, and a gloo group for stop flags that never waits for the GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(device_pref, local)
    flags = None
    if world > 1:
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        flags = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return Dist(rank, world, local, device, flags)


def _all_reduce(t: Tensor, d: Dist, op: str = "sum", group=None) -> Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return t


class StopSignals:
    """SIGINT and SIGTERM set a flag; the loop stops at the next step boundary, after a checkpoint.

    Under ``torchrun`` the ranks agree on the flag every step (a MAX all-reduce over a gloo group),
    so all stop after the same step. A second SIGINT stops at once (``KeyboardInterrupt``).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, d: Dist):
        self.d, self.signum, self._previous = d, 0, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self) -> int:
        """The signal number every rank agrees to stop for (0: none)."""
        if not self.d.enabled:
            return self.signum
        flag = _all_reduce(torch.tensor([self.signum]), self.d, "max", group=self.d.flags)
        return int(flag[0])  # a host tensor: no device sync


# ----- The run folder -------------------------------------------------------------------------
REFUSED_ON_RESUME = ("model.", "sde.", "data.", "train.seed")
"""Config keys a resumed run cannot change: its checkpoint would not mean the same thing
(``data.path`` may move, ``data`` may not otherwise change)."""


def config_changes(saved: Config, cfg: Config) -> Tuple[Dict[str, tuple], Dict[str, tuple]]:
    """``(refused, accepted)``: the keys whose values differ between ``saved`` and ``cfg``, as
    ``{key: (old, new)}``, split by :data:`REFUSED_ON_RESUME`."""
    old = {k: getattr(o, n) for k, o, n, _ in _leaves(saved)}
    new = {k: getattr(o, n) for k, o, n, _ in _leaves(cfg)}
    diff = {k: (old.get(k), new[k]) for k in new if old.get(k) != new[k] and k != "preset"}
    refused = {k: v for k, v in diff.items() if k.startswith(REFUSED_ON_RESUME) and k != "data.path"}
    return refused, {k: v for k, v in diff.items() if k not in refused}


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics lines written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line torn by a kill
    _write_text_atomic(path, "".join(line + "\n" for line in keep))


def _open_run_folder(run_dir: Path):
    """Create (or reuse) the run folder, take its lock, and remove stale temporary files."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a folder")
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    lock = lock_run_folder(run_dir)
    for p in remove_stale_temporaries(run_dir):
        print(f"Removed {p.name}, left by a process killed while writing", flush=True)
    return lock


# ----- The loop -------------------------------------------------------------------------------
@dataclass
class _State:
    """Everything the loop updates: model, EMA, optimizer, the data, and where the run stands."""

    cfg: Config
    d: Dist
    run_dir: Path
    sde: object
    data: TrainingData
    model: nn.Module
    ema: nn.Module
    opt: torch.optim.Optimizer
    net: nn.Module
    step: int = 0
    last_good: Optional[int] = None

    def checkpoint(self) -> None:
        """Rank 0 writes checkpoint.pt (and its config.json); every rank then knows it is good."""
        if self.d.is_main:
            state = {"step": self.step, "config": config_to_dict(self.cfg), "model": self.model.state_dict(),
                     "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(), "rng": get_rng_state(),
                     "world_size": self.d.world_size}
            path = save_checkpoint(state, self.run_dir / CHECKPOINT_NAME)
            _write_text_atomic(self.run_dir / "config.json", json.dumps(config_to_dict(self.cfg), indent=2) + "\n")
            if self.cfg.train.keep_snapshots:
                snapshot = self.run_dir / f"checkpoint-{self.step:08d}.pt"
                try:
                    os.link(path, snapshot)  # a second name for the same file: no copy
                except OSError:
                    shutil.copy2(path, snapshot)
        self.last_good = self.step


def _build_state(cfg: Config, d: Dist, run_dir: Path) -> _State:
    """Data, model (same initialisation on every rank), EMA, optimizer, and the wrapped network."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    sde = build_sde(cfg.sde)
    data = build_data(cfg, d.device)  # folder/npz: fills in the image size and classes
    validate(cfg)
    model = build_model(cfg, sde).to(d.device)
    if tc.channels_last and len(data.shape) == 3:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    torch.manual_seed(_mix(tc.seed, d.rank, 0xD0))  # the global generator drives dropout, per rank
    opt = build_optimizer(tc, model, d.device)
    net: nn.Module = model
    if d.enabled:
        device_ids = [d.device.index] if d.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if tc.compile:
        net = torch.compile(net)
    return _State(cfg, d, run_dir, sde, data, model, ema, opt, net)


def _restore(s: _State, saved: Dict) -> None:
    """Load weights, EMA, optimizer state and RNG states of a checkpoint into ``s``."""
    path = s.run_dir / CHECKPOINT_NAME
    load_state_dict_checked(s.model, saved["model"], "model")
    load_state_dict_checked(s.ema, saved.get("ema", saved["model"]), "EMA")
    if "optimizer" not in saved:
        raise CheckpointError(f"{path} holds weights without an optimizer state (imported with minisgm.convert?): "
                              "it can be sampled and evaluated, not resumed")
    try:
        s.opt.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"the optimizer state in {path} does not fit this model: {err}") from None
    if "rng" in saved:
        set_rng_state(saved["rng"])
    s.step = s.last_good = saved["step"]


def _resume_or_start(s: _State, resume: bool) -> None:
    """Resume from the run folder's checkpoint (refusing config changes that would make it
    meaningless, stating the others) or start; record either in history.jsonl."""
    d, run_dir, cfg = s.d, s.run_dir, s.cfg
    changes: Dict[str, tuple] = {}
    ckpt = run_dir / CHECKPOINT_NAME
    has_ckpt = resume and (ckpt.is_file() or previous_checkpoint(ckpt).is_file())
    if has_ckpt:
        saved = load_checkpoint(find_checkpoint(run_dir), map_location=d.device)
        try:
            saved_cfg = config_from_dict(saved["config"])
        except ConfigError as err:
            raise CheckpointError(f"the config inside {run_dir / CHECKPOINT_NAME} is invalid: {err}") from None
        refused, changes = config_changes(saved_cfg, cfg)
        if refused:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
            raise ConfigError(f"{run_dir} holds a checkpoint of another run ({listed}): resuming would continue its "
                              f"weights under a different {', '.join(sorted({k.split('.')[0] for k in refused}))}. "
                              "Choose a new --run-dir, or drop those options.")
        _restore(s, saved)
    if d.is_main:
        _truncate_metrics(run_dir / "metrics.jsonl", s.step)
        if not has_ckpt:
            _write_text_atomic(run_dir / "config.json", json.dumps(config_to_dict(cfg), indent=2) + "\n")
        _append_jsonl(run_dir / "history.jsonl", {
            "event": "resume" if has_ckpt else "start", "step": s.step, "time": time.time(),
            "changes": {k: list(v) for k, v in changes.items()}, "world_size": d.world_size})
        n_params = sum(p.numel() for p in s.model.parameters())
        if has_ckpt:
            print(f"Resuming {run_dir} from step {s.step}", flush=True)
            for k, (a, b) in changes.items():
                print(f"  changed on resume: --{k} {a!r} -> {b!r}", flush=True)
        print(f"Training {cfg.preset} ({n_params / 1e6:.2f}M parameters, {type(s.sde).__name__}) on {d.device}"
              f"{f' x {d.world_size} ranks' if d.enabled else ''} -> {run_dir}", flush=True)


def _save_grid(s: _State) -> None:
    """A grid (or scatter plot) of EMA samples, titled with the step it shows."""
    cfg, device = s.cfg, s.d.device
    n = cfg.sample.n_samples
    g = torch.Generator(device).manual_seed(cfg.sample.seed)
    k = s.data.info.n_classes if cfg.data.class_conditional else 0
    y = torch.arange(n, device=device) % k if k else None
    try:
        x, nfe = generate(s.ema, cfg, s.sde, n, generator=g, y=y, device=device,
                          autocast=cfg.train.mixed_precision and device.type == "cuda")
    except (NonFiniteSampleError, RuntimeError) as err:  # a sample grid never stops training
        print(f"\nnote: no sample grid at step {s.step}: {err}", file=sys.stderr, flush=True)
        return
    path = s.run_dir / "samples" / f"step-{s.step:08d}.png"
    title = f"{cfg.preset}, step {s.step} ({cfg.sample.sampler} sampler, {nfe} NFE)"
    if s.data.toy is not None:
        save_scatter(x, path, title=title)
    else:
        save_grid(to_unit_range(x, cfg.data).clamp(0, 1), path, title=title)


def _loop(s: _State, progress: bool, stop: StopSignals) -> None:
    """Optimizer steps until ``n_steps`` (or ``max_steps_per_run``) or a stop signal."""
    cfg, d, tc = s.cfg, s.d, s.cfg.train
    n_shards = d.world_size * tc.grad_accum
    gens = [torch.Generator(d.device) for _ in range(tc.grad_accum)]
    stop_at = tc.n_steps if tc.max_steps_per_run <= 0 else min(tc.n_steps, s.step + tc.max_steps_per_run)
    sums = torch.zeros(3, device=d.device)  # loss, grad norm, non-finite seen
    n_logged, t_log = 0, time.perf_counter()
    pbar = None
    if progress and d.is_main:
        from tqdm.auto import tqdm

        pbar = tqdm(total=tc.n_steps, initial=s.step, desc=cfg.preset, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    s.model.train()
    while s.step < stop_at:
        s.step += 1
        batches = []
        for micro, g in enumerate(gens):
            shard = d.rank * tc.grad_accum + micro
            g.manual_seed(_mix(tc.seed, s.step, shard))
            x, y = s.data.batch(s.step - 1, shard, n_shards, tc.batch_size, g)
            if tc.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            batches.append((x, y, g))
        loss, gnorm = train_step(s.net, s.opt, s.sde, batches, tc, lr_at(s.step, tc))
        ema_update(s.ema, s.model, tc.ema_rate)
        sums += torch.stack([loss, gnorm, (~torch.isfinite(loss + gnorm)).float()])
        n_logged += 1
        if pbar is not None:
            pbar.update(1)
        signum = stop.requested()
        last = s.step == stop_at or signum
        if s.step % tc.log_every == 0 or last:
            _log(s, sums, n_logged, time.perf_counter() - t_log, pbar)
            sums.zero_()
            n_logged, t_log = 0, time.perf_counter()
        if s.step % tc.ckpt_every == 0 or last:
            s.checkpoint()
        if d.is_main and tc.sample_every > 0 and not signum and (s.step % tc.sample_every == 0 or s.step == tc.n_steps):
            _save_grid(s)
        if signum:
            name = signal.Signals(signum).name
            raise TrainingStopped(f"stopped by {name} at step {s.step}; checkpoint saved: resume with "
                                  f"python -m minisgm.train --resume {s.run_dir}", signum)
    if pbar is not None:
        pbar.close()


def _log(s: _State, sums: Tensor, n_logged: int, elapsed: float, pbar) -> None:
    """Average the interval's loss and gradient norm over ranks, stop on NaN/inf, write a line."""
    d, tc = s.d, s.cfg.train
    stats = _all_reduce(sums.clone(), d) / d.world_size
    loss, gnorm, bad = (float(v) for v in stats)  # one host read per log interval
    if bad > 0:
        where = f"{s.run_dir / CHECKPOINT_NAME} (step {s.last_good})" if s.last_good is not None else "none was written"
        raise TrainingDiverged(f"the loss or gradient norm became NaN/inf before step {s.step}; stopped without saving. "
                               f"Last good checkpoint: {where}. Lower --train.lr, or check the data.")
    rec = {"step": s.step, "loss": loss / n_logged, "lr": lr_at(s.step, tc), "grad_norm": gnorm / n_logged,
           "images_per_s": n_logged * tc.batch_size / max(elapsed, 1e-9), "time": time.time()}
    if d.is_main:
        _append_jsonl(s.run_dir / "metrics.jsonl", rec)
        if pbar is not None:
            pbar.set_postfix(loss=f"{rec['loss']:.4g}", lr=f"{rec['lr']:.2g}")


def train(cfg: Config, run_dir: Optional[os.PathLike] = None, resume: bool = True, progress: bool = True,
          dist_info: Optional[Dist] = None, note: Optional[str] = None) -> Path:
    """Train ``cfg`` into ``run_dir`` (resuming from its ``checkpoint.pt`` if any); returns the folder.

    ``note`` is printed after the start banner (so that a config or data error stays one line).
    Raises :class:`TrainingDiverged` on NaN/inf (the last good checkpoint kept),
    :class:`TrainingStopped` after SIGINT/SIGTERM (with a checkpoint),
    :class:`~minisgm.checkpoint.RunFolderBusy`, :class:`~minisgm.config.ConfigError` (a config
    that does not fit the folder's checkpoint), :class:`~minisgm.checkpoint.CheckpointError`.
    """
    validate(cfg)
    tc = cfg.train
    d = dist_info or setup_distributed(tc.device)
    n_shards = d.world_size * tc.grad_accum
    if tc.batch_size % n_shards:
        raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by world_size x grad_accum = "
                          f"{d.world_size} x {tc.grad_accum} (every shard gets the same number of examples)")
    with backend_flags(tc.deterministic, d.device.type):
        return _train(cfg, d, run_dir, resume, progress, note)


@contextlib.contextmanager
def backend_flags(deterministic: bool, device_type: str) -> Iterator[None]:
    """PyTorch's process-wide numerics for a run, restored on exit.

    ``deterministic``: deterministic algorithms (and cuBLAS's fixed workspace), no cuDNN autotuning;
    else on CUDA: cuDNN autotuning and TF32 matrix products and convolutions. Restored so that a
    :func:`train` called from a notebook or a test leaves later code's float32 precision alone (on an
    H200, a colorization run after it missed its exact grey constraint under TF32 matrix products).
    """
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        elif device_type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved[2], saved[3]
        torch.set_float32_matmul_precision(saved[4])
        if saved[5] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[5]


def _train(cfg: Config, d: Dist, run_dir: Optional[os.PathLike], resume: bool, progress: bool,
           note: Optional[str]) -> Path:
    tc = cfg.train
    if run_dir is None:
        run_dir = str(Path("runs") / f"{cfg.preset}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    obj = [str(run_dir)]
    if d.enabled:  # all ranks use rank 0's folder (and timestamp)
        dist.broadcast_object_list(obj, src=0)
    run_dir = Path(obj[0])
    lock = _open_run_folder(run_dir) if d.is_main else None
    try:
        s = _build_state(cfg, d, run_dir)
        _resume_or_start(s, resume)
        if note and d.is_main:
            print(note, file=sys.stderr, flush=True)
        with StopSignals(d) as stop:
            outcome = {"event": "failed"}
            try:
                _loop(s, progress, stop)
                outcome = {"event": "finished" if s.step >= tc.n_steps else "paused"}
            except TrainingStopped as err:
                outcome = {"event": "stopped", "signal": signal.Signals(err.signum).name}
                raise
            except TrainingDiverged:
                outcome = {"event": "diverged"}
                raise
            finally:
                if d.is_main:
                    _append_jsonl(run_dir / "history.jsonl", {**outcome, "step": s.step, "time": time.time()})
        if d.enabled:
            dist.barrier()
    finally:
        if lock is not None:
            lock.close()
    return run_dir


# ----- Command line ---------------------------------------------------------------------------
def _arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minisgm.train",
        allow_abbrev=False,
        description="Train a score-based generative model. Any config field can be overridden "
        "with --section.field VALUE (e.g. --train.lr 1e-4, --model.ch_mult 1,2,2, --train.compile).",
        epilog=f"Presets: {', '.join(PRESETS)}. Multi-GPU: torchrun --nproc_per_node N -m minisgm.train ...",
    )
    p.add_argument("--preset", default=None, help="named preset (default: digits_vp)")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/<preset>-<timestamp>); resumed if it holds a checkpoint")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved config (overrides still apply)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--help-config", action="store_true", help="list every config field of the preset, with its help, and exit")
    return p


def _saved_config(run_dir: Path) -> Optional[Config]:
    """The config of the run in ``run_dir`` (its config.json), or None if there is none."""
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    try:
        return config_from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); restore it from the checkpoint's config "
                          "or choose a new --run-dir") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def resolve_config(argv: Sequence[str]) -> Tuple[Config, argparse.Namespace]:
    """Parse the command line into a config (exit code 2 with a one-line message on any error).

    A run folder with a checkpoint (``--resume R`` or ``--run-dir R``) keeps its saved config,
    changed only by the options given (:func:`train` refuses those of :data:`REFUSED_ON_RESUME`).
    """
    parser = _arg_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.resume is not None and _saved_config(Path(args.resume)) is None:
            raise ConfigError(f"--resume {args.resume}: no config.json there (is it a run folder?)")
        if args.resume is not None and args.run_dir is not None and Path(args.run_dir) != Path(args.resume):
            raise ConfigError("--resume and --run-dir name different folders; give one")
        folder = args.resume or args.run_dir
        cfg = _saved_config(Path(folder)) if folder else None
        if cfg is not None and args.preset is not None and args.preset != cfg.preset:
            raise ConfigError(f"{folder} holds a run of preset {cfg.preset}; --preset {args.preset} cannot change it "
                              "(choose a new --run-dir for a new run)")
        if cfg is None:
            cfg = get_preset(args.preset or "digits_vp")
        args.run_dir = folder
        if args.help_config:
            print(describe(cfg))
            raise SystemExit(0)
        apply_overrides(cfg, parse_overrides(cfg, rest))
    except ConfigError as err:
        parser.error(str(err))
    return cfg, args


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m minisgm.train``; returns the exit code.

    Exit codes: 0 done (or paused by ``max_steps_per_run``), 2 a bad option, config or run
    folder, 3 a bad checkpoint or a diverged run, 4 a file-system error (disk full, read-only),
    128 + signal after SIGINT/SIGTERM (with a checkpoint saved).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, args = resolve_config(argv)
    d = None
    try:
        d = setup_distributed(cfg.train.device)
        note = configure_threads(cfg.train.threads, "--train.threads", d.device.type)
        run_dir = train(cfg, args.run_dir, resume=True, progress=not args.no_progress, dist_info=d, note=note)
    except (ConfigError, RunFolderBusy) as err:
        return _fail(str(err), 2)
    except (TrainingDiverged, CheckpointError) as err:
        return _fail(str(err), 3)
    except TrainingStopped as err:
        print(str(err), file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        return _fail("interrupted (a second Ctrl-C): the work since the last checkpoint is lost", 130)
    except torch.cuda.OutOfMemoryError:
        return _fail("the GPU ran out of memory: lower --train.batch_size or raise --train.grad_accum", 3)
    except OSError as err:
        return _fail(f"file-system error: {err.strerror or err}{f' ({err.filename})' if err.filename else ''}", 4)
    finally:
        if d is not None and d.enabled and dist.is_initialized():
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
