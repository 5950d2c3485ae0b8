"""Checkpoints: plain ``state_dict``s plus the config, written atomically, loaded safely.

A checkpoint is a dict of tensors and primitive containers only, so that it loads with
``torch.load(..., weights_only=True)`` (no pickled code is ever executed):

    {"format": "minisgm-checkpoint", "version": 1, "step": int, "config": {...},
     "model": state_dict, "ema": state_dict, "optimizer": state_dict, "rng": {...},
     "world_size": int}

Writing goes to a temporary file in the same folder, is flushed and fsync'ed, and then renamed
over the old file with ``os.replace`` (atomic on POSIX): a run killed at any moment leaves either
the previous checkpoint or the new one, never a torn file. Book: :ref:`sec-scaling-up`.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "CHECKPOINT_NAME",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "get_rng_state",
    "set_rng_state",
    "load_state_dict_checked",
]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "minisgm-checkpoint"
VERSION = 1

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, corrupt, or does not fit the model."""


def _fsync_dir(path: Path) -> None:
    # The rename itself lives in the directory entry: sync it too, or a power cut may forget it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: Dict[str, Any], path: PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file + fsync + ``os.replace``).

    ``format`` and ``version`` keys are added. Returns the final path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, **state}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def find_checkpoint(path: PathLike) -> Path:
    """``path`` itself if it is a file, else ``path/checkpoint.pt`` (``CheckpointError`` if absent)."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p} (give a run folder holding {CHECKPOINT_NAME}, or a .pt file)")
    return p


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Args:
        path: a ``.pt`` file or a run folder holding ``checkpoint.pt``.
        map_location: where tensors go (as in ``torch.load``).

    Raises:
        CheckpointError: missing file, truncated/corrupt file, or not a minisgm checkpoint.
    """
    p = find_checkpoint(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "weights only load failed" in str(err).lower() and "unsupported global" in str(err).lower():
            raise CheckpointError(
                f"refusing {p}: it holds pickled objects other than tensors and plain containers "
                "(not written by minisgm; loading it could run code)"
            ) from None
        raise CheckpointError(f"cannot read checkpoint {p}: the file is truncated or corrupt ({msg})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a minisgm checkpoint (no format={FORMAT!r} entry)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{p} has checkpoint version {state.get('version')}, this minisgm reads version {VERSION}")
    for key in ("step", "config", "model"):
        if key not in state:
            raise CheckpointError(f"{p} lacks the entry {key!r}; it is incomplete")
    return state


def load_state_dict_checked(module: torch.nn.Module, state_dict: Dict[str, torch.Tensor], what: str = "model") -> None:
    """``module.load_state_dict(strict=True)`` with a short message on missing/extra/mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} with another shape (e.g. {'; '.join(shapes[:3])})")
        raise CheckpointError(
            f"the checkpoint's {what} weights do not fit this model: {'; '.join(parts)}. "
            "Was it written with another preset or model config?"
        )
    module.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------------------------
# RNG states as tensors and plain lists (weights_only-safe)
# ----------------------------------------------------------------------------------------------
def get_rng_state(extra_generators: Optional[Dict[str, torch.Generator]] = None) -> Dict[str, Any]:
    """The states of every random number generator a run touches, weights_only-safe.

    torch CPU and CUDA (byte tensors), numpy's legacy global ``RandomState`` (its key array as a
    tensor), Python's ``random`` (a list of ints), and any named ``torch.Generator`` given.
    """
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(np_state[0]),
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [int(py_state[0]), [int(v) for v in py_state[1]], py_state[2]],
        "generators": {k: g.get_state() for k, g in (extra_generators or {}).items()},
    }
    return out


def set_rng_state(state: Dict[str, Any], extra_generators: Optional[Dict[str, torch.Generator]] = None) -> None:
    """Restore what :func:`get_rng_state` captured (CUDA states only if CUDA is present)."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            torch.cuda.set_rng_state(cuda_states[0])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for k, g in (extra_generators or {}).items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k].cpu())
