"""Data: toy distributions with exact log-density and score, 2-D shapes, digits, CIFAR-10.

The Gaussian mixture is the book's oracle: its log-density and score are exact, and the law of
``m x + s z`` (``z ~ N(0, I)``) is again a Gaussian mixture, so the score of every noised
marginal ``p_t`` of a linear SDE is known in closed form (:func:`exact_score_fn`).
Book: :ref:`sec-gmm-score`, :ref:`sec-exact-scores`.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .checks import check_int, check_number, check_positive
from .sde import SDE, batch_time

__all__ = ["GaussianMixture", "exact_score_fn", "exact_log_prob_fn", "two_moons", "swiss_roll", "checkerboard",
           "rings", "spirals", "eight_gaussians", "eight_gaussians_mixture", "load_digits", "CIFAR10_CLASSES",
           "load_cifar10", "IMAGE_SUFFIXES", "load_image_folder", "load_npz"]


def _as_tensor(name: str, value, dtype: torch.dtype) -> Tensor:
    try:
        out = torch.as_tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be convertible to a tensor: {err}") from None
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} contains non-finite values")
    return out


class GaussianMixture:
    """Mixture ``p(x) = sum_k w_k N(x; mu_k, Sigma_k)`` in ``d`` dimensions.

    ``means [K, d]``; exactly one of ``stds`` (``[K]`` or one float: ``Sigma_k = std_k^2 I``) and
    ``covs [K, d, d]`` (symmetric positive definite); ``weights [K]`` non-negative, normalised here,
    uniform if omitted. Stored in float64, cast to the input's dtype and device when evaluated.
    Book: :ref:`sec-gmm-score`.
    """

    def __init__(self, means, stds=None, weights=None, covs=None):
        means = _as_tensor("means", means, torch.float64)
        if means.dim() == 1:
            means = means[:, None]
        if means.dim() != 2 or means.shape[0] == 0:
            raise ValueError(f"means must have shape [K, d], got {list(means.shape)}")
        K, d = means.shape
        self.means = means
        if (stds is None) == (covs is None):
            raise ValueError("give exactly one of stds (isotropic components) or covs (full covariances)")
        if stds is not None:
            stds = _as_tensor("stds", stds, torch.float64)
            if stds.dim() == 0:
                stds = stds.expand(K).clone()
            if stds.shape != (K,):
                raise ValueError(f"stds must have shape [K]=[{K}] to match means, got {list(stds.shape)}")
            if not (stds > 0).all():
                raise ValueError("stds must be positive")
            self.covs = (stds**2)[:, None, None] * torch.eye(d, dtype=torch.float64)
            self._iso_var: Optional[Tensor] = stds**2
        else:
            covs = _as_tensor("covs", covs, torch.float64)
            if covs.shape != (K, d, d):
                raise ValueError(f"covs must have shape [K, d, d]=[{K}, {d}, {d}], got {list(covs.shape)}")
            if not torch.allclose(covs, covs.transpose(1, 2)):
                raise ValueError("covs must be symmetric")
            if torch.linalg.cholesky_ex(covs).info.any():
                raise ValueError("covs must be positive definite")
            self.covs = covs
            self._iso_var = None
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = _as_tensor("weights", weights, torch.float64)
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape [K]=[{K}], got {list(weights.shape)}")
        if (weights < 0).any() or not weights.sum() > 0:
            raise ValueError("weights must be non-negative with a positive sum")
        self.weights = weights / weights.sum()

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def stds(self) -> Tensor:
        """Isotropic component stds ``[K]`` (raises for full-covariance mixtures)."""
        if self._iso_var is None:
            raise AttributeError("this mixture has full covariances; use .covs")
        return self._iso_var.sqrt()

    def mean(self) -> Tensor:
        """Mixture mean ``[d]``."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Mixture covariance ``[d, d]`` (law of total variance)."""
        mu = self.mean()
        diff = self.means - mu
        return (self.weights[:, None, None] * (self.covs + diff[:, :, None] * diff[:, None, :])).sum(0)

    def __repr__(self) -> str:
        kind = "isotropic" if self._iso_var is not None else "full-covariance"
        return f"GaussianMixture(K={self.n_components}, d={self.dim}, {kind})"

    def noised(self, mean_coeff: float, std: float) -> "GaussianMixture":
        """The law of ``mean_coeff * x + std * z``, ``x ~ self``, ``z ~ N(0, I)``.

        Component ``k`` becomes ``N(m mu_k, m^2 Sigma_k + s^2 I)``; weights are unchanged.
        """
        m, s = float(mean_coeff), float(std)
        if not math.isfinite(m) or not math.isfinite(s) or s < 0:
            raise ValueError(f"need finite mean_coeff and std >= 0, got mean_coeff={mean_coeff}, std={std}")
        if self._iso_var is not None:
            return GaussianMixture(m * self.means, (m * m * self._iso_var + s * s).sqrt(), self.weights)
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(m * self.means, weights=self.weights, covs=m * m * self.covs + s * s * eye)

    def sample(self, n: int, generator: Optional[torch.Generator] = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
               return_labels: bool = False):
        """Draw ``n`` samples ``[n, d]`` (and their component labels ``[n]`` if asked)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        if n == 0:  # torch.multinomial rejects n = 0
            k = torch.zeros(0, dtype=torch.long, device=gen_device)
        else:
            k = torch.multinomial(self.weights.to(gen_device), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, device=gen_device, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs).to(gen_device)
        x = self.means.to(gen_device)[k] + (chol[k] @ z[:, :, None])[..., 0]
        x = x.to(device=device if device is not None else gen_device, dtype=dtype)
        return (x, k.to(x.device)) if return_labels else x

    def _flat(self, x: Tensor) -> Tensor:
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x[0].numel() != self.dim:
            raise ValueError(f"x must have shape [B, {self.dim}] (or [B, ...] with {self.dim} entries), got {list(x.shape)}")
        return x.reshape(x.shape[0], self.dim)

    def component_log_probs(self, x: Tensor, mean_coeff: Optional[Tensor] = None, std: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Per-component ``log w_k + log N_k(x)`` ``[B, K]`` and ``-Sigma_k^{-1}(x - mu_k)`` ``[B, K, d]``.

        With ``mean_coeff``/``std`` (``[B]``) each row is evaluated under its own noised mixture.
        """
        xf = self._flat(x)
        B, K, d = xf.shape[0], self.n_components, self.dim
        opts = dict(dtype=xf.dtype, device=xf.device)
        mu = self.means.to(**opts)
        logw = self.weights.to(**opts).log()
        if mean_coeff is None:
            mean_coeff = torch.ones(B, **opts)
            std = torch.zeros(B, **opts)
        m, s = mean_coeff.to(**opts), std.to(**opts)
        loc = m[:, None, None] * mu[None]  # [B, K, d]
        diff = xf[:, None, :] - loc
        if self._iso_var is not None:
            var = m[:, None] ** 2 * self._iso_var.to(**opts)[None] + s[:, None] ** 2  # [B, K]
            logn = -0.5 * (diff.pow(2).sum(-1) / var + d * torch.log(2 * math.pi * var))
            grad = -diff / var[..., None]
        else:
            eye = torch.eye(d, **opts)
            cov = m[:, None, None, None] ** 2 * self.covs.to(**opts)[None] + s[:, None, None, None] ** 2 * eye
            chol = torch.linalg.cholesky(cov)  # [B, K, d, d]
            sol = torch.cholesky_solve(diff[..., None], chol)[..., 0]  # Sigma^{-1} diff
            logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            logn = -0.5 * ((diff * sol).sum(-1) + logdet + d * math.log(2 * math.pi))
            grad = -sol
        return logw + logn, grad

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)``, shape ``[B]``."""
        lp, _ = self.component_log_probs(x)
        return torch.logsumexp(lp, dim=1)

    def score(self, x: Tensor) -> Tensor:
        """``grad_x log p(x) = sum_k r_k(x) (-Sigma_k^{-1}(x - mu_k))``, shaped like ``x``."""
        lp, grad = self.component_log_probs(x)
        r = torch.softmax(lp, dim=1)
        return (r[..., None] * grad).sum(1).reshape(x.shape)

    def log_prob_and_score_noised(self, x: Tensor, mean_coeff: Tensor, std: Tensor) -> Tuple[Tensor, Tensor]:
        """``log p`` and score of ``x`` under the law of ``m x0 + s z``, ``m, s`` given per row ``[B]``."""
        lp, grad = self.component_log_probs(x, mean_coeff, std)
        r = torch.softmax(lp, dim=1)
        return torch.logsumexp(lp, dim=1), (r[..., None] * grad).sum(1).reshape(x.shape)

    def posterior_probs(self, x: Tensor) -> Tensor:
        """Responsibilities ``p(k | x)``, shape ``[B, K]`` (an exact classifier, :ref:`sec-classifier-guidance`)."""
        lp, _ = self.component_log_probs(x)
        return torch.softmax(lp, dim=1)


def exact_score_fn(gmm: GaussianMixture, sde: SDE) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact score ``grad log p_t(x)`` of the SDE's marginal when ``p_0`` is ``gmm``.

    ``p_t`` is the mixture ``gmm.noised(alpha_t, sigma_t)``, ``t`` free to vary across the batch.
    Returns ``score_fn(x [B, d], t [B]) -> [B, d]``. Book: :ref:`sec-exact-scores`.
    """

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        t = batch_time(t, x, sde.T)
        m, s = sde.marginal_coeffs(t)
        return gmm.log_prob_and_score_noised(x, m, s)[1]

    return score_fn


def exact_log_prob_fn(gmm: GaussianMixture, sde: SDE) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact ``log p_t(x)`` of the SDE's marginal when ``p_0`` is ``gmm``; ``[B]``."""

    def log_prob_fn(x: Tensor, t: Tensor) -> Tensor:
        t = batch_time(t, x, sde.T)
        m, s = sde.marginal_coeffs(t)
        return gmm.log_prob_and_score_noised(x, m, s)[0]

    return log_prob_fn


# ===== 2-D toy distributions. Book: :ref:`sec-ncsn-toy`.
# ``f(n, generator=None, device=None, dtype=torch.float32, **shape_params) -> [n, 2]``, centred
# and divided by one factor (no distortion) so that the average per-coordinate variance is about
# 1 (exactly 1 where it has a closed form, plus ``noise``): the scale the SDE defaults assume.
# Randomness is drawn in float64 on the generator's device, then cast, so a seeded generator
# gives the same points in every dtype.


def _rand_device(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _finish(x: Tensor, device, dtype: torch.dtype, noise: float = 0.0, generator=None) -> Tensor:
    """Add Gaussian ``noise`` (standardised units), then cast."""
    if noise != 0:
        x = x + noise * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    return x.to(device=device if device is not None else x.device, dtype=dtype)


def two_moons(n: int, generator: Optional[torch.Generator] = None, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32, noise: float = 0.05) -> Tensor:
    """Two interleaved half circles, ``[n, 2]`` (the shape of scikit-learn's ``make_moons``).

    Upper moon ``(cos a, sin a)``, lower moon ``(1 - cos a, 1/2 - sin a)``, ``a ~ U[0, pi]``, each
    with probability 1/2; centred at the exact mean ``(1/2, 1/4)``, divided by the exact RMS std.
    """
    n, noise = check_int("n", n, 0), check_number("noise", noise, 0.0)
    dev = _rand_device(generator)
    a = math.pi * torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
    lower = torch.rand(n, generator=generator, device=dev, dtype=torch.float64) < 0.5
    x = torch.where(lower, 1 - torch.cos(a), torch.cos(a))
    y = torch.where(lower, 0.5 - torch.sin(a), torch.sin(a))
    # Exact moments: Var x = 1/2 + 1/4; Var y = (1/2 - 4/pi^2) + (2/pi - 1/4)^2.
    var_y = 0.5 - 4 / math.pi**2 + (2 / math.pi - 0.25) ** 2
    scale = math.sqrt((0.75 + var_y) / 2)
    out = torch.stack([(x - 0.5) / scale, (y - 0.25) / scale], dim=1)
    return _finish(out, device, dtype, noise, generator)


def swiss_roll(n: int, generator: Optional[torch.Generator] = None, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32, noise: float = 0.05) -> Tensor:
    """The 2-D Swiss roll ``(a cos a, a sin a)``, ``a ~ U[3 pi / 2, 9 pi / 2]``, ``[n, 2]``.

    Centred at the exact mean and divided by the exact RMS std ``sqrt((E a^2 - |mean|^2) / 2)``.
    """
    n, noise = check_int("n", n, 0), check_number("noise", noise, 0.0)
    lo, hi = 1.5 * math.pi, 4.5 * math.pi
    length = hi - lo
    # Antiderivatives: int a cos a = a sin a + cos a, int a sin a = sin a - a cos a.
    mx = ((hi * math.sin(hi) + math.cos(hi)) - (lo * math.sin(lo) + math.cos(lo))) / length
    my = ((math.sin(hi) - hi * math.cos(hi)) - (math.sin(lo) - lo * math.cos(lo))) / length
    ea2 = (hi**3 - lo**3) / (3 * length)
    scale = math.sqrt((ea2 - mx * mx - my * my) / 2)
    a = lo + length * torch.rand(n, generator=generator, device=_rand_device(generator), dtype=torch.float64)
    out = torch.stack([(a * torch.cos(a) - mx) / scale, (a * torch.sin(a) - my) / scale], dim=1)
    return _finish(out, device, dtype, noise, generator)


def checkerboard(n: int, generator: Optional[torch.Generator] = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 n_squares: int = 4) -> Tensor:
    """Uniform density on the dark squares of an ``n_squares x n_squares`` board, ``[n, 2]``.

    The board is ``[-sqrt(3), sqrt(3)]^2``, square ``(i, j)`` dark when ``i + j`` is even; with
    ``n_squares`` even each coordinate is uniform (mean 0, variance 1). The density jumps, so its
    score is a sum of Dirac walls: a hard case for score estimation.
    """
    n = check_int("n", n, 0)
    k = check_int("n_squares", n_squares, 2)
    if k % 2:
        raise ValueError(f"n_squares must be even (so each coordinate is uniform), got {k}")
    dev = _rand_device(generator)
    # Pick a row i uniformly, then one of the k/2 dark columns of that row: j = 2m + (i mod 2).
    i = torch.randint(0, k, (n,), generator=generator, device=dev)
    j = 2 * torch.randint(0, k // 2, (n,), generator=generator, device=dev) + (i % 2)
    u = torch.rand(n, 2, generator=generator, device=dev, dtype=torch.float64)
    cell = torch.stack([i, j], dim=1).to(torch.float64)
    half = math.sqrt(3.0)
    return _finish(-half + (cell + u) * (2 * half / k), device, dtype)


def rings(n: int, generator: Optional[torch.Generator] = None, device: torch.device | str | None = None,
          dtype: torch.dtype = torch.float32, n_rings: int = 4, noise: float = 0.04) -> Tensor:
    """Concentric circles of radii ``r_i = i R / n_rings``, ``i = 1..n_rings``, ``[n, 2]``.

    Points are uniform along the total arc length (ring ``i`` has probability ``~ r_i``); ``R`` makes
    ``E[r^2] / 2 = 1``: each coordinate has mean 0 and variance 1 (before ``noise``).
    """
    n, noise = check_int("n", n, 0), check_number("noise", noise, 0.0)
    k = check_int("n_rings", n_rings)
    dev = _rand_device(generator)
    unit = torch.arange(1, k + 1, dtype=torch.float64, device=dev) / k  # radii for R = 1
    weights = unit / unit.sum()
    # E[r^2] = R^2 sum_i w_i u_i^2 = 2  =>  R = sqrt(2 / sum_i w_i u_i^2).
    radius = math.sqrt(2.0 / float((weights * unit**2).sum()))
    # Inverse-CDF draw (torch.multinomial rejects n = 0).
    u = torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
    ring = torch.searchsorted(weights.cumsum(0), u, right=True).clamp_(max=k - 1)
    a = 2 * math.pi * torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
    r = radius * unit[ring]
    out = torch.stack([r * torch.cos(a), r * torch.sin(a)], dim=1)
    return _finish(out, device, dtype, noise, generator)


def spirals(n: int, generator: Optional[torch.Generator] = None, device: torch.device | str | None = None,
            dtype: torch.dtype = torch.float32, n_arms: int = 2, turns: float = 1.5,
            noise: float = 0.05) -> Tensor:
    """``n_arms`` interleaved Archimedean spirals, ``[n, 2]``.

    Arm ``k`` (chosen uniformly) is ``r (cos(a + 2 pi k / n_arms), sin(a + 2 pi k / n_arms))`` with
    ``r = 2 sqrt(u)``, ``a = 2 pi turns sqrt(u)``, ``u ~ U[0, 1]`` (roughly uniform along the arm), so
    ``E|x|^2 = 2``. For ``n_arms >= 2`` the mean is exactly 0 (rotation symmetry); one arm is off-centre.
    """
    n, noise = check_int("n", n, 0), check_number("noise", noise, 0.0)
    k, turns = check_int("n_arms", n_arms), check_positive("turns", turns)
    dev = _rand_device(generator)
    u = torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
    arm = torch.randint(0, k, (n,), generator=generator, device=dev).to(torch.float64)
    r = 2 * u.sqrt()
    a = 2 * math.pi * turns * u.sqrt() + 2 * math.pi * arm / k
    out = torch.stack([r * torch.cos(a), r * torch.sin(a)], dim=1)
    return _finish(out, device, dtype, noise, generator)


def eight_gaussians_mixture(radius: float = math.sqrt(2.0), std: float = 0.1) -> GaussianMixture:
    """Eight equally weighted isotropic Gaussians at angles ``2 pi k / 8`` on a circle.

    Each coordinate has mean 0 and variance ``radius^2 / 2 + std^2`` (1.01 by default); the
    scores of the mixture and its noised marginals are exact (:func:`exact_score_fn`).
    """
    radius, std = check_number("radius", radius, 0.0), check_positive("std", std)
    a = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    means = radius * torch.stack([torch.cos(a), torch.sin(a)], dim=1)
    return GaussianMixture(means, stds=std)


def eight_gaussians(n: int, generator: Optional[torch.Generator] = None,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                    radius: float = math.sqrt(2.0), std: float = 0.1) -> Tensor:
    """Samples ``[n, 2]`` of :func:`eight_gaussians_mixture` ``(radius, std)``."""
    n = check_int("n", n, 0)
    x = eight_gaussians_mixture(radius, std).sample(n, generator=generator, dtype=torch.float64)
    return _finish(x, device, dtype)


# ===== scikit-learn's 8x8 handwritten digits. Book: :ref:`sec-digits`.


def load_digits(return_int: bool = False, dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
    """The 1797 8x8 handwritten digits shipped with scikit-learn (no download).

    Returns ``(images [1797, 1, 8, 8], labels int64 [1797])``: images of ``dtype`` with values
    ``k / 16``, or the 17 grey levels ``k = 0..16`` as ``int64`` if ``return_int`` (to dequantise).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("load_digits needs scikit-learn (pip install scikit-learn)") from err
    bunch = _sk_load_digits()
    levels = torch.as_tensor(bunch.images).round().to(torch.int64)[:, None]  # [N, 1, 8, 8]
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    if levels.min() < 0 or levels.max() > 16:  # guards against a changed upstream format
        raise ValueError("scikit-learn digits outside the expected grey levels 0..16")
    if return_int:
        return levels, labels
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    return levels.to(dtype) / 16, labels


# ===== CIFAR-10 (python version), read from a local copy. Book: :ref:`sec-cifar10`.

CIFAR10_CLASSES: Tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
"""Class names of CIFAR-10 in label order (as in the archive's ``batches.meta``)."""

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST = ("test_batch",)


def _safe_codecs_encode(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1").
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


def _allowed_pickle_globals() -> dict:
    import numpy as np

    reconstruct = np.zeros(0).__reduce__()[0]  # numpy's private array constructor (1.x or 2.x)
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol-5 array constructor
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,  # the real (Python 2) archive
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,  # written by numpy >= 2
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _safe_codecs_encode,
    }


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy's array reconstruction (plain containers need no import).

    ``pickle`` can call any importable function while loading (``os.system`` included), so a
    doctored archive could run code: every other global raises :class:`pickle.UnpicklingError`.
    """

    _allowed: Optional[dict] = None

    def find_class(self, module: str, name: str):
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_pickle_globals()
        try:
            return _RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': only plain data and numpy arrays are allowed"
            ) from None


def _unpickle_batch(raw: bytes, where: str):
    """Unpickle one CIFAR batch safely and check its fields; returns ``(data [n, 3072], labels [n])``."""
    import numpy as np

    try:
        batch = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # truncated, garbled or refused pickles raise many types
        raise ValueError(f"{where}: corrupt or refused pickle ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{where}: expected a pickled dict, got {type(batch).__name__}")
    for key in (b"data", b"labels"):
        if key not in batch:
            raise ValueError(f"{where}: missing key {key!r} (found keys {sorted(map(repr, batch))})")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = f"array of {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{where}: b'data' must be a uint8 array, got {kind}")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{where}: b'data' must have shape [N, 3072], got {list(data.shape)}")
    labels = batch[b"labels"]
    if not isinstance(labels, (list, np.ndarray)):
        raise ValueError(f"{where}: b'labels' must be a list of ints, got {type(labels).__name__}")
    if isinstance(labels, list) and not all(type(v) is int for v in labels):
        raise ValueError(f"{where}: b'labels' must contain only ints")
    labels = np.asarray(labels)
    if labels.size and labels.dtype.kind not in "iu":
        raise ValueError(f"{where}: b'labels' must be integers, got dtype {labels.dtype}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{where}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise ValueError(
            f"{where}: labels must lie in 0..{len(CIFAR10_CLASSES) - 1}, got values in [{labels.min()}, {labels.max()}]"
        )
    return data, labels.astype(np.int64)


def _read_cifar_members(path: Path, names: Sequence[str]):
    """Yield ``(where, raw bytes)`` for each batch file, from a .tar.gz or a folder."""
    if path.is_file():
        try:
            with tarfile.open(path, "r:gz") as tar:
                for name in names:
                    member = f"{CIFAR10_FOLDER}/{name}"
                    try:
                        info = tar.getmember(member)
                    except KeyError:
                        raise ValueError(f"{path}: archive has no member '{member}'") from None
                    if not info.isfile():
                        raise ValueError(f"{path}: member '{member}' is not a regular file")
                    yield f"{path}:{member}", tar.extractfile(info).read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise ValueError(f"{path}: cannot read the gzip'd tar archive (truncated or corrupt?): {err}") from err
    else:
        for name in names:
            file = path / name
            if not file.is_file():
                raise ValueError(f"{path}: missing batch file '{name}'")
            yield str(file), file.read_bytes()


def _locate_cifar10(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for folder in (path, path / CIFAR10_FOLDER):
            if any((folder / name).is_file() for name in _CIFAR10_TRAIN + _CIFAR10_TEST):
                return folder
        if (path / CIFAR10_ARCHIVE).is_file():
            return path / CIFAR10_ARCHIVE
        tried = f"'{path}', '{path / CIFAR10_FOLDER}' and '{path / CIFAR10_ARCHIVE}'"
    else:
        tried = f"'{path}'"
    raise FileNotFoundError(
        f"CIFAR-10 not found: looked for {tried}. minisgm never downloads data: get "
        f"'{CIFAR10_ARCHIVE}' (the python version) from {CIFAR10_URL} and pass the path of the "
        f".tar.gz, of the extracted '{CIFAR10_FOLDER}' folder, or of the folder containing either."
    )


def load_cifar10(path: str | os.PathLike, train: bool = True) -> Tuple[Tensor, Tensor]:
    """Load CIFAR-10 from a local copy of the python-format archive (never downloads).

    ``path`` may be ``cifar-10-python.tar.gz`` itself, the extracted ``cifar-10-batches-py``
    folder, or the folder that contains either. ``train=True`` reads the 50000 training images,
    else the 10000 test images. Batches are read with a restricted unpickler (pickles can run
    code) that builds only plain containers and numpy arrays; still, prefer the official archive.

    Returns ``(images uint8 [N, 3, 32, 32], labels int64 [N])`` (names in :data:`CIFAR10_CLASSES`).
    Raises FileNotFoundError (nothing at ``path``; the message says where to get the archive) or
    ValueError (a missing member, a corrupt archive, a refused pickle or a malformed batch).
    """
    import numpy as np

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    source = _locate_cifar10(Path(path).expanduser())
    members = _read_cifar_members(source, _CIFAR10_TRAIN if train else _CIFAR10_TEST)
    datas, labels = zip(*(_unpickle_batch(raw, where) for where, raw in members))
    images = np.concatenate(datas).reshape(-1, 3, 32, 32)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(np.concatenate(labels))


# ===== Your own images: a folder of image files, or an array file. Book: :ref:`sec-scaling-up`.

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""File suffixes :func:`load_image_folder` reads (case-insensitive)."""


def _resize_crop(img, size: int):
    """Resize so the shorter side is ``size`` (Lanczos), then crop the centre ``size x size``."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image_folder(path: str | os.PathLike, image_size: int = 0,
                      channels: int = 0) -> Tuple[Tensor, Optional[Tensor], Tuple[str, ...]]:
    """Every image file under ``path`` (recursively): ``(images uint8 [N, C, H, W], labels, classes)``.

    If every image lies in a sub-folder of ``path`` (``path/cat/1.png``), the first-level
    sub-folders are the classes (sorted) and ``labels`` is ``int64 [N]``; otherwise ``None``.
    ``image_size > 0`` resizes (shorter side, Lanczos) and centre-crops to ``image_size x
    image_size``; ``0`` keeps the native size, which must then be the same for all. ``channels``:
    1 (grey), 3 (RGB) or ``0``: 1 if every image is grey, else 3. Raises FileNotFoundError or
    NotADirectoryError (no folder), ValueError (no image, an unreadable one, or mixed sizes with
    ``image_size=0``).
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder (data.dataset=folder needs a folder of images; "
                                 "use data.dataset=npz for an array file)")
    if channels not in (0, 1, 3):
        raise ValueError(f"channels must be 0 (automatic), 1 or 3, got {channels!r}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    rel = [p.relative_to(root) for p in files]
    classes, labels = (), None
    if all(len(r.parts) > 1 for r in rel):
        classes = tuple(sorted({r.parts[0] for r in rel}))
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[r.parts[0]] for r in rel], dtype=torch.int64)
    opened = []
    for p in files:
        try:
            with Image.open(p) as img:
                img.load()
                opened.append(img.copy())
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ValueError(f"cannot read the image {p}: {err}") from None
    if channels == 0:
        channels = 1 if all(img.mode in ("1", "L", "I;16", "I") for img in opened) else 3
    arrays, first = [], None
    for p, img in zip(files, opened):
        img = img.convert("L" if channels == 1 else "RGB")
        if image_size > 0:
            img = _resize_crop(img, image_size)
        elif first is None:
            first = (p, img.size)
        elif img.size != first[1]:
            raise ValueError(
                f"the images have different sizes ({first[0].name}: {first[1][0]}x{first[1][1]}, "
                f"{p.name}: {img.size[0]}x{img.size[1]}): set --data.image_size N to resize and "
                "centre-crop them all to N x N"
            )
        a = np.asarray(img, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays)), labels, classes


def load_npz(path: str | os.PathLike) -> Tuple[Tensor, Optional[Tensor]]:
    """Images from a NumPy ``.npz`` (or ``.npy``) file, as ``uint8 [N, C, H, W]``.

    The images are the array ``images`` (or ``x``, or the only array): ``uint8`` (or floats in
    ``[0, 1]``, rounded to 256 levels), ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]``, ``C``
    in 1 or 3. Optional labels: the array ``labels`` (or ``y``), integers ``[N]``. Returns
    ``(images, labels or None)``; raises FileNotFoundError, or ValueError for a bad file.
    """
    import numpy as np

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"array file not found: {p}")
    try:
        loaded = np.load(p, allow_pickle=False)
        arrays = {"images": loaded} if isinstance(loaded, np.ndarray) else {k: loaded[k] for k in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot read {p} as a .npz/.npy array file: {err}") from None
    key = next((k for k in ("images", "x") if k in arrays), None)
    if key is None:
        image_keys = [k for k in arrays if k not in ("labels", "y")]
        if len(image_keys) != 1:
            raise ValueError(f"{p}: name the image array 'images' (found arrays {sorted(arrays)})")
        key = image_keys[0]
    x = arrays[key]
    if x.dtype.kind == "f":
        if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise ValueError(f"{p}: float images must lie in [0, 1], got values in [{x.min():.3g}, {x.max():.3g}]")
        x = np.round(x * 255).astype(np.uint8)
    elif x.dtype != np.uint8:
        raise ValueError(f"{p}: images must be uint8 (0..255) or floats in [0, 1], got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"{p}: images must have shape [N, H, W], [N, H, W, C] or [N, C, H, W] with C in 1 or 3 "
                         f"and N >= 1, got {list(x.shape)}")
    labels = None
    lkey = next((k for k in ("labels", "y") if k in arrays), None)
    if lkey is not None:
        lab = arrays[lkey]
        if lab.shape != (x.shape[0],) or lab.dtype.kind not in "iu" or (lab.size and lab.min() < 0):
            raise ValueError(f"{p}: labels must be non-negative integers of shape [{x.shape[0]}], "
                             f"got {lab.dtype} {list(lab.shape)}")
        labels = torch.from_numpy(lab.astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(x)), labels
