"""Pictures of samples: image grids and scatter plots written as PNG files. Book: :ref:`sec-scaling-up`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["grid_image", "save_grid", "save_scatter"]


def grid_image(images: Tensor | np.ndarray, ncol: Optional[int] = None, pad: int = 0, scale: int = 0) -> np.ndarray:
    """Tile images ``[N, C, H, W]`` with values in ``[0, 1]`` into one ``[rows*H, cols*W, 3]`` uint8 array.

    ``scale`` repeats pixels so small images stay visible (0: ``max(1, 64 // H)``); ``pad`` is the
    gap between images in output pixels (0: ``max(1, scale // 2)``), grey to show on black and white.
    """
    x = images.detach().float().cpu().numpy() if torch.is_tensor(images) else np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [N, 1 or 3, H, W], got {list(x.shape)}")
    n, c, h, w = x.shape
    x = np.clip(np.nan_to_num(x), 0.0, 1.0)
    if c == 1:
        x = np.repeat(x, 3, axis=1)
    scale = scale or max(1, 64 // h)
    pad = pad or max(1, scale // 2)
    x = x.repeat(scale, axis=2).repeat(scale, axis=3)
    h, w = h * scale, w * scale
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 0.5, dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, ncol)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = x[i].transpose(1, 2, 0)
    return (canvas * 255 + 0.5).astype(np.uint8)


def _figure(width_px: int, height_px: int, title: Optional[str]):
    from matplotlib.figure import Figure

    dpi = 100
    top = 28 if title else 0
    fig = Figure(figsize=(width_px / dpi, (height_px + top) / dpi), dpi=dpi)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 6 / (height_px + top), va="top")
    return fig, top


def save_grid(images: Tensor | np.ndarray, path: str | Path, ncol: Optional[int] = None, title: Optional[str] = None) -> Path:
    """Write images ``[N, C, H, W]`` in ``[0, 1]`` as one PNG grid, with ``title`` above it if given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = grid_image(images, ncol)
    if title is None:
        import matplotlib.image

        matplotlib.image.imsave(path, grid)
        return path
    h, w = grid.shape[:2]
    width = max(w, 360)  # room for the title
    fig, top = _figure(width, h, title)
    ax = fig.add_axes((0.5 - w / width / 2, 0, w / width, h / (h + top)))
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    fig.savefig(path)
    return path


def save_scatter(points: Tensor | np.ndarray, path: str | Path, lim: float = 0.0, title: Optional[str] = None) -> Path:
    """Write 2-D points ``[N, 2]`` as a PNG scatter plot (``title`` above it if given)."""
    p = points.detach().float().cpu().numpy() if torch.is_tensor(points) else np.asarray(points)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"points must have shape [N, 2], got {list(p.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, _ = _figure(400, 400, title)
    ax = fig.add_subplot()
    ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.5)
    finite = p[np.isfinite(p).all(axis=1)]
    lim = lim or (float(np.percentile(np.abs(finite), 99.5)) * 1.1 if finite.size else 0.0) or 1.0
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    fig.savefig(path)
    return path
