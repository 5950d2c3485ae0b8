"""Noise-conditional classifiers ``p_phi(y | x_t, t)`` for classifier guidance (:ref:`sec-classifier-guidance`).

Guidance adds ``w grad_x log p_phi(y | x_t, t)`` to the score (Song et al. 2021, eq. (48);
Dhariwal & Nichol 2021), so the classifier is trained on *noised* inputs at every ``t``.
Book: :ref:`sec-guidance`.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int
from .embeddings import TimeEmbedding, batch_condition
from .unet import ResBlock, group_norm

__all__ = ["TimeConditionedClassifier"]


class TimeConditionedClassifier(nn.Module):
    """Logits ``[B, num_classes]`` of ``p(y | x, t)`` for vectors ``[B, d]`` or images ``[B, C, H, W]``.

    ``in_shape = d`` (an int) builds the MLP of :class:`~minisgm.models.mlp.ScoreMLP` with a
    linear head; ``in_shape = (C, H, W)`` (H, W even) a tiny conv net: two residual blocks, the
    second after a stride-2 conv to ``2 * base_channels``, then global average pooling and a
    linear head. ``t`` enters through the score networks' ``TimeEmbedding`` (``cond="t"`` or ``"sigma"``).
    """

    def __init__(self, in_shape: Union[int, Sequence[int]], num_classes: int, hidden: int = 128,
                 n_layers: int = 3, base_channels: int = 32, embed_dim: int = 64, embedding: str = "fourier",
                 cond: str = "t"):
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, 2)
        is_int = isinstance(in_shape, int) and not isinstance(in_shape, bool)
        shape = (in_shape,) if is_int else tuple(in_shape)
        if len(shape) not in (1, 3) or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"in_shape must be d (vectors) or (C, H, W) (images), got {in_shape!r}")
        self.in_shape = shape
        if len(shape) == 1:
            check_int("n_layers", n_layers)
            self.time_embed = TimeEmbedding(hidden, embed_dim=embed_dim, embedding=embedding, cond=cond)
            self.inp = nn.Linear(shape[0], hidden)
            self.hidden_layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_layers - 1))
            self.time_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_layers - 1))
            self.head = nn.Linear(hidden, num_classes)
        else:
            C, H, W = shape
            if H % 2 or W % 2:
                raise ValueError(f"image height and width must be even, got {H}x{W}")
            ch = base_channels
            emb_dim = 4 * ch
            self.time_embed = TimeEmbedding(emb_dim, embed_dim=embed_dim, embedding=embedding, cond=cond)
            self.conv_in = nn.Conv2d(C, ch, 3, padding=1)
            self.block1 = ResBlock(ch, ch, emb_dim)
            self.downsample = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
            self.block2 = ResBlock(2 * ch, 2 * ch, emb_dim)
            self.norm_out = group_norm(2 * ch)
            self.head = nn.Linear(2 * ch, num_classes)

    def forward(self, x: Tensor, t) -> Tensor:
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 1 + len(self.in_shape) or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.in_shape))}], got {list(x.shape)}")
        emb = self.time_embed(batch_condition(t, x))
        if len(self.in_shape) == 1:
            h = F.silu(self.inp(x) + emb)
            emb_act = F.silu(emb)
            for layer, proj in zip(self.hidden_layers, self.time_proj):
                h = F.silu(layer(h) + proj(emb_act))
            return self.head(h)
        h = self.block1(self.conv_in(x), emb)
        h = self.block2(self.downsample(h), emb)
        return self.head(F.silu(self.norm_out(h)).mean(dim=(2, 3)))
