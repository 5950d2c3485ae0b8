"""Data: toy distributions with exact log-density and score, 2-D shapes, digits, CIFAR-10.

The Gaussian mixture is the book's oracle: its log-density and score are exact, and the law of
``m x + s z`` (``z ~ N(0, I)``) is again a Gaussian mixture, so the score of every noised
marginal ``p_t`` of a linear SDE is known in closed form (:func:`exact_score_fn`).
Book: chapter 2 (:ref:`sec-gmm-score`) and chapter 6 (:ref:`sec-exact-scores`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .sde import SDE, batch_time

__all__ = ["GaussianMixture", "exact_score_fn"]


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

    Args:
        means: ``[K, d]`` component means.
        stds: ``[K]`` isotropic component standard deviations (``Sigma_k = std_k^2 I``), or a
            float shared by all components. Exclusive with ``covs``.
        weights: ``[K]`` non-negative mixing weights (normalised here); uniform if omitted.
        covs: ``[K, d, d]`` full covariance matrices (symmetric positive definite).

    Everything is stored in float64 and cast to the input's dtype and device when evaluated.
    Book: :ref:`sec-gmm-score`.
    """

    def __init__(
        self,
        means,
        stds=None,
        weights=None,
        covs=None,
    ):
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

    # ----- basic properties ----------------------------------------------------------------
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

    # ----- transformations -----------------------------------------------------------------
    def noised(self, mean_coeff: float, std: float) -> "GaussianMixture":
        """The law of ``mean_coeff * x + std * z``, ``x ~ self``, ``z ~ N(0, I)``.

        Component ``k`` becomes ``N(m mu_k, m^2 Sigma_k + s^2 I)``; weights are unchanged.
        """
        m = float(mean_coeff)
        s = float(std)
        if not math.isfinite(m) or not math.isfinite(s) or s < 0:
            raise ValueError(f"need finite mean_coeff and std >= 0, got mean_coeff={mean_coeff}, std={std}")
        if self._iso_var is not None:
            return GaussianMixture(m * self.means, (m * m * self._iso_var + s * s).sqrt(), self.weights)
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(m * self.means, weights=self.weights, covs=m * m * self.covs + s * s * eye)

    # ----- sampling ------------------------------------------------------------------------
    def sample(
        self,
        n: int,
        generator: Optional[torch.Generator] = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        return_labels: bool = False,
    ):
        """Draw ``n`` samples ``[n, d]`` (and their component labels ``[n]`` if asked)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        k = torch.multinomial(self.weights.to(gen_device), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, device=gen_device, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs).to(gen_device)
        x = self.means.to(gen_device)[k] + (chol[k] @ z[:, :, None])[..., 0]
        x = x.to(device=device if device is not None else gen_device, dtype=dtype)
        if return_labels:
            return x, k.to(x.device)
        return x

    # ----- density and score ---------------------------------------------------------------
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
        """Responsibilities ``p(k | x)``, shape ``[B, K]`` (an exact classifier for chapter 8)."""
        lp, _ = self.component_log_probs(x)
        return torch.softmax(lp, dim=1)


def exact_score_fn(gmm: GaussianMixture, sde: SDE) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact score ``grad log p_t(x)`` of the SDE's marginal when ``p_0`` is ``gmm``.

    ``p_t`` is the law of ``m(t) x_0 + s(t) z``: the mixture ``gmm.noised(m(t), s(t))``, with
    ``t`` free to vary across the batch. Returns ``score_fn(x [B, d], t [B]) -> [B, d]``.
    Book: :ref:`sec-exact-scores`.
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


__all__ += ["exact_log_prob_fn"]
