"""Forward SDEs ``dx = f(x, t) dt + g(t) dw``, ``t in [0, T]``: VE, VP, sub-VP and rectified flow.

Song et al. (2021), "Score-Based Generative Modeling through Stochastic Differential Equations",
ICLR (arXiv:2011.13456), eqs. (5)-(6), (9), (11), (13), (29)-(34). Book: :ref:`sec-sde-forward`,
notation :ref:`sec-notation`. The drift is linear, so ``p(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)``
(:meth:`SDE.marginal_coeffs`); the transition, reverse drift and probability-flow ODE follow generically.
Shapes: ``x [B, ...]``, ``t [B]`` (a number or 0-d tensor is broadcast), SDE scalars ``[B]``; a
tensor ``t`` is range-checked only in debug mode (:mod:`minisgm.checks`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .checks import check_number, check_positive, check_tensor, check_values

__all__ = ["ScoreFn", "SDE", "VESDE", "VPSDE", "SubVPSDE", "RectifiedFlowSDE", "batch_time", "expand",
           "randn_like"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""A score model: ``score(x [B, ...], t [B]) -> tensor shaped like x``."""


def expand(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample ``[B]`` tensor to ``[B, 1, ..., 1]`` so it broadcasts against ``x``."""
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


def randn_like(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device and then moved
    (so one CPU generator drives CPU and CUDA runs reproducibly)."""
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def batch_time(t: Tensor | float, x: Tensor, T: Optional[float] = 1.0) -> Tensor:
    """Check ``t`` against the batch ``x`` and return it as a ``[B]`` tensor of x's dtype/device.

    A Python number is checked to lie in ``[0, T]`` here; a tensor's values only in debug mode
    (:func:`minisgm.checks.set_debug`), so that no sampler step reads a tensor back to the host.
    ``T=None`` checks the shape only (for other conditioning inputs, such as noise levels).
    """
    check_tensor("x", x, floating=True)
    B = x.shape[0]
    if torch.is_tensor(t):
        t = t.to(dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        elif t.shape != (B,):
            raise ValueError(f"t must be a scalar or have shape [B]=[{B}], got shape {list(t.shape)}")
        if T is None:
            return t
        check_values(
            lambda: ((t >= 0) & (t <= T * (1 + 1e-6))).all(),
            lambda: f"t must lie in [0, {T}], got values in [{float(t.min()):.4g}, {float(t.max()):.4g}]",
        )
        return t
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"t must be a number or a tensor, got {type(t).__name__}")
    if T is not None and not 0.0 <= t <= T * (1 + 1e-6):  # also rejects NaN
        raise ValueError(f"t must lie in [0, {T}], got {t!r}")
    return torch.full((B,), float(t), dtype=x.dtype, device=x.device)


class SDE:
    """A linear forward SDE ``dx = f(x, t) dt + g(t) dw`` with Gaussian transitions.

    Subclasses implement :meth:`drift`, :meth:`diffusion`, :meth:`marginal_coeffs` and
    :meth:`prior_std`. ``eps`` is the smallest time used in training, sampling and likelihoods:
    a class default that an instance may override (``VPSDE(eps=1e-5)``).
    """

    T: float = 1.0
    eps: float = 1e-5

    def _set_eps(self, eps: Optional[float]) -> None:
        if eps is not None:
            self.eps = check_number("eps", eps, 0.0, self.T, lo_open=True, hi_open=True)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """Drift ``f(x, t)``, shaped like ``x``."""
        raise NotImplementedError

    def diffusion(self, t: Tensor) -> Tensor:
        """Diffusion coefficient ``g(t)``, shape ``[B]``."""
        raise NotImplementedError

    def marginal_coeffs(self, t: Tensor) -> Tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` with ``p(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)``; each ``[B]``."""
        raise NotImplementedError

    def prior_std(self) -> float:
        """Standard deviation of the isotropic Gaussian prior ``p_T`` used for sampling."""
        raise NotImplementedError

    def marginal(self, x0: Tensor, t: Tensor | float) -> Tuple[Tensor, Tensor]:
        """Mean and std of ``p(x_t | x_0)``: ``(alpha_t x0, sigma_t)``, shapes ``x0.shape`` and ``[B]``
        (Song et al. 2021, eqs. 29 (VE), 33 (VP), 34 (sub-VP))."""
        t = batch_time(t, x0, self.T)
        alpha, sigma = self.marginal_coeffs(t)
        return expand(alpha, x0) * x0, sigma

    def perturb(self, x0: Tensor, t: Tensor | float,
                generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Draw ``x_t = alpha_t x0 + sigma_t z``; returns ``(x_t, z, sigma_t)``."""
        mean, sigma = self.marginal(x0, t)
        z = randn_like(x0, generator)
        return mean + expand(sigma, x0) * z, z, sigma

    def sample_time(self, batch_size: int, eps: Optional[float] = None,
                    generator: Optional[torch.Generator] = None, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
        """Times ``t ~ U[eps, T]``, shape ``[batch_size]`` (the training distribution of t)."""
        eps = self.eps if eps is None else check_number("eps", eps, 0.0, self.T, hi_open=True)
        u = torch.rand(batch_size, generator=generator, device=device, dtype=dtype)
        return eps + (self.T - eps) * u

    def prior_sample(self, shape: Sequence[int], generator: Optional[torch.Generator] = None,
                     device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Draw ``x_T ~ N(0, prior_std^2 I)`` of the given shape ``[B, ...]``."""
        z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        return self.prior_std() * z

    def prior_logp(self, z: Tensor) -> Tensor:
        """Log-density of ``z [B, ...]`` under the prior ``N(0, prior_std^2 I)``; shape ``[B]``."""
        check_tensor("z", z)
        d = z[0].numel() if z.shape[0] else 0
        s = self.prior_std()
        sq = z.reshape(z.shape[0], -1).pow(2).sum(1)
        return -0.5 * d * math.log(2 * math.pi * s * s) - sq / (2 * s * s)

    def transition_coeffs(self, t: Tensor, dt: float) -> Tuple[Tensor, Tensor]:
        """``(a, v)`` with ``p(x_t | x_{t-dt}) = N(a x_{t-dt}, v I)``: ``a = alpha_t / alpha_{t-dt}``,
        ``v = sigma_t^2 - a^2 sigma_{t-dt}^2`` (each ``[B]``; ``t`` a ``[B]`` tensor)."""
        alpha_t, sigma_t = self.marginal_coeffs(t)
        alpha_s, sigma_s = self.marginal_coeffs((t - dt).clamp(min=0.0))
        a = alpha_t / alpha_s
        return a, (sigma_t**2 - a**2 * sigma_s**2).clamp(min=0.0)

    def discretize(self, x: Tensor, t: Tensor | float, dt: float) -> Tuple[Tensor, Tensor]:
        """Exact one-step transition from ``t - dt`` to ``t``: ``x_t = x + f + G z``.

        Returns ``(f, G)``: ``f = (a - 1) x`` shaped like ``x`` and ``G = sqrt(v)`` ``[B]``, where
        ``p(x_t | x_{t-dt}) = N(a x, v I)`` (:meth:`transition_coeffs`). For VE this is the SMLD
        noise chain, for VP DDPM's recursion (Song et al. 2021, app. B).
        """
        check_positive("dt", dt)
        a, v = self.transition_coeffs(batch_time(t, x, self.T), dt)
        return (expand(a, x) - 1.0) * x, v.sqrt()

    def reverse_drift(self, score_fn: ScoreFn, x: Tensor, t: Tensor | float, probability_flow: bool = False) -> Tensor:
        """Drift of the reverse-time SDE ``f - g^2 score`` (Anderson 1982; Song et al. eq. 6),
        or of the probability-flow ODE ``f - g^2 score / 2`` (eq. 13). Book: :ref:`sec-sde-reverse`."""
        t = batch_time(t, x, self.T)
        g2 = expand(self.diffusion(t) ** 2, x)
        coef = 0.5 if probability_flow else 1.0
        return self.drift(x, t) - coef * g2 * score_fn(x, t)

    def ode_drift(self, score_fn: ScoreFn, x: Tensor, t: Tensor | float) -> Tensor:
        """Velocity of the probability-flow ODE ``dx/dt = f(x, t) - g(t)^2 score(x, t) / 2``."""
        return self.reverse_drift(score_fn, x, t, probability_flow=True)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class VESDE(SDE):
    """Variance-exploding SDE ``dx = sqrt(d sigma(t)^2 / dt) dw`` (SMLD/NCSN in continuous time).

    ``sigma(t) = sigma_min (sigma_max / sigma_min)^t`` (Song et al. 2021, eq. 30); the exact
    marginal has ``alpha_t = 1``, ``sigma_t^2 = sigma(t)^2 - sigma_min^2``. ``exact_variance=False``
    takes score_sde_pytorch's ``sigma_t = sigma(t)`` (data pre-smoothed by ``N(0, sigma_min^2 I)``),
    which checkpoints imported by :mod:`minisgm.convert` expect. Book: :ref:`sec-sde-ve`,
    :ref:`sec-official-checkpoints`.
    """

    eps = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, exact_variance: bool = True,
                 eps: Optional[float] = None):
        self.sigma_min = check_positive("sigma_min", sigma_min)
        self.sigma_max = check_positive("sigma_max", sigma_max)
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"need sigma_max > sigma_min, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        if not isinstance(exact_variance, bool):
            raise TypeError(f"exact_variance must be a bool, got {type(exact_variance).__name__}")
        self.exact_variance = exact_variance
        self._set_eps(eps)

    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale ``sigma(t) = sigma_min (sigma_max/sigma_min)^t``."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def diffusion(self, t: Tensor) -> Tensor:
        # d sigma^2/dt = 2 sigma^2 log(sigma_max/sigma_min)
        return self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

    def marginal_coeffs(self, t: Tensor) -> Tuple[Tensor, Tensor]:
        if not self.exact_variance:
            return torch.ones_like(t), self.sigma(t)
        return torch.ones_like(t), (self.sigma(t) ** 2 - self.sigma_min**2).clamp(min=0.0).sqrt()

    def prior_std(self) -> float:
        return self.sigma_max


class VPSDE(SDE):
    """Variance-preserving SDE ``dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw`` (DDPM in continuous time).

    ``beta(t) = beta_min + t (beta_max - beta_min)`` (Song et al. 2021, eq. 32);
    ``alpha_t = exp(-t^2 (beta_max - beta_min)/4 - t beta_min / 2)``, ``sigma_t^2 = 1 - alpha_t^2``
    (eq. 33). Book: :ref:`sec-sde-vp`.
    """

    eps = 1e-3

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps: Optional[float] = None):
        self.beta_min = check_positive("beta_min", beta_min)
        self.beta_max = check_positive("beta_max", beta_max)
        if not self.beta_max >= self.beta_min:
            raise ValueError(f"need beta_max >= beta_min, got beta_min={beta_min}, beta_max={beta_max}")
        self._set_eps(eps)

    def beta(self, t: Tensor) -> Tensor:
        """``beta(t) = beta_min + t (beta_max - beta_min)``."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t: Tensor) -> Tensor:
        """``log alpha_t = -int_0^t beta(u) du / 2``."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        return -0.5 * expand(self.beta(t), x) * x

    def diffusion(self, t: Tensor) -> Tensor:
        return self.beta(t).sqrt()

    def marginal_coeffs(self, t: Tensor) -> Tuple[Tensor, Tensor]:
        log_alpha = self.log_mean_coeff(t)
        # 1 - alpha^2 = -expm1(2 log alpha): accurate for small t, where 1 - exp(...) cancels.
        return log_alpha.exp(), (-torch.expm1(2 * log_alpha)).sqrt()

    def prior_std(self) -> float:
        return 1.0

    def ddpm_betas(self, n_steps: int) -> Tensor:
        """The discrete DDPM schedule ``beta_i = beta_min/N + i (beta_max - beta_min) / (N (N-1))``,
        ``i = 0..N-1``: with N = 1000 and the defaults this is Ho et al.'s 1e-4 ... 0.02."""
        i = torch.arange(n_steps, dtype=torch.float64)
        return self.beta_min / n_steps + i * (self.beta_max - self.beta_min) / (n_steps * (n_steps - 1))


class SubVPSDE(VPSDE):
    """Sub-VP SDE ``dx = -beta(t) x / 2 dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw``.

    Same mean as VP; ``sigma_t = 1 - alpha_t^2``, always below the VP std (Song et al. 2021,
    eqs. 11 and 34). Book: :ref:`sec-sde-subvp`.
    """

    def diffusion(self, t: Tensor) -> Tensor:
        # 1 - exp(-2 int beta) = 1 - alpha^4
        return (self.beta(t) * -torch.expm1(4 * self.log_mean_coeff(t))).sqrt()

    def marginal_coeffs(self, t: Tensor) -> Tuple[Tensor, Tensor]:
        log_alpha = self.log_mean_coeff(t)
        return log_alpha.exp(), -torch.expm1(2 * log_alpha)


class RectifiedFlowSDE(SDE):
    """The SDE whose marginals are those of the linear interpolant ``x_t = (1 - t) x_0 + t z`` (flow matching).

    ``alpha_t = 1 - t``, ``sigma_t = t`` (Liu, Gong & Liu 2023; Lipman et al. 2023, optimal-transport
    path): ``f = -x / (1 - t)``, ``g^2 = 2 t / (1 - t)``, and the probability-flow velocity is the
    flow-matching velocity ``E[z - x_0 | x_t = x]``. The drift is singular at ``t = 1``, so ``T`` is a
    little below 1 (default 0.999; the prior ``N(0, T^2 I)`` misses ``0.001 x_0``).
    Book: :ref:`sec-fast-flow-matching`.
    """

    eps = 1e-3

    def __init__(self, T: float = 0.999, eps: Optional[float] = None):
        self.T = check_number("T", T, 0.0, 1.0, lo_open=True, hi_open=True)
        self._set_eps(eps)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        return -x / expand(1 - t, x)

    def diffusion(self, t: Tensor) -> Tensor:
        return (2 * t / (1 - t)).sqrt()

    def marginal_coeffs(self, t: Tensor) -> Tuple[Tensor, Tensor]:
        return 1 - t, t.clone()

    def prior_std(self) -> float:
        return self.T
