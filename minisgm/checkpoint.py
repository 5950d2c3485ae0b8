"""Checkpoints: plain ``state_dict``s plus the config, written atomically, verified, loaded safely.

Tensors and plain containers only, so ``torch.load(..., weights_only=True)`` runs no pickled code::

    {"format": "minisgm-checkpoint", "version": 2, "step": int, "config": {...}, "model": state_dict,
     "ema": state_dict, "optimizer": state_dict, "rng": {...}, "world_size": int,
     "sha256": hex digest of everything else}

A write leaves the old file or the new one, never a torn file, and keeps the replaced one as
``<name>.prev.pt``; every load checks the digest. One training process per run folder
(:func:`lock_run_folder`). Book: :ref:`sec-scaling-up`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Union

import torch

__all__ = ["CheckpointError", "RunFolderBusy", "CHECKPOINT_NAME", "save_checkpoint",
           "load_checkpoint", "find_checkpoint", "previous_checkpoint", "remove_stale_temporaries",
           "lock_run_folder", "get_rng_state", "set_rng_state", "load_state_dict_checked"]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "minisgm-checkpoint"
VERSION = 2
_READABLE_VERSIONS = (1, 2)  # version 1 (no digest) is read without verification

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, corrupt, or does not fit the model."""


class RunFolderBusy(RuntimeError):
    """Another process is training in the same run folder."""


def _digest(obj: Any, h=None) -> str:
    """SHA-256 of a checkpoint's content: keys, plain values and every tensor's dtype, shape and bytes."""
    h = hashlib.sha256() if h is None else h
    if isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _digest(obj[k], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _digest(v, h)
        h.update(b"]")
    elif torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()


def previous_checkpoint(path: PathLike) -> Path:
    """Where the checkpoint that ``path`` replaced is kept: ``checkpoint.prev.pt``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.prev{p.suffix}")


def save_checkpoint(state: Dict[str, Any], path: PathLike, keep_previous: bool = True) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file + fsync + ``os.replace``); returns ``path``.

    ``format``, ``version`` and the ``sha256`` digest are added; with ``keep_previous`` the
    replaced file is kept as :func:`previous_checkpoint`. Raises ``OSError`` if the write failed
    (saying so when the disk is full); the previous checkpoint is then untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": FORMAT, "version": VERSION, **{k: v for k, v in state.items() if k != "sha256"}}
    body["sha256"] = _digest(body)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(body, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_checkpoint(path))
        os.replace(tmp, path)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OSError(err.errno, f"no space left on the disk while writing {path}: free some space "
                                     "(the previous checkpoint is intact)") from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    with contextlib.suppress(OSError):  # the rename lives in the directory entry: sync it too (power cuts)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def remove_stale_temporaries(folder: PathLike) -> list:
    """Delete the temporary checkpoint files (``.<name>.tmp-<pid>``) of killed writers; returns them.

    The folder's lock (:func:`lock_run_folder`) rules out other writers: any pid but ours is stale.
    """
    removed = []
    for p in Path(folder).glob(".*.tmp-*"):
        if p.name.rsplit("-", 1)[-1] != str(os.getpid()):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def find_checkpoint(path: PathLike) -> Path:
    """``path`` itself if it is a file, else ``path/checkpoint.pt`` (``CheckpointError`` if absent), or
    ``checkpoint.prev.pt`` if only that exists (a kill between the two renames of a write)."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
        if not p.is_file() and previous_checkpoint(p).is_file():
            return previous_checkpoint(p)
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p} (give a run folder holding {CHECKPOINT_NAME}, or a .pt file)")
    return p


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint (a ``.pt`` file or a run folder) with ``weights_only=True`` and verify it.

    Raises :class:`CheckpointError` for a missing or truncated file, content that does not match
    its digest, or a file that is not a minisgm checkpoint.
    """
    p = find_checkpoint(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "weights only load failed" in str(err).lower() and "unsupported global" in str(err).lower():
            raise CheckpointError(f"refusing {p}: it holds pickled objects other than tensors and plain "
                                  "containers (not written by minisgm; loading it could run code)") from None
        raise CheckpointError(f"cannot read checkpoint {p}: the file is truncated or corrupt ({msg}){_fallback(p)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a minisgm checkpoint (no format={FORMAT!r} entry)")
    if state.get("version") not in _READABLE_VERSIONS:
        raise CheckpointError(f"{p} has checkpoint version {state.get('version')}, this minisgm reads versions "
                              f"{', '.join(map(str, _READABLE_VERSIONS))}")
    if state["version"] >= 2:
        stored = state.get("sha256")
        if stored != _digest({k: v for k, v in state.items() if k != "sha256"}):
            raise CheckpointError(f"{p} is corrupt: its content does not match its SHA-256 digest "
                                  f"(damaged on disk or in transfer){_fallback(p)}")
    for key in ("step", "config", "model"):
        if key not in state:
            raise CheckpointError(f"{p} lacks the entry {key!r}; it is incomplete")
    if not isinstance(state["step"], int) or isinstance(state["step"], bool) or state["step"] < 0:
        raise CheckpointError(f"{p} has an invalid step {state['step']!r}")
    return state


def _fallback(p: Path) -> str:
    prev = previous_checkpoint(p)
    if p.name == CHECKPOINT_NAME and prev.is_file():
        return f". The previous checkpoint {prev} is kept: to resume from it, `mv {prev} {p}`"
    return ""


def lock_run_folder(folder: PathLike):
    """Take the run folder's lock (``.lock``) for this process, or raise :class:`RunFolderBusy`: an
    advisory ``flock``, released by the OS however the process ends. Keep the returned file open."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".lock", "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunFolderBusy(f"{folder} is in use by {holder}: one training process per run folder "
                            "(wait for it to finish, stop it, or choose another --run-dir)") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    return f


# ----- RNG states (weights_only-safe) ---------------------------------------------------------
def get_rng_state() -> Dict[str, Any]:
    """The states of the global torch generators (CPU and every CUDA device) as byte tensors: they
    drive dropout; all other draws come from generators seeded by ``(seed, step, shard)``."""
    return {"torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []}


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured (CUDA states only if CUDA is present)."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            torch.cuda.set_rng_state(cuda_states[0])


def load_state_dict_checked(module: torch.nn.Module, state_dict: Dict[str, torch.Tensor], what: str = "model") -> None:
    """``module.load_state_dict(strict=True)`` with a short message on missing, extra, mis-shaped or
    mis-typed entries (a float16 or integer tensor where the model holds float32 is refused, not cast)."""
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise CheckpointError(f"the checkpoint's {what} weights are not a state dict of tensors")
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    dtypes = [f"{k}: checkpoint {state_dict[k].dtype} vs model {own[k].dtype}"
              for k in own if k in state_dict and state_dict[k].dtype != own[k].dtype]
    parts = [f"{len(bad)} {label} (e.g. {sep.join(bad[:3])})" for label, bad, sep in (
        ("missing", missing, ", "), ("unexpected", extra, ", "),
        ("with another shape", shapes, "; "), ("with another dtype", dtypes, "; ")) if bad]
    if parts:
        raise CheckpointError(f"the checkpoint's {what} weights do not fit this model: {'; '.join(parts)}. "
                              "Was it written with another preset or model config?")
    module.load_state_dict(state_dict, strict=True)
