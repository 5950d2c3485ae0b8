"""Score-matching objectives: explicit, implicit, sliced, denoising, noise-conditional, SDE, flow matching.

All losses estimate (up to a model-independent constant) a weighted Fisher divergence
``1/2 E_x || s_theta(x) - grad_x log p(x) ||^2``, with one convention: **the squared norm is
summed over all data dimensions, carries the factor 1/2 of the papers, and is averaged over the
batch** (``reduction="mean"``; ``"none"`` returns the ``[B]`` per-sample values). Score models are
``score(x)``, ``score(x, sigma [B])`` (NCSN) or ``score(x, t [B])`` (SDE); an energy model fits
through :func:`minisgm.ebm.energy_score_fn`. Book: :ref:`sec-score-matching`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .checks import check_choice, check_like, check_positive, check_tensor, check_values
from .sde import SDE, expand, randn_like

__all__ = ["esm_loss", "ism_loss", "ssm_loss", "dsm_loss", "ncsn_loss", "sde_loss", "importance_sample_time",
           "flow_matching_loss"]

_REDUCTIONS = ("mean", "none")


# ----- validation helpers -----------------------------------------------------------------
def _check_x(x: Tensor, reduction: str) -> Tensor:
    check_choice("reduction", reduction, _REDUCTIONS)
    return check_tensor("x", x, floating=True, nonempty=True)


def _check_score(s: Tensor, x: Tensor, what: str = "score_fn(x)") -> Tensor:
    return check_like(what, s, x)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    return per_sample.mean() if reduction == "mean" else per_sample


def _sq_norm(v: Tensor) -> Tensor:
    """Per-sample squared Euclidean norm ``||v_b||^2`` of ``v [B, ...]``, shape ``[B]``."""
    return v.reshape(v.shape[0], -1).pow(2).sum(1)


def _check_sigma(sigma, x: Tensor) -> Tensor:
    """``sigma`` as a ``[B]`` tensor (scalar broadcast); positive and finite (a Python number is
    checked here, a tensor's values in debug mode: :mod:`minisgm.checks`)."""
    if not torch.is_tensor(sigma):
        check_positive("sigma", sigma)
    sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sig.dim() == 0:
        sig = sig.expand(x.shape[0])
    elif sig.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape [B]=[{x.shape[0]}], got {list(sig.shape)}")
    check_values(lambda: (torch.isfinite(sig) & (sig > 0)).all(),
                 lambda: f"sigma must be positive and finite, got values in [{float(sig.min()):.4g}, {float(sig.max()):.4g}]")
    return sig


# ----- score matching (:ref:`sec-score-matching`) -----------------------------------------
def esm_loss(score_fn: Callable[[Tensor], Tensor], x: Tensor,
             target_score: Tensor | Callable[[Tensor], Tensor], reduction: str = "mean") -> Tensor:
    """Explicit score matching ``1/2 E || s(x) - grad log p(x) ||^2`` (needs the true score).

    Hyvarinen (2005), eq. (2). ``target_score``: a tensor shaped like ``x [B, ...]`` or a callable
    ``x -> like x``. Book: :ref:`sec-esm`.
    """
    x = _check_x(x, reduction)
    target = target_score(x) if callable(target_score) else target_score
    _check_score(target, x, "target_score")
    s = _check_score(score_fn(x), x)
    return _reduce(0.5 * _sq_norm(s - target.detach()), reduction)


def ism_loss(score_fn: Callable[[Tensor], Tensor], x: Tensor, reduction: str = "mean") -> Tensor:
    """Implicit score matching ``E[ tr(grad_x s(x)) + 1/2 ||s(x)||^2 ]`` with the exact trace.

    Hyvarinen (2005), Theorem 1: the ESM loss minus the constant ``1/2 E ||grad log p||^2``. The
    trace costs one backward pass per data dimension (``create_graph=True``, so the loss can be
    trained). Book: :ref:`sec-ism`.
    """
    x = _check_x(x, reduction)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        s = _check_score(score_fn(xg), xg)
        B = x.shape[0]
        s_flat = s.reshape(B, -1)
        trace = torch.zeros(B, dtype=s.dtype, device=s.device)
        for i in range(s_flat.shape[1] if s.requires_grad else 0):  # a constant score has J = 0
            # Samples are independent, so d(sum_b s_bi)/dx_b = d s_bi / dx_b: one pass per dim i.
            (g,) = torch.autograd.grad(
                s_flat[:, i].sum(), xg, create_graph=True, allow_unused=True, materialize_grads=True
            )
            trace = trace + g.reshape(B, -1)[:, i]
        per_sample = trace + 0.5 * s_flat.pow(2).sum(1)
    return _reduce(per_sample, reduction)


def _projections(shape, kind: str, generator, device, dtype) -> Tensor:
    gen_device = generator.device if generator is not None else device
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
    if kind == "rademacher":
        bits = torch.randint(0, 2, shape, generator=generator, device=gen_device)
        return (2 * bits - 1).to(device=device, dtype=dtype)
    raise ValueError(f"unknown projection {kind!r}; expected 'gaussian' or 'rademacher'")


def ssm_loss(score_fn: Callable[[Tensor], Tensor], x: Tensor, n_projections: int = 1,
             variance_reduction: bool = False, projection: str = "gaussian",
             generator: Optional[torch.Generator] = None, reduction: str = "mean") -> Tensor:
    """Sliced score matching ``E_x E_v [ v^T grad_x s(x) v + 1/2 (v^T s(x))^2 ]``.

    Song, Garg, Shi & Ermon (2019), sec. 3. ``variance_reduction=True`` takes the second term's
    exact expectation ``1/2 ||s||^2`` (SSM-VR). ``v`` is standard Gaussian or Rademacher
    (``projection``); one backward pass serves all ``n_projections`` (``x`` is repeated), and the
    per-sample value averages over them. Book: :ref:`sec-ssm`.
    """
    x = _check_x(x, reduction)
    if not isinstance(n_projections, int) or isinstance(n_projections, bool) or n_projections < 1:
        raise ValueError(f"n_projections must be a positive int, got {n_projections!r}")
    B = x.shape[0]
    v = _projections((n_projections, *x.shape), projection, generator, x.device, x.dtype)
    v = v.reshape(n_projections * B, *x.shape[1:])
    with torch.enable_grad():
        xr = x.detach().repeat(n_projections, *([1] * (x.dim() - 1))).requires_grad_(True)
        s = _check_score(score_fn(xr), xr)
        vs = (v * s).reshape(xr.shape[0], -1).sum(1)  # v^T s, [P*B]
        if s.requires_grad:
            (jtv,) = torch.autograd.grad(vs.sum(), xr, create_graph=True, allow_unused=True, materialize_grads=True)
        else:  # a score that ignores x has J = 0
            jtv = torch.zeros_like(xr)
        vjv = (v * jtv).reshape(xr.shape[0], -1).sum(1)
        second = 0.5 * _sq_norm(s) if variance_reduction else 0.5 * vs.pow(2)
        per_sample = (vjv + second).reshape(n_projections, B).mean(0)
    return _reduce(per_sample, reduction)


def dsm_loss(score_fn: Callable[[Tensor], Tensor], x: Tensor, sigma: float | Tensor,
             generator: Optional[torch.Generator] = None, reduction: str = "mean") -> Tensor:
    """Denoising score matching ``1/2 E || s(x + sigma z) + z / sigma ||^2``, ``z ~ N(0, I)``.

    Vincent (2011). Minimised by the score of the noised law ``q_sigma = p * N(0, sigma^2 I)``, not
    of ``p``. ``sigma``: a positive scalar or ``[B]``. Book: :ref:`sec-dsm`.
    """
    x = _check_x(x, reduction)
    sig = expand(_check_sigma(sigma, x), x)
    z = randn_like(x, generator)
    x_tilde = x + sig * z
    s = _check_score(score_fn(x_tilde), x)
    return _reduce(0.5 * _sq_norm(s + z / sig), reduction)


# ----- noise-conditional score networks -----------------------------------------------
def ncsn_loss(score_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas: Sequence[float] | Tensor,
              generator: Optional[torch.Generator] = None, reduction: str = "mean") -> Tensor:
    """NCSN objective ``1/L sum_i sigma_i^2 * 1/2 E|| s(x~, sigma_i) + z/sigma_i ||^2``.

    Song & Ermon (2019), eqs. (5)-(6) with ``lambda(sigma) = sigma^2``, one uniformly drawn level per
    sample, written ``1/2 || sigma s(x + sigma z, sigma) + z ||^2`` (same value, better conditioned).
    ``score_fn(x [B, ...], sigma [B])``. Book: :ref:`sec-ncsn-loss`.
    """
    x = _check_x(x, reduction)
    if not torch.is_tensor(sigmas):  # a Python sequence is checked for free
        for v in sigmas:
            check_positive("sigmas (every level)", v)
    sig_all = torch.as_tensor(sigmas, dtype=x.dtype, device=x.device)
    if sig_all.dim() != 1 or sig_all.numel() == 0:
        raise ValueError(f"sigmas must be a non-empty 1-D sequence, got shape {list(sig_all.shape)}")
    check_values(lambda: (torch.isfinite(sig_all) & (sig_all > 0)).all(),
                 lambda: "sigmas must all be positive and finite")
    gen_device = generator.device if generator is not None else x.device
    idx = torch.randint(0, sig_all.numel(), (x.shape[0],), generator=generator, device=gen_device).to(x.device)
    sigma = sig_all[idx]
    z = randn_like(x, generator)
    sig = expand(sigma, x)
    s = _check_score(score_fn(x + sig * z, sigma), x)
    return _reduce(0.5 * _sq_norm(sig * s + z), reduction)


# ----- continuous time (SDEs) ---------------------------------------------------------
_IS_CELLS = 1024  # cells of the inverse-CDF table of the importance-sampling density


def importance_sample_time(
    sde: SDE, batch_size: int, eps: Optional[float] = None, generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
) -> Tuple[Tensor, Tensor]:
    """Times ``t`` on ``[eps, T]`` with density ``q(t)`` proportional to ``g(t)^2 / sigma_t^2``.

    Returns ``(t, q(t))``, each ``[batch_size]``. ``g^2 / sigma^2 = -2 d lambda/dt`` for the log-SNR
    ``lambda_t = log(alpha_t/sigma_t)``, so ``lambda(t)`` is uniform. Its CDF is tabulated on a geometric
    grid (float64) and inverted by linear interpolation; the returned ``q`` is the exact density of that
    interpolant, so dividing by it is unbiased at any resolution. Needs ``eps > 0``. Song, Durkan, Murray
    & Ermon (2021); Kingma, Salimans, Poole & Ho (2021). Book: :ref:`sec-sde-loss-is`.
    """
    eps = sde.eps if eps is None else eps
    if not (isinstance(eps, (int, float)) and 0 < eps < sde.T):
        raise ValueError(f"importance sampling needs eps in (0, {sde.T}), got {eps!r}")
    # float64 keeps log sigma_t accurate where sigma_t^2 = sigma(t)^2 - sigma_min^2 cancels.
    tab = torch.float64 if torch.device(device or "cpu").type != "mps" else torch.float32
    k = torch.arange(_IS_CELLS + 1, device=device, dtype=tab)
    t_grid = eps * (sde.T / eps) ** (k / _IS_CELLS)  # geometric: g^2/s^2 ~ 1/t near t = 0
    t_grid[-1] = sde.T
    m, s = sde.marginal_coeffs(t_grid)
    lam = m.log() - s.log()
    cdf = (lam[0] - lam) / (lam[0] - lam[-1])
    u = torch.rand(batch_size, generator=generator, device=device, dtype=dtype).to(tab)
    i = (torch.searchsorted(cdf, u, right=True) - 1).clamp(0, _IS_CELLS - 1)
    f0, f1 = cdf[i], cdf[i + 1]
    t0, t1 = t_grid[i], t_grid[i + 1]
    density = (f1 - f0) / (t1 - t0)
    t = t0 + (u - f0) / density
    return t.clamp(eps, sde.T).to(dtype), density.to(dtype)


def sde_loss(score_fn: Callable[[Tensor, Tensor], Tensor], sde: SDE, x: Tensor, eps: Optional[float] = None,
             likelihood_weighting: bool = False, generator: Optional[torch.Generator] = None,
             reduction: str = "mean", importance_sampling: bool = False) -> Tensor:
    """Continuous-time DSM ``E_t omega(t) * 1/2 E|| s_theta(x_t, t) + z / sigma_t ||^2``, ``t ~ U[eps, T]``.

    Song et al. (2021), eq. (7). Default ``omega(t) = sigma_t^2``, as ``1/2 || sigma_t s_theta + z ||^2``;
    ``likelihood_weighting=True`` uses ``omega(t) = g(t)^2``: ``(T - eps)`` times the loss bounds
    ``KL(p_eps || p_theta)`` up to a constant (Song, Durkan, Murray & Ermon 2021, Theorem 1).
    ``importance_sampling=True`` (with the likelihood weighting only) draws ``t`` from
    :func:`importance_sample_time` and divides by ``(T - eps) q(t)``: same expectation, much smaller
    variance. ``eps`` defaults to ``sde.eps``. Book: :ref:`sec-sde-loss`, :ref:`sec-sde-loss-is`.
    """
    x = _check_x(x, reduction)
    eps = sde.eps if eps is None else eps
    if not (isinstance(eps, (int, float)) and 0 <= eps < sde.T):
        raise ValueError(f"eps must be a number in [0, {sde.T}), got {eps!r}")
    if importance_sampling and not likelihood_weighting:
        raise ValueError("importance_sampling=True needs likelihood_weighting=True")
    gen_device = generator.device if generator is not None else x.device
    if importance_sampling:
        t, q = importance_sample_time(sde, x.shape[0], eps, generator, gen_device, x.dtype)
        t, q = t.to(x.device), q.to(x.device)
    else:
        t = sde.sample_time(x.shape[0], eps, generator, gen_device, x.dtype).to(x.device)
    x_t, z, sigma = sde.perturb(x, t, generator)
    s = _check_score(score_fn(x_t, t), x)
    std = expand(sigma, x)
    if importance_sampling:
        # 1/2 g^2 ||s + z/sigma||^2 / ((T - eps) q) = 1/2 ||sigma s + z||^2 * weight
        weight = sde.diffusion(t) ** 2 / (sigma**2 * ((sde.T - eps) * q))
        per_sample = 0.5 * weight * _sq_norm(std * s + z)
    elif likelihood_weighting:
        per_sample = 0.5 * sde.diffusion(t) ** 2 * _sq_norm(s + z / std)
    else:
        per_sample = 0.5 * _sq_norm(std * s + z)
    return _reduce(per_sample, reduction)


# ----- flow matching ------------------------------------------------------------------
def flow_matching_loss(velocity_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, T: float = 1.0,
                       generator: Optional[torch.Generator] = None, reduction: str = "mean") -> Tensor:
    """Conditional flow matching ``E_{t, x_0, z} || v(x_t, t) - (z - x_0) ||^2``, ``x_t = (1 - t) x_0 + t z``.

    ``t ~ U[0, T]``, ``z ~ N(0, I)``; no factor 1/2. The minimiser ``E[z - x_0 | x_t]`` is the
    probability-flow velocity of :class:`minisgm.sde.RectifiedFlowSDE` (Lipman et al. 2023, eq. 9,
    optimal-transport path; Liu et al. 2023). Book: :ref:`sec-fast-flow-matching`.
    """
    x = _check_x(x, reduction)
    if not (isinstance(T, (int, float)) and 0 < T <= 1):
        raise ValueError(f"T must be a number in (0, 1], got {T!r}")
    gen_device = generator.device if generator is not None else x.device
    t = (T * torch.rand(x.shape[0], generator=generator, device=gen_device, dtype=x.dtype)).to(x.device)
    z = randn_like(x, generator)
    tt = expand(t, x)
    v = _check_score(velocity_fn((1 - tt) * x + tt * z, t), x, "velocity_fn(x_t, t)")
    return _reduce(_sq_norm(v - (z - x)), reduction)
