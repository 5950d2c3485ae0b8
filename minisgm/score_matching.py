"""Score-matching objectives: explicit, implicit, sliced, denoising, noise-conditional, SDE.

All losses estimate (up to a model-independent constant) a weighted Fisher divergence

    J(theta) = 1/2 E_x || s_theta(x) - grad_x log p(x) ||^2,

so they share one convention: **the squared norm is summed over all data dimensions, carries
the factor 1/2 of the papers, and is averaged over the batch** (``reduction="mean"``, a
scalar). ``reduction="none"`` returns the ``[B]`` per-sample values instead (useful to
measure an estimator's variance). Book: :ref:`sec-score-matching`.

Score models here are callables. The unconditional ones of score matching are ``score(x) -> like
x``; the noise-conditional one of NCSN is ``score(x, sigma[B])`` and the continuous-time
one is ``score(x, t[B])``. An energy model fits the same mould through
:func:`minisgm.ebm.energy_score_fn` (``score = -grad_x E``, differentiable, so it can be
trained; ISM and SSM differentiate it once more).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .sde import SDE, expand, randn_like

__all__ = [
    "esm_loss",
    "ism_loss",
    "ssm_loss",
    "dsm_loss",
    "ncsn_loss",
    "sde_loss",
]

_REDUCTIONS = ("mean", "none")


# ----- validation helpers -----------------------------------------------------------------
def _check_x(x: Tensor) -> Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have shape [B, ...] with B >= 1, got {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    return x


def _check_score(s: Tensor, x: Tensor, what: str = "score_fn(x)") -> Tensor:
    if not torch.is_tensor(s) or s.shape != x.shape:
        got = list(s.shape) if torch.is_tensor(s) else type(s).__name__
        raise ValueError(f"{what} must return a tensor shaped like x {list(x.shape)}, got {got}")
    return s


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {_REDUCTIONS}")


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    return per_sample.mean() if reduction == "mean" else per_sample


def _sq_norm(v: Tensor) -> Tensor:
    """Per-sample squared Euclidean norm ``||v_b||^2`` of ``v [B, ...]``, shape ``[B]``."""
    return v.reshape(v.shape[0], -1).pow(2).sum(1)


def _check_sigma(sigma, x: Tensor) -> Tensor:
    """``sigma`` as a ``[B]`` tensor (scalar broadcast); must be positive and finite."""
    sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sig.dim() == 0:
        sig = sig.expand(x.shape[0])
    elif sig.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape [B]=[{x.shape[0]}], got {list(sig.shape)}")
    if not (torch.isfinite(sig).all() and (sig > 0).all()):
        lo, hi = float(sig.min()), float(sig.max())
        raise ValueError(f"sigma must be positive and finite, got values in [{lo:.4g}, {hi:.4g}]")
    return sig


# ----- score matching (:ref:`sec-score-matching`) -----------------------------------------
def esm_loss(
    score_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    target_score: Tensor | Callable[[Tensor], Tensor],
    reduction: str = "mean",
) -> Tensor:
    """Explicit score matching ``1/2 E || s(x) - grad log p(x) ||^2`` (needs the true score).

    Hyvarinen (2005), eq. (2). Args: ``x [B, ...]``; ``target_score`` a tensor shaped like
    ``x`` or a callable ``x -> like x``. Returns a scalar (or ``[B]`` with
    ``reduction="none"``). Book: :ref:`sec-esm`.
    """
    _check_reduction(reduction)
    x = _check_x(x)
    target = target_score(x) if callable(target_score) else target_score
    _check_score(target, x, "target_score")
    s = _check_score(score_fn(x), x)
    return _reduce(0.5 * _sq_norm(s - target.detach()), reduction)


def ism_loss(score_fn: Callable[[Tensor], Tensor], x: Tensor, reduction: str = "mean") -> Tensor:
    """Implicit score matching ``E[ tr(grad_x s(x)) + 1/2 ||s(x)||^2 ]`` with the exact trace.

    Hyvarinen (2005), Theorem 1: equals the ESM loss minus the model-independent
    constant ``1/2 E ||grad log p||^2``. The Jacobian trace ``sum_i d s_i / d x_i`` costs one
    backward pass per data dimension ``D``, each with ``create_graph=True`` so the loss can be
    trained. ``x [B, ...]`` of any trailing shape. Book: :ref:`sec-ism`.
    """
    _check_reduction(reduction)
    x = _check_x(x)
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


def ssm_loss(
    score_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    n_projections: int = 1,
    variance_reduction: bool = False,
    projection: str = "gaussian",
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
) -> Tensor:
    """Sliced score matching ``E_x E_v [ v^T grad_x s(x) v + 1/2 (v^T s(x))^2 ]``.

    Song, Garg, Shi & Ermon (2019), sec. 3. With ``variance_reduction=True`` the second term
    is replaced by its exact expectation over ``v`` (E[v v^T] = I), giving SSM-VR
    ``E[ v^T J v + 1/2 ||s||^2 ]``. ``v`` is standard Gaussian or Rademacher
    (``projection``); both have ``E[v v^T] = I`` so both are unbiased for ISM. ``v^T J v`` is
    one Jacobian-vector product, i.e. one backward pass for all ``n_projections`` at once
    (``x`` is repeated). The per-sample value averages over the projections.
    Book: :ref:`sec-ssm`.
    """
    _check_reduction(reduction)
    x = _check_x(x)
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


def dsm_loss(
    score_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    sigma: float | Tensor,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
) -> Tensor:
    """Denoising score matching ``1/2 E || s(x + sigma z) + z / sigma ||^2``, ``z ~ N(0, I)``.

    Vincent (2011), the DSM objective: the target ``grad log q(x~|x) = -(x~ - x)/sigma^2 = -z/sigma``.
    Minimised by the score of the noised law ``p_sigma = p * N(0, sigma^2 I)``, not of ``p``.
    ``sigma`` a positive scalar or ``[B]``. Book: :ref:`sec-dsm`.
    """
    _check_reduction(reduction)
    x = _check_x(x)
    sig = expand(_check_sigma(sigma, x), x)
    z = randn_like(x, generator)
    x_tilde = x + sig * z
    s = _check_score(score_fn(x_tilde), x)
    return _reduce(0.5 * _sq_norm(s + z / sig), reduction)


# ----- noise-conditional score networks -----------------------------------------------
def ncsn_loss(
    score_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Sequence[float] | Tensor,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
) -> Tensor:
    """NCSN objective ``1/L sum_i sigma_i^2 * 1/2 E|| s(x~, sigma_i) + z/sigma_i ||^2``.

    Song & Ermon (2019), eqs. (5)-(6) with ``lambda(sigma) = sigma^2``; the sum over levels is
    estimated by one uniformly drawn level per sample, and the weighted term is written
    ``1/2 || sigma s(x + sigma z, sigma) + z ||^2`` (same value, better conditioned).
    ``score_fn(x [B, ...], sigma [B])``. Book: :ref:`sec-ncsn-loss`.
    """
    _check_reduction(reduction)
    x = _check_x(x)
    sig_all = torch.as_tensor(sigmas, dtype=x.dtype, device=x.device)
    if sig_all.dim() != 1 or sig_all.numel() == 0:
        raise ValueError(f"sigmas must be a non-empty 1-D sequence, got shape {list(sig_all.shape)}")
    if not (torch.isfinite(sig_all).all() and (sig_all > 0).all()):
        raise ValueError("sigmas must all be positive and finite")
    gen_device = generator.device if generator is not None else x.device
    idx = torch.randint(0, sig_all.numel(), (x.shape[0],), generator=generator, device=gen_device).to(x.device)
    sigma = sig_all[idx]
    z = randn_like(x, generator)
    sig = expand(sigma, x)
    s = _check_score(score_fn(x + sig * z, sigma), x)
    return _reduce(0.5 * _sq_norm(sig * s + z), reduction)


# ----- continuous time (SDEs) ---------------------------------------------------------
def sde_loss(
    score_fn: Callable[[Tensor, Tensor], Tensor],
    sde: SDE,
    x: Tensor,
    eps: Optional[float] = None,
    likelihood_weighting: bool = False,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
) -> Tensor:
    """Continuous-time DSM ``E_t lambda(t) * 1/2 E|| s(x_t, t) + z / std(t) ||^2``, ``t ~ U[eps, 1]``.

    Song et al. (2021), eq. (7), with ``x_t = m(t) x_0 + std(t) z`` drawn from the SDE's
    Gaussian transition. Default ``lambda(t) = std(t)^2``, written as
    ``1/2 || std(t) s(x_t, t) + z ||^2``; ``likelihood_weighting=True`` uses
    ``lambda(t) = g(t)^2``, which makes the loss an upper bound on the negative
    log-likelihood (Song, Durkan, Murray & Ermon 2021, Theorem 1). ``eps`` defaults to
    ``sde.eps``. ``score_fn(x [B, ...], t [B])``. Book: :ref:`sec-sde-loss`.
    """
    _check_reduction(reduction)
    x = _check_x(x)
    eps = sde.eps if eps is None else eps
    if not (isinstance(eps, (int, float)) and 0 <= eps < sde.T):
        raise ValueError(f"eps must be a number in [0, {sde.T}), got {eps!r}")
    gen_device = generator.device if generator is not None else x.device
    t = sde.sample_time(x.shape[0], eps, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
    z = randn_like(x, generator)
    mean, std = sde.marginal(x, t)
    x_t = mean + expand(std, x) * z
    s = _check_score(score_fn(x_t, t), x)
    if likelihood_weighting:
        g2 = sde.diffusion(t) ** 2
        per_sample = 0.5 * g2 * _sq_norm(s + z / expand(std, x))
    else:
        per_sample = 0.5 * _sq_norm(expand(std, x) * s + z)
    return _reduce(per_sample, reduction)


# ----- flow matching ------------------------------------------------------------------
def flow_matching_loss(
    velocity_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    T: float = 1.0,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
) -> Tensor:
    """Conditional flow matching ``E_{t, x_0, z} || v(x_t, t) - (z - x_0) ||^2``, ``x_t = (1 - t) x_0 + t z``.

    ``t ~ U[0, T]``, ``z ~ N(0, I)``. The regression target ``z - x_0`` is the velocity
    ``d x_t / dt`` of one interpolation path; its conditional mean ``E[z - x_0 | x_t]`` is the
    minimiser, the velocity of an ODE that carries ``N(0, I)`` at ``t = 1`` to the data at ``t = 0``
    (Lipman et al. 2023, eq. 9 with the optimal-transport path; Liu et al. 2023, rectified flow).
    It is the probability-flow ODE of :class:`minisgm.sde.RectifiedFlowSDE`. ``velocity_fn(x [B, ...],
    t [B])``; per-sample squared norm over all non-batch dimensions. Book: :ref:`sec-fast-flow-matching`.
    """
    _check_reduction(reduction)
    x = _check_x(x)
    if not (isinstance(T, (int, float)) and 0 < T <= 1):
        raise ValueError(f"T must be a number in (0, 1], got {T!r}")
    gen_device = generator.device if generator is not None else x.device
    t = (T * torch.rand(x.shape[0], generator=generator, device=gen_device, dtype=x.dtype)).to(x.device)
    z = randn_like(x, generator)
    tt = expand(t, x)
    v = _check_score(velocity_fn((1 - tt) * x + tt * z, t), x, "velocity_fn(x_t, t)")
    return _reduce(_sq_norm(v - (z - x)), reduction)


__all__ += ["flow_matching_loss"]
