"""Multilayer perceptrons for 2-D (and other vector) data: score, energy and classifier nets.

Activations are SiLU everywhere: smooth, so that Jacobians (implicit score matching) and
Hessians of an energy network are meaningful (with ReLU they vanish almost everywhere).
Book: :ref:`sec-score-networks`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..checks import check_int
from .embeddings import ClassEmbedding, TimeEmbedding, batch_condition, check_marginal_std, condition_embedding

__all__ = ["MLP", "ScoreMLP"]


def _check_input(x: Tensor, dim: int) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"x must have shape [B, {dim}], got {list(x.shape)}")


class MLP(nn.Module):
    """Unconditional ``x [B, dim] -> [B, out_dim]``: ``n_layers`` hidden SiLU layers of width ``hidden``.

    Used as a score model ``s_theta(x)`` for score matching (``out_dim = dim``, the default) and as
    an energy network ``E_theta(x)`` with ``out_dim = 1`` (output ``[B, 1]``; squeeze it).
    """

    def __init__(self, dim: int, hidden: int = 128, n_layers: int = 3, out_dim: Optional[int] = None):
        super().__init__()
        self.dim = check_int("dim", dim)
        check_int("hidden", hidden)
        check_int("n_layers", n_layers)
        self.out_dim = dim if out_dim is None else check_int("out_dim", out_dim)
        layers: list[nn.Module] = [nn.Linear(dim, hidden), nn.SiLU()]
        for _ in range(n_layers - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, self.out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.dim)
        return self.net(x)


class ScoreMLP(nn.Module):
    """Time- (or noise-level-) conditional score network ``s_theta(x, t)``, ``x [B, dim] -> [B, dim]``.

    ``h_1 = SiLU(W_1 x + e(t))``, ``h_{l+1} = SiLU(W_{l+1} h_l + P_l SiLU(e(t)))``,
    ``out = W_out h_L``, with ``e`` a :class:`~minisgm.models.embeddings.TimeEmbedding`
    (``cond="sigma"`` embeds ``log sigma``, for NCSN).

    With ``marginal_std`` (a callable ``t -> std [B]``, e.g. ``lambda t: sde.marginal_coeffs(t)[1]``)
    the output is ``out / std``: the network predicts ``-z`` (Song & Ermon 2020, technique 3).
    The callable is not saved in the ``state_dict``: give it again when rebuilding the model.
    With ``num_classes``, ``y=None`` or ``y == num_classes`` is the null class (Ho & Salimans 2022).
    """

    def __init__(self, dim: int, hidden: int = 128, n_layers: int = 3, embed_dim: int = 64,
                 embedding: str = "fourier", marginal_std: Optional[Callable[[Tensor], Tensor]] = None,
                 cond: str = "t", num_classes: Optional[int] = None):
        super().__init__()
        self.dim = check_int("dim", dim)
        check_int("hidden", hidden)
        check_int("n_layers", n_layers)
        if marginal_std is not None and not callable(marginal_std):
            raise TypeError("marginal_std must be a callable t -> std [B] (or None)")
        self.marginal_std = marginal_std
        self.time_embed = TimeEmbedding(hidden, embed_dim=embed_dim, embedding=embedding, cond=cond)
        self.class_embed = ClassEmbedding(num_classes, hidden) if num_classes is not None else None
        self.num_classes = num_classes
        self.inp = nn.Linear(dim, hidden)
        self.hidden_layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_layers - 1))
        self.time_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_layers - 1))
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, t, y: Optional[Tensor] = None) -> Tensor:
        _check_input(x, self.dim)
        t = batch_condition(t, x)
        emb = condition_embedding(self.time_embed, self.class_embed, t, y, x)
        h = self.act(self.inp(x) + emb)
        emb_act = self.act(emb)
        for layer, proj in zip(self.hidden_layers, self.time_proj):
            h = self.act(layer(h) + proj(emb_act))
        out = self.out(h)
        if self.marginal_std is not None:
            out = out / check_marginal_std(self.marginal_std(t), x.shape[0])[:, None]
        return out
