"""Sample-based distances between two point clouds: energy distance, MMD, sliced Wasserstein.

Inputs ``x [N, ...]`` and ``y [M, ...]`` with the same trailing shape are flattened to ``[N, D]``
and ``[M, D]``; computations follow x's device in at least float32. Book: :ref:`sec-metrics`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["energy_distance", "mmd", "sliced_wasserstein"]

_BLOCK = 2048  # rows per block of a pairwise-distance matrix


def _pair(x: Tensor, y: Tensor, min_size: int = 1) -> tuple[Tensor, Tensor]:
    for name, v in (("x", x), ("y", y)):
        if not torch.is_tensor(v):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        if v.dim() < 1:
            raise ValueError(f"{name} must have shape [N, ...], got a 0-d tensor")
        if v.shape[0] < min_size:
            raise ValueError(f"{name} needs at least {min_size} samples, got {v.shape[0]}")
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"x and y must have the same trailing shape, got {list(x.shape)} and {list(y.shape)}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x = x.reshape(x.shape[0], -1).to(dtype)
    y = y.reshape(y.shape[0], -1).to(device=x.device, dtype=dtype)
    return x, y


def _cdist(a: Tensor, b: Tensor) -> Tensor:
    # The matmul shortcut ||a||^2 + ||b||^2 - 2 a.b loses all precision for near points.
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _pairwise_sum(a: Tensor, b: Tensor, fn) -> Tensor:
    """``sum_{i,j} fn(||a_i - b_j||)`` computed block by block."""
    total = a.new_zeros(())
    for i in range(0, a.shape[0], _BLOCK):
        total = total + fn(_cdist(a[i : i + _BLOCK], b)).sum()
    return total


def _self_mean(a: Tensor, fn, unbiased: bool, diag_value: float) -> Tensor:
    """Mean of ``fn(||a_i - a_j||)`` over all pairs (V) or over ``i != j`` (U)."""
    n = a.shape[0]
    s = _pairwise_sum(a, a, fn)
    if unbiased:
        return (s - n * diag_value) / (n * (n - 1))
    return s / (n * n)


def energy_distance(x: Tensor, y: Tensor, unbiased: bool = False) -> Tensor:
    """Squared energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (Szekely & Rizzo 2013), 0-d.

    Default: the V-statistic (all pairs), ``>= 0`` but biased upwards by about
    ``E|X-X'|/N + E|Y-Y'|/M``; ``unbiased=True``: the U-statistic (pairs ``i != j``), which can be
    slightly negative.
    """
    x, y = _pair(x, y, min_size=2 if unbiased else 1)
    ident = lambda d: d  # noqa: E731
    exy = _pairwise_sum(x, y, ident) / (x.shape[0] * y.shape[0])
    exx = _self_mean(x, ident, unbiased, 0.0)
    eyy = _self_mean(y, ident, unbiased, 0.0)
    return 2 * exy - exx - eyy


def _median_distance(x: Tensor, y: Tensor, max_points: int = 2000) -> Tensor:
    # Pooled sample, deterministically thinned: the median heuristic needs no more than this.
    z = torch.cat([x, y])
    if z.shape[0] > max_points:
        z = z[torch.linspace(0, z.shape[0] - 1, max_points, device=z.device).long()]
    d = _cdist(z, z)
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    med = d[iu[0], iu[1]].median()
    if not med > 0:
        raise ValueError("median pairwise distance is 0 (all points equal); pass bandwidths explicitly")
    return med


def mmd(x: Tensor, y: Tensor, bandwidths: Optional[float | Sequence[float]] = None,
        unbiased: bool = False) -> Tensor:
    """Squared maximum mean discrepancy with a (multi-bandwidth) Gaussian kernel, 0-d.

    ``k(a, b) = 1/H sum_h exp(-|a - b|^2 / (2 h^2))`` (Gretton et al. 2012); V- or (``unbiased``)
    U-statistic as in :func:`energy_distance`. ``bandwidths=None``: ``h_med * (0.5, 1, 2)`` with
    ``h_med`` the median pairwise distance of the pooled sample.
    """
    x, y = _pair(x, y, min_size=2 if unbiased else 1)
    if bandwidths is None:
        med = _median_distance(x, y)
        hs = [0.5 * med, med, 2.0 * med]
    else:
        hs = [bandwidths] if isinstance(bandwidths, (int, float)) else list(bandwidths)
        if len(hs) == 0 or not all(float(h) > 0 for h in hs):
            raise ValueError(f"bandwidths must be positive, got {bandwidths!r}")

    def kernel(d: Tensor) -> Tensor:
        return sum(torch.exp(-d.pow(2) / (2 * float(h) ** 2)) for h in hs) / len(hs)

    kxy = _pairwise_sum(x, y, kernel) / (x.shape[0] * y.shape[0])
    kxx = _self_mean(x, kernel, unbiased, 1.0)
    kyy = _self_mean(y, kernel, unbiased, 1.0)
    return kxx + kyy - 2 * kxy


def _wasserstein_1d_pp(a: Tensor, b: Tensor, p: float) -> Tensor:
    """``W_p^p`` between 1-D empirical measures, column by column: ``a [N, P]``, ``b [M, P]``.

    ``int_0^1 |F_a^-1(u) - F_b^-1(u)|^p du`` is an exact finite sum over the merged quantile
    breakpoints ``{i/N} U {j/M}`` (``mean |sort(a) - sort(b)|^p`` for ``N == M``).
    """
    a, _ = torch.sort(a, dim=0)
    b, _ = torch.sort(b, dim=0)
    n, m = a.shape[0], b.shape[0]
    if n == m:
        return (a - b).abs().pow(p).mean(0)
    opts = dict(device=a.device, dtype=torch.float64)
    u = torch.unique(torch.cat([torch.arange(1, n + 1, **opts) / n, torch.arange(1, m + 1, **opts) / m]))
    u[-1] = 1.0
    left = torch.cat([u.new_zeros(1), u[:-1]])
    width, mid = (u - left), 0.5 * (u + left)
    ia = (mid * n).floor().long().clamp(max=n - 1)
    ib = (mid * m).floor().long().clamp(max=m - 1)
    return ((a[ia] - b[ib]).abs().pow(p) * width.to(a.dtype)[:, None]).sum(0)


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, p: float = 2.0,
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """Sliced Wasserstein distance ``( E_theta W_p^p(theta^T X, theta^T Y) )^(1/p)``, 0-d.

    ``n_projections`` directions ``theta`` uniform on the sphere (Bonneel et al. 2015); each 1-D
    ``W_p`` is exact, so in 1-D this is the exact ``W_p``.
    """
    x, y = _pair(x, y)
    if not isinstance(n_projections, int) or isinstance(n_projections, bool) or n_projections < 1:
        raise ValueError(f"n_projections must be a positive int, got {n_projections!r}")
    if not p >= 1:
        raise ValueError(f"p must be >= 1, got {p}")
    gen_device = generator.device if generator is not None else x.device
    theta = torch.randn(x.shape[1], n_projections, generator=generator, device=gen_device, dtype=x.dtype)
    theta = theta.to(x.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    return _wasserstein_1d_pp(x @ theta, y @ theta, p).mean().pow(1.0 / p)
