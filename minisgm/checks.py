"""Input checks shared by the whole package, and the debug switch for checks of tensor values.

Python numbers and tensor shapes and dtypes cost nothing to check: they are always checked. Tensor
*values* (``t`` in ``[0, T]``, labels in range, no NaN) are checked only in debug mode
(``MINISGM_DEBUG=1`` or :func:`set_debug`): ``bool(t.min() >= 0)`` waits for every queued kernel,
so one such check per sampler step stalls a GPU once per step. Without debug mode a bad value is
caught where it surfaces (non-finite samples or losses are detected once, after the loop).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["set_debug", "debug_enabled", "check_values", "check_int", "check_number",
           "check_positive", "check_choice", "check_callable", "check_tensor", "check_like",
           "check_shape"]

_debug = os.environ.get("MINISGM_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def set_debug(on: bool = True) -> None:
    """Turn the checks of tensor values on or off (default: the ``MINISGM_DEBUG`` variable)."""
    global _debug
    _debug = bool(on)


def debug_enabled() -> bool:
    """Whether tensor values are checked: debug mode is on, and no ``torch.compile`` is tracing."""
    return _debug and not torch.compiler.is_compiling()


def check_values(ok: Callable[[], Tensor], message: Callable[[], str]) -> None:
    """In debug mode only: raise ``ValueError(message())`` unless the 0-d bool tensor ``ok()`` is true
    (callables, so that nothing is computed or synchronised when debug mode is off)."""
    if debug_enabled() and not bool(ok()):
        raise ValueError(message())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (bools are not ints here)."""
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_number(name: str, value: Any, lo: Optional[float] = None, hi: Optional[float] = None, *,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float in the interval ``lo .. hi`` (each end closed unless ``*_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        left = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        right = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        where = f" in {left or '(-inf'}, {right or 'inf)'}" if (lo is not None or hi is not None) else ""
        raise ValueError(f"{name} must be a finite number{where}, got {value!r}")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    """``value`` as a positive finite float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def check_callable(name: str, f: Any, usage: str = "") -> Callable:
    """``f`` if it is callable (``usage`` says how it is called, for the message)."""
    if not callable(f):
        raise TypeError(f"{name} must be callable{' as ' + usage if usage else ''}, got {type(f).__name__}")
    return f


def check_tensor(name: str, x: Any, *, min_dim: int = 1, floating: bool = False, nonempty: bool = False) -> Tensor:
    """``x`` if it is a tensor with at least ``min_dim`` dimensions (shape ``[B, ...]`` by default)."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s) (shape [B, ...]), got shape {list(x.shape)}")
    if floating and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if nonempty and x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {list(x.shape)}); give at least one example")
    return x


def check_like(what: str, out: Any, x: Tensor) -> Tensor:
    """``out`` if it is a tensor shaped like ``x`` (e.g. a score model's output)."""
    if not torch.is_tensor(out) or out.shape != x.shape:
        got = list(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"{what} must return a tensor shaped like x {list(x.shape)}, got {got}")
    return out


def check_shape(shape: Any) -> Tuple[int, ...]:
    """``shape`` as a tuple of positive ints ``(B, ...)``."""
    if isinstance(shape, (int, str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(f"shape must be a sequence of positive ints like (B, d), got {shape!r}")
    shape = tuple(shape)
    if not shape or not all(_is_int(n) and n > 0 for n in shape):
        raise ValueError(f"shape must be a non-empty sequence of positive ints like (B, d), got {shape!r}")
    return shape
