"""Embeddings of the time ``t`` (or noise level ``sigma``) fed to score networks.

The scalar is lifted to ``embed_dim`` sinusoids of many frequencies, since an MLP can only fit
slowly varying functions of a raw scalar input. Book: :ref:`sec-score-networks`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int, check_values
from ..sde import batch_time

__all__ = ["GaussianFourierProjection", "SinusoidalEmbedding", "TimeEmbedding", "ClassEmbedding",
           "batch_condition", "condition_embedding", "check_marginal_std", "dot_product_attention"]


def _check_embed_dim(embed_dim) -> int:
    if check_int("embed_dim", embed_dim, 2) % 2:
        raise ValueError(f"embed_dim must be an even int >= 2, got {embed_dim!r}")
    return embed_dim


def _check_scalar_batch(c: Tensor) -> Tensor:
    if not torch.is_tensor(c):
        raise TypeError(f"the time/noise input must be a torch.Tensor, got {type(c).__name__}")
    if c.dim() != 1:
        raise ValueError(f"the time/noise input must have shape [B], got {list(c.shape)}")
    if not c.dtype.is_floating_point:
        c = c.to(torch.get_default_dtype())
    return c


class GaussianFourierProjection(nn.Module):
    """Random Fourier features ``[sin(2 pi W c), cos(2 pi W c)]``, ``W_i ~ N(0, scale^2)``.

    Tancik et al. (2020). ``W`` (``embed_dim / 2`` frequencies) is a buffer: saved, not trained.
    Shapes: ``c [B] -> [B, embed_dim]`` (sines, then cosines), in the dtype of ``c``.
    """

    W: Tensor

    def __init__(self, embed_dim: int, scale: float = 16.0, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.embed_dim = _check_embed_dim(embed_dim)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or not math.isfinite(scale):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.scale = float(scale)
        self.register_buffer("W", torch.randn(embed_dim // 2, generator=generator) * self.scale)

    def forward(self, c: Tensor) -> Tensor:
        c = _check_scalar_batch(c)
        proj = 2 * math.pi * c[:, None] * self.W.to(c.dtype)[None, :]
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=1)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, scale={self.scale}"


class SinusoidalEmbedding(nn.Module):
    """Transformer positional encoding of a scalar ``c``: ``[sin(w_i c), cos(w_i c)]``.

    ``w_i = max_positions^(-i / half)``, ``half = embed_dim / 2`` (Vaswani et al. 2017). Made for
    the DDPM step ``n = 0..999``: for ``t in [0, 1]`` pass ``1000 t``. ``c [B] -> [B, embed_dim]``.
    """

    freqs: Tensor

    def __init__(self, embed_dim: int, max_positions: float = 10000):
        super().__init__()
        self.embed_dim = _check_embed_dim(embed_dim)
        if isinstance(max_positions, bool) or not isinstance(max_positions, (int, float)) or not max_positions > 1:
            raise ValueError(f"max_positions must be a number > 1, got {max_positions!r}")
        self.max_positions = float(max_positions)
        half = embed_dim // 2
        freqs = torch.exp(-math.log(self.max_positions) * torch.arange(half, dtype=torch.float64) / half)
        # Non-persistent: recomputed from the arguments, so old checkpoints stay loadable.
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: Tensor) -> Tensor:
        c = _check_scalar_batch(c)
        proj = c[:, None] * self.freqs.to(c.dtype)[None, :]
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=1)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, max_positions={self.max_positions:g}"


def batch_condition(t, x: Tensor) -> Tensor:
    """The time / noise input as a ``[B]`` tensor of ``x``'s dtype and device (a scalar is broadcast).

    :func:`minisgm.sde.batch_time` without its range ``[0, T]``, since noise levels are inputs too.
    """
    return batch_time(t, x, None)


class TimeEmbedding(nn.Module):
    """Map the conditioning scalar (time ``t`` or noise level ``sigma``) to a ``[B, out_dim]`` vector.

    ``cond="t"`` embeds ``c = t``; ``cond="sigma"`` embeds ``c = log sigma`` (geometric noise
    levels, evenly spread by the log). Fourier features see ``c``, sinusoidal ones ``1000 c``;
    then ``Linear -> SiLU -> Linear`` (Ho et al. 2020).
    """

    def __init__(self, out_dim: int, embed_dim: int = 64, embedding: str = "fourier", cond: str = "t", fourier_scale: float = 16.0):
        super().__init__()
        if embedding == "fourier":
            self.features: nn.Module = GaussianFourierProjection(embed_dim, scale=fourier_scale)
            self.input_scale = 1.0
        elif embedding == "sinusoidal":
            self.features = SinusoidalEmbedding(embed_dim)
            self.input_scale = 1000.0
        else:
            raise ValueError(f"embedding must be 'fourier' or 'sinusoidal', got {embedding!r}")
        if cond not in ("t", "sigma"):
            raise ValueError(f"cond must be 't' (time) or 'sigma' (noise level), got {cond!r}")
        self.embedding, self.cond = embedding, cond
        self.mlp = nn.Sequential(nn.Linear(embed_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        c = t
        if self.cond == "sigma":
            check_values(lambda: (t > 0).all(), lambda: "sigma must be positive (the network embeds log sigma)")
            c = torch.log(t)
        return self.mlp(self.features(c * self.input_scale))


class ClassEmbedding(nn.Module):
    """Learned class embedding ``y [B] -> [B, dim]`` with a *null* class (classifier-free guidance).

    Label ``num_classes`` (or ``y=None``) is "unconditional" (Ho & Salimans 2022).
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes)
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Optional[Tensor], batch: int, device: torch.device) -> Tensor:
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if not torch.is_tensor(y) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError("class labels y must be an integer tensor [B]")
        if y.shape != (batch,):
            raise ValueError(f"class labels y must have shape [B]=[{batch}], got {list(y.shape)}")
        check_values(
            lambda: ((y >= 0) & (y <= self.num_classes)).all(),
            lambda: f"class labels must lie in 0..{self.num_classes} ({self.num_classes} = null class), "
            f"got values in [{int(y.min())}, {int(y.max())}]",
        )
        return self.table(y.long())


def condition_embedding(time_embed: TimeEmbedding, class_embed: Optional[ClassEmbedding], t: Tensor,
                        y: Optional[Tensor], x: Tensor) -> Tensor:
    """Time (or noise) embedding of ``t [B]``, plus the class embedding if class-conditional: ``[B, dim]``."""
    emb = time_embed(t)
    if class_embed is not None:
        return emb + class_embed(y, x.shape[0], x.device)
    if y is not None:
        raise ValueError("class labels y given, but the model was built with num_classes=None")
    return emb


def check_marginal_std(std: Tensor, batch: int) -> Tensor:
    """Validate the ``[B]`` output of a ``marginal_std`` callable (positive, right shape)."""
    if not torch.is_tensor(std) or std.shape != (batch,):
        shape = list(std.shape) if torch.is_tensor(std) else type(std).__name__
        raise ValueError(f"marginal_std(t) must return a [B]=[{batch}] tensor, got {shape}")
    check_values(lambda: (std > 0).all(),
                 lambda: "marginal_std(t) must be positive; at t = 0 the VP/VE std is 0, so evaluate at t >= sde.eps")
    return std


_HALF = (torch.float16, torch.bfloat16)


def dot_product_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` over the last two dimensions (``[..., tokens, d]``), with
    :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels on GPU).

    On the CPU, half-precision inputs (bf16 autocast) are computed in float32: PyTorch 2.13's
    CPU bf16 kernel raised "pack_vnni2 is only supported when avx512 is supported" under the
    generic and AVX2 kernel sets (``ATEN_CPU_CAPABILITY``), the stand-ins for CPUs without
    AVX-512. The result has the dtype of ``v``.
    """
    if q.device.type == "cpu" and (q.dtype in _HALF or torch.is_autocast_enabled("cpu")):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(v.dtype)
    return F.scaled_dot_product_attention(q, k, v)
