"""A small U-Net score network for 8x8 images (scikit-learn digits). Book: :ref:`sec-unet`.

The layout of DDPM (Ho et al. 2020, App. B) / NCSN++ shrunk to fit two CPU cores: residual
blocks, stride-2 downsampling, nearest-neighbour upsampling, skips at every block and one
self-attention block at the lowest resolution (4x4 with the default ``channel_mults=(1, 2)``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import (ClassEmbedding, TimeEmbedding, batch_condition, check_marginal_std,
                         condition_embedding, dot_product_attention)

__all__ = ["SmallUNet", "ResBlock", "AttentionBlock"]


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the largest group count ``<= max_groups`` that divides ``channels``."""
    groups = max(g for g in range(1, max_groups + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))) + P SiLU(emb))))`` (1x1 conv on the skip if channels change)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over the ``H*W`` pixels (Vaswani et al. 2017).

    Uses :func:`~minisgm.models.embeddings.dot_product_attention`
    (``scaled_dot_product_attention``, which picks a fused kernel where one is available).
    """

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W).unbind(1)
        # [B, heads, tokens, head_dim] as scaled_dot_product_attention expects.
        out = dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


class SmallUNet(nn.Module):
    """U-Net score model ``s_theta(x, t[, y])`` for small images, shapes ``[B, C, H, W] -> [B, C, H, W]``.

    Level ``i`` has ``base_channels * channel_mults[i]`` channels and each level after the first
    halves H and W (which must be divisible by ``2^(len(channel_mults) - 1)``).
    ``num_classes``, ``marginal_std``, ``embedding`` and ``cond`` work as in
    :class:`~minisgm.models.mlp.ScoreMLP`, except that ``embedding`` defaults to "sinusoidal".
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 32, channel_mults: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, embed_dim: int = 64, num_classes: Optional[int] = None,
                 dropout: float = 0.0, marginal_std: Optional[Callable[[Tensor], Tensor]] = None,
                 attention: bool = True, embedding: str = "sinusoidal", cond: str = "t"):
        super().__init__()
        for name, value in [("in_channels", in_channels), ("base_channels", base_channels), ("num_res_blocks", num_res_blocks)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        mults = tuple(channel_mults)
        if not mults or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mults):
            raise ValueError(f"channel_mults must be a non-empty sequence of positive ints, got {channel_mults!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        if marginal_std is not None and not callable(marginal_std):
            raise TypeError("marginal_std must be a callable t -> std [B] (or None)")
        self.in_channels, self.channel_mults, self.num_classes = in_channels, mults, num_classes
        self.marginal_std = marginal_std
        emb_dim = 4 * base_channels
        self.time_embed = TimeEmbedding(emb_dim, embed_dim=embed_dim, embedding=embedding, cond=cond)
        self.class_embed = ClassEmbedding(num_classes, emb_dim) if num_classes is not None else None

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        # Down: residual blocks (each output kept as a skip), then a stride-2 conv between levels.
        self.down = nn.ModuleList()
        skip_channels = []
        ch = base_channels
        for level, mult in enumerate(mults):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, base_channels * mult, emb_dim, dropout))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level < len(mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        # Middle: one residual block and self-attention (the only global mixing of pixels).
        self.mid = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = AttentionBlock(ch) if attention else nn.Identity()
        # Up: mirror of the down path; every block concatenates the matching skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for _ in range(num_res_blocks):
                self.up.append(ResBlock(ch + skip_channels.pop(), base_channels * mult, emb_dim, dropout))
                ch = base_channels * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)

    def forward(self, x: Tensor, t, y: Optional[Tensor] = None) -> Tensor:
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        factor = 2 ** (len(self.channel_mults) - 1)
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"x must have shape [B, {self.in_channels}, H, W] with H, W divisible by {factor}, got {list(x.shape)}"
            )
        t = batch_condition(t, x)
        emb = condition_embedding(self.time_embed, self.class_embed, t, y, x)

        h = self.conv_in(x)
        skips = []
        for block in self.down:
            if isinstance(block, ResBlock):
                h = block(h, emb)
                skips.append(h)
            else:
                h = block(h)
        h = self.mid_attn(self.mid(h, emb))
        for block in self.up:
            if isinstance(block, ResBlock):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = block(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if self.marginal_std is not None:
            out = out / check_marginal_std(self.marginal_std(t), x.shape[0])[:, None, None, None]
        return out
