"""Exact likelihoods of score-based models through the probability-flow ODE, and bits per dim.

The probability-flow ODE (Song et al. 2021, eq. 13) is a continuous normalising flow, so
``log p_eps(x_eps) = log p_T(x_T) + int_eps^T div_x v(x_t, t) dt`` (Chen et al. 2018, thm. 1),
solved jointly with the ODE (Song et al. 2021, app. D.2). The divergence is exact (one backward
pass per dimension) or Hutchinson's estimate with probes drawn once per solve (Grathwohl et al.
2019, FFJORD). Book: :ref:`sec-likelihood`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .checks import check_choice, check_int, check_number, check_positive, check_tensor
from .samplers import CountedScore, _eps, _finished, _ode_options, solve_ode
from .score_matching import _projections
from .sde import SDE, ScoreFn

__all__ = ["log_likelihood", "divergence_exact", "divergence_hutchinson", "dequantize", "bits_per_dim", "bpd_from_logp"]

_HUTCHINSON = (None, "gaussian", "rademacher")


def divergence_exact(v: Tensor, x: Tensor) -> Tensor:
    """``sum_i d v_i / d x_i`` per sample, ``[B]``: one backward pass per dimension.

    Samples do not interact, so the gradient of ``sum_b v[b, i]`` with respect to ``x`` holds
    row ``i`` of every sample's Jacobian.
    """
    vf = v.reshape(v.shape[0], -1)
    div = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    for i in range(vf.shape[1]):
        (gi,) = torch.autograd.grad(vf[:, i].sum(), x, retain_graph=True)
        div = div + gi.reshape(v.shape[0], -1)[:, i]
    return div


def divergence_hutchinson(v: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    """Hutchinson's ``mean_k u_k^T (dv/dx) u_k`` per sample, ``[B]``; ``probes`` is ``[K, B, ...]``."""
    est = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    for u in probes:
        (uj,) = torch.autograd.grad((v * u).sum(), x, retain_graph=True)  # u^T J, one VJP
        est = est + (uj * u).reshape(v.shape[0], -1).sum(1)
    return est / probes.shape[0]


def log_likelihood(score_fn: ScoreFn, sde: SDE, x: Tensor, *, eps: Optional[float] = None, rtol: float = 1e-5,
                   atol: float = 1e-5, method: str = "dopri5", hutchinson: Optional[str] = None,
                   n_probes: int = 1, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, int]:
    """``log p_eps(x)`` of the model's probability-flow ODE, by the instantaneous change of variables.

    Solves ``d/dt (x_t, delta_t) = (v, div v)`` from ``eps`` (``x_eps = x``, ``delta = 0``) to ``T``,
    then ``log p_eps(x) = prior_logp(x_T) + delta_T`` (Song et al. 2021, eq. 39 / app. D.2).
    ``score_fn`` must be differentiable in ``x``; ``rtol``/``atol`` apply to ``x_t`` and ``delta_t``;
    ``method`` is one of :data:`minisgm.samplers.ODE_METHODS`. ``hutchinson``: None (exact, ``d``
    backward passes per evaluation), ``"gaussian"`` or ``"rademacher"`` (``n_probes`` probes from
    ``generator``; unbiased, variance ``~ 1/n_probes``). Returns ``(logp [B] in nats, detached,
    nfe)``. Book: :ref:`sec-likelihood`.
    """
    check_tensor("x", x, nonempty=True)
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor (dequantize integers first), got {x.dtype}")
    check_choice("hutchinson", hutchinson, _HUTCHINSON)
    check_int("n_probes", n_probes)
    _ode_options(rtol, atol, method, None)
    eps = _eps(sde, eps)
    B = x.shape[0]
    probes = None  # Hutchinson probes are drawn once, before the solve
    if hutchinson is not None:
        probes = _projections((n_probes, *x.shape), hutchinson, generator, x.device, x.dtype)
    score = CountedScore(score_fn, detach=False)  # the divergence differentiates it

    def func(t: Tensor, state: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        xt = state[0]
        # The initial step-size heuristic may probe past T; clamp (see samplers._odeint).
        tb = t.to(xt.dtype).clamp(eps, sde.T).expand(B)
        with torch.enable_grad():
            xt = xt.detach().requires_grad_(True)
            v = sde.ode_drift(score, xt, tb)
            div = divergence_exact(v, xt) if probes is None else divergence_hutchinson(v, xt, probes)
        return v.detach(), div.detach()

    state0 = (x.detach(), torch.zeros(B, dtype=x.dtype, device=x.device))
    x_T, delta_T = solve_ode(func, state0, eps, sde.T, rtol=rtol, atol=atol, method=method, what="log_likelihood")
    logp = sde.prior_logp(x_T) + delta_T
    return _finished(logp[:, None], score.nfe, "log_likelihood")[0][:, 0], score.nfe


def dequantize(x_int: Tensor, n_levels: int, generator: Optional[torch.Generator] = None,
               dtype: Optional[torch.dtype] = None) -> Tensor:
    """Uniform dequantisation ``u = (x_int + U) / n_levels``, ``U ~ U[0, 1)^D``: values in ``[0, 1)``.

    ``x_int [B, ...]``: levels ``0..n_levels-1`` (integers, or floats with integer values). ``dtype``
    defaults to x_int's if floating, else float32. Theis, van den Oord & Bethge (2016); Ho et al.
    (2019, Flow++). Book: :ref:`sec-likelihood-bpd`.
    """
    n_levels = _check_levels(n_levels)
    if not torch.is_tensor(x_int):
        raise TypeError(f"x_int must be a torch.Tensor, got {type(x_int).__name__}")
    if dtype is None:
        dtype = x_int.dtype if x_int.dtype.is_floating_point else torch.float32
    xf = x_int.to(dtype)
    if x_int.numel():
        if x_int.dtype.is_floating_point and not torch.equal(xf, xf.round()):
            raise ValueError("x_int must hold integer levels (got non-integer values)")
        lo, hi = float(xf.min()), float(xf.max())
        if lo < 0 or hi > n_levels - 1:
            raise ValueError(f"x_int must lie in 0..{n_levels - 1} (n_levels={n_levels}), got values in [{lo:g}, {hi:g}]")
    dev = generator.device if generator is not None else x_int.device
    noise = torch.rand(x_int.shape, generator=generator, device=dev, dtype=dtype).to(x_int.device)
    return (xf + noise) / n_levels


def _check_levels(n_levels: int) -> int:
    return check_int("n_levels (17 for sklearn digits, 256 for CIFAR-10)", n_levels, 2)


def bpd_from_logp(logp: Tensor, n_dims: int, n_levels: int, scale: float = 2.0) -> Tensor:
    """Bits per dimension of integer data from the model log-density ``logp = log p_y(y)`` in model space.

    ``bpd = -(log p_y(y) + D log(scale) - D log(n_levels)) / (D ln 2)`` (:func:`bits_per_dim`);
    ``logp`` is ``[B]`` (nats); returns ``[B]``.
    """
    D = check_int("n_dims", n_dims)
    n_levels = _check_levels(n_levels)
    check_positive("scale", scale)
    return -(logp + D * math.log(scale) - D * math.log(n_levels)) / (D * math.log(2))


def bits_per_dim(score_fn: ScoreFn, sde: SDE, x_int: Tensor, n_levels: int, *, scale: float = 2.0,
                 shift: float = -1.0, generator: Optional[torch.Generator] = None,
                 dtype: torch.dtype = torch.float32, eps: Optional[float] = None, rtol: float = 1e-5,
                 atol: float = 1e-5, method: str = "dopri5", hutchinson: Optional[str] = None,
                 n_probes: int = 1) -> Tuple[Tensor, int]:
    """Bits per dimension of integer data ``x_int [B, ...]`` (levels ``0..n_levels-1``) under the model.

    ``x_int`` is dequantised (:func:`dequantize`) to ``u`` in ``[0, 1)^D`` and mapped to the model's
    space ``y = scale u + shift``; by Jensen one draw bounds the code length (in expectation) by
    ``bpd = -(log p_y(y) + D log(scale) - D log(n_levels)) / (D ln 2)``, with ``log p_y`` from
    :func:`log_likelihood` (Song et al. 2021, sec. 4.3, app. D.2). A uniform ``p_u`` gives exactly
    ``log2(n_levels)``. Returns ``(bpd [B], nfe)``. Book: :ref:`sec-likelihood-bpd`.
    """
    check_number("shift", shift)
    check_positive("scale", scale)
    u = dequantize(x_int, n_levels, generator=generator, dtype=dtype)
    y = scale * u + shift
    logp, nfe = log_likelihood(
        score_fn, sde, y, eps=eps, rtol=rtol, atol=atol, method=method,
        hutchinson=hutchinson, n_probes=n_probes, generator=generator,
    )
    return bpd_from_logp(logp, y[0].numel(), n_levels, scale), nfe
