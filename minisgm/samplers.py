"""Samplers for score-based models: reverse-SDE, predictor-corrector and probability-flow ODE.

Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole (2021), "Score-Based Generative Modeling
through Stochastic Differential Equations", ICLR (arXiv:2011.13456): Euler-Maruyama on the
reverse SDE (eq. 6), reverse diffusion (eq. 45), ancestral sampling (eqs. 46-47), the
predictor-corrector scheme (Algorithm 1, with the Langevin corrector of Algorithms 4-5) and
the probability-flow ODE (eq. 13). Book: :ref:`sec-samplers`.

Every stochastic sampler shares one signature::

    f(score_fn, sde, shape, n_steps, *, eps=None, generator=None, device=None,
      dtype=torch.float32, x_init=None, denoise=True, callback=None) -> (x, nfe)

and returns the sample ``x`` of the given ``shape`` together with ``nfe``, the number of
score evaluations (each one a batched call ``score_fn(x [B, ...], t [B])``).

Time grid (all fixed-step samplers): ``n_steps + 1`` equally spaced times

    t_i = T - i (T - eps) / n_steps,   i = 0, ..., n_steps,

so ``t_0 = T = 1`` and ``t_N = eps`` (``sde.eps`` unless given). Step ``i`` moves the state
from ``t_i`` to ``t_{i+1}`` with ``dt = (T - eps) / n_steps``; a predictor evaluates the
score at ``t_i``, a corrector at ``t_{i+1}``. The state starts at ``x_{t_0} ~ p_T``
(``sde.prior_sample``) unless ``x_init`` is given. With ``denoise=True`` the noise of the
last update is dropped and its mean returned (e.g. for VE ancestral sampling
``x + (s(t_{N-1})^2 - s(eps)^2) score(x, t_{N-1})``): the usual final denoising, which
removes noise the score can no longer correct (Song et al. 2021, app. G;
Jolicoeur-Martineau et al. 2021).

Samplers only call the SDE's methods (``drift``, ``diffusion``, ``discretize``,
``marginal_coeffs``, ``reverse``, ``prior_sample``), so a new SDE needs no sampler change.
``callback(i, t, x)`` is called after each step ``i`` with the new time ``t`` (a float) and
state ``x``: use it to record trajectories for plots.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .sde import SDE, ScoreFn, batch_time, expand, randn_like

__all__ = [
    "checked_score_fn",
    "time_grid",
    "edm_time_grid",
    "euler_maruyama_step",
    "reverse_diffusion_step",
    "ancestral_step",
    "langevin_corrector_step",
    "euler_maruyama_sample",
    "reverse_diffusion_sample",
    "ancestral_sample",
    "pc_sample",
    "ode_sample",
    "heun_sample",
    "ode_encode",
    "ODE_METHODS",
]

StepFn = Callable[..., Tuple[Tensor, Tensor]]
Callback = Callable[[int, float, Tensor], None]

ODE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
"""Adaptive Runge-Kutta solvers of torchdiffeq accepted by :func:`ode_sample` (``dopri5`` is RK45)."""


# ----- validation and small helpers ---------------------------------------------------------
def _check_shape(shape: Sequence[int]) -> Tuple[int, ...]:
    if isinstance(shape, (int, str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(f"shape must be a sequence of positive ints like (B, d), got {shape!r}")
    shape = tuple(shape)
    if len(shape) == 0 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ValueError(f"shape must be a non-empty sequence of positive ints like (B, d), got {shape!r}")
    return shape


def _check_n_steps(n_steps: int) -> int:
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    return n_steps


def _check_eps(sde: SDE, eps: Optional[float]) -> float:
    eps = sde.eps if eps is None else eps
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0.0 < eps < sde.T:
        raise ValueError(f"eps must be a number in (0, T={sde.T}), got {eps!r}")
    return float(eps)


def _check_tol(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_method(method: str) -> str:
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; choose one of {', '.join(ODE_METHODS)}")
    return method


def checked_score_fn(score_fn: ScoreFn) -> ScoreFn:
    """Wrap ``score_fn`` so that a wrong output shape fails with a clear message.

    The output is detached: a sampler never back-propagates through the trajectory, and
    detaching frees the graph a network builds in grad mode (we do not impose ``no_grad``
    because scores of energy models call autograd inside ``score_fn``).
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable as score_fn(x, t), got {type(score_fn).__name__}")

    def wrapped(x: Tensor, t: Tensor) -> Tensor:
        s = score_fn(x, t)
        if not torch.is_tensor(s) or s.shape != x.shape:
            got = list(s.shape) if torch.is_tensor(s) else type(s).__name__
            raise ValueError(f"score_fn must return a tensor shaped like x {list(x.shape)}, got {got}")
        return s.detach()

    wrapped.__wrapped__ = score_fn  # type: ignore[attr-defined]
    return wrapped


def _initial_state(
    sde: SDE,
    shape: Sequence[int],
    x_init: Optional[Tensor],
    generator: Optional[torch.Generator],
    device,
    dtype: torch.dtype,
) -> Tensor:
    """``x_init`` (cloned; its dtype and device win) or a draw from the prior ``p_T``."""
    shape = _check_shape(shape)
    if x_init is not None:
        if not torch.is_tensor(x_init):
            raise TypeError(f"x_init must be a torch.Tensor, got {type(x_init).__name__}")
        if tuple(x_init.shape) != shape:
            raise ValueError(f"x_init has shape {list(x_init.shape)} but shape={list(shape)}")
        return x_init.detach().clone()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    gen_device = generator.device if generator is not None else device
    x = sde.prior_sample(shape, generator=generator, device=gen_device, dtype=dtype)
    return x.to(device) if device is not None else x


def time_grid(sde: SDE, n_steps: int, eps: Optional[float] = None, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The sampling grid ``t_i = T - i (T - eps)/n_steps``, ``i = 0..n_steps``; shape ``[n_steps + 1]``.

    Computed in float64 and cast, so that ``t_0 = T`` and ``t_N = eps`` exactly.
    """
    n_steps = _check_n_steps(n_steps)
    eps = _check_eps(sde, eps)
    return torch.linspace(sde.T, eps, n_steps + 1, dtype=torch.float64).to(device=device, dtype=dtype)


def edm_time_grid(
    sde: SDE, n_steps: int, rho: float = 7.0, eps: Optional[float] = None, device=None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A grid ``T = t_0 > ... > t_N = eps`` whose noise-to-signal ratios follow Karras et al. (2022), eq. 5.

    With ``sigma(t) = s(t)/m(t)`` (the noise level of ``x_t / m(t)``, increasing in ``t``):
    ``sigma_i = (sigma(T)^(1/rho) + i/N (sigma(eps)^(1/rho) - sigma(T)^(1/rho)))^rho``, and
    ``t_i = sigma^{-1}(sigma_i)`` by bisection, so the grid works for any SDE. ``rho = 7``
    spends most steps at small noise, where the probability-flow ODE bends most; ``rho = 1`` is
    uniform in sigma. Shape ``[n_steps + 1]``. Use with :func:`heun_sample` (``ts=``).
    Book: :ref:`sec-samplers-ode`.
    """
    n_steps = _check_n_steps(n_steps)
    eps = _check_eps(sde, eps)
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not rho > 0:
        raise ValueError(f"rho must be a positive number, got {rho!r}")

    def sigma(t: Tensor) -> Tensor:
        m, s = sde.marginal_coeffs(t)
        return s / m

    ends = sigma(torch.tensor([sde.T, eps], dtype=torch.float64))
    i = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
    target = (ends[0] ** (1 / rho) + i * (ends[1] ** (1 / rho) - ends[0] ** (1 / rho))) ** rho
    lo = torch.full_like(target, eps)
    hi = torch.full_like(target, sde.T)
    for _ in range(100):  # bisection to float64 resolution; sigma is increasing in t
        mid = 0.5 * (lo + hi)
        above = sigma(mid) > target
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid)
    ts = 0.5 * (lo + hi)
    ts[0], ts[-1] = sde.T, eps  # exact end points
    return ts.to(device=device, dtype=dtype)


# ----- predictors: one step from t to t - dt ------------------------------------------------
def euler_maruyama_step(
    score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor | float, dt: float, *, generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor]:
    """One Euler-Maruyama step of the reverse SDE from ``t`` to ``t - dt``.

    ``x_mean = x - [f(x, t) - g(t)^2 score(x, t)] dt``, ``x = x_mean + g(t) sqrt(dt) z``
    (Song et al. 2021, eq. 6 discretised; Kloeden & Platen 1992). Returns ``(x, x_mean)``,
    both shaped like ``x``. Book: :ref:`sec-samplers`.
    """
    t = batch_time(t, x, sde.T)
    rsde = sde.reverse(score_fn)
    x_mean = x - rsde.drift(x, t) * dt
    g = expand(rsde.diffusion(t), x)
    return x_mean + g * math.sqrt(dt) * randn_like(x, generator), x_mean


def reverse_diffusion_step(
    score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor | float, dt: float, *, generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor]:
    """One reverse-diffusion step from ``t`` to ``t - dt`` (Song et al. 2021, eq. 45).

    With ``(f, G)`` the SDE's exact forward transition into ``t`` (``sde.discretize``):
    ``x_mean = x - f + G^2 score(x, t)``, ``x = x_mean + G z``. For VE this is SMLD's
    ``x + (sigma_i^2 - sigma_{i-1}^2) score + ...``; for VP it is ``(2 - sqrt(1 - beta)) x + beta score``,
    which agrees with DDPM's ancestral step to first order in ``beta``. Returns ``(x, x_mean)``.
    Book: :ref:`sec-samplers`.
    """
    t = batch_time(t, x, sde.T)
    rev_f, G = sde.reverse(score_fn).discretize(x, t, dt)
    x_mean = x - rev_f
    return x_mean + expand(G, x) * randn_like(x, generator), x_mean


def ancestral_step(
    score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor | float, dt: float, *, generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor]:
    """One ancestral step: sample the Gaussian posterior ``q(x_s | x_t, x_0 = x0_hat)``, ``s = t - dt``.

    With ``(m_t, s_t)``, ``(m_s, s_s)`` the marginal coefficients, the forward transition is
    ``x_t | x_s ~ N(a x_s, v I)``, ``a = m_t / m_s``, ``v = s_t^2 - a^2 s_s^2``. The posterior of
    ``x_s`` given ``x_t`` and ``x_0`` has variance ``v s_s^2 / s_t^2`` and mean
    ``(a s_s^2 x_t + m_s v x_0) / s_t^2``. Plugging in Tweedie's estimate
    ``x0_hat = (x_t + s_t^2 score(x_t, t)) / m_t`` the mean simplifies to

        x_mean = (x_t + v score(x_t, t)) / a.

    For VE (``a = 1``, ``v = sigma_t^2 - sigma_s^2``) this is SMLD's ancestral step (Song et al.
    2021, eq. 47); for VP (``a = sqrt(1 - beta)``, ``v = beta``) it is DDPM's
    ``(x + beta score) / sqrt(1 - beta)`` with the posterior variance
    ``beta (1 - alphabar_s) / (1 - alphabar_t)`` (Ho et al. 2020, eqs. 7 and 11). Returns
    ``(x, x_mean)``. Book: :ref:`sec-samplers`.
    """
    t = batch_time(t, x, sde.T)
    s = (t - dt).clamp(min=0.0)
    m_t, std_t = sde.marginal_coeffs(t)
    m_s, std_s = sde.marginal_coeffs(s)
    a = m_t / m_s
    v = (std_t**2 - a**2 * std_s**2).clamp(min=0.0)
    x_mean = (x + expand(v, x) * score_fn(x, t)) / expand(a, x)
    post_std = (v * std_s**2 / std_t**2).sqrt()
    return x_mean + expand(post_std, x) * randn_like(x, generator), x_mean


# ----- corrector ----------------------------------------------------------------------------
def langevin_corrector_step(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    t: Tensor | float,
    *,
    snr: float = 0.16,
    generator: Optional[torch.Generator] = None,
    per_sample: bool = False,
) -> Tuple[Tensor, Tensor]:
    """One Langevin MCMC step targeting ``p_t`` with the signal-to-noise step-size rule.

    ``x_mean = x + e score(x, t)``, ``x = x_mean + sqrt(2 e) z`` with

        e = 2 (snr ||z|| / ||score(x, t)||)^2,

    so that the ratio of the drift ``e ||score||`` to the noise ``sqrt(2 e) ||z||`` is ``snr``
    whatever the scale of ``p_t`` (Song et al. 2021, Algorithms 4-5; norms over all non-batch
    dimensions). By default (``per_sample=False``) ``||z||`` and ``||score||`` are averaged
    over the batch, as in score_sde, giving one step size for all samples. With
    ``per_sample=True`` each sample gets its own ``e``: batch-independent, and fine in high
    dimension where ``||score||`` concentrates, but in 2-D a sample near a mode has
    ``||score|| ~ 0`` and gets a huge step (tests and ``benchmarks/samplers_vs_nfe.py`` show
    the collapse). Unlike score_sde's VP corrector there is no ``alpha_i`` factor, so the rule
    is the same for every SDE. Returns ``(x, x_mean)``. Book: :ref:`sec-samplers-pc`.
    """
    if not isinstance(snr, (int, float)) or isinstance(snr, bool) or not snr > 0:
        raise ValueError(f"snr must be a positive number, got {snr!r}")
    t = batch_time(t, x, sde.T)
    score = score_fn(x, t)
    z = randn_like(x, generator)
    z_norm = z.reshape(x.shape[0], -1).norm(dim=1)
    s_norm = score.reshape(x.shape[0], -1).norm(dim=1)
    if not per_sample:
        z_norm, s_norm = z_norm.mean().expand_as(z_norm), s_norm.mean().expand_as(s_norm)
    s_norm = s_norm.clamp(min=torch.finfo(x.dtype).tiny ** 0.5)
    step = 2 * (snr * z_norm / s_norm) ** 2
    x_mean = x + expand(step, x) * score
    return x_mean + expand((2 * step).sqrt(), x) * z, x_mean


# ----- fixed-step stochastic samplers -------------------------------------------------------
def _predictor_loop(
    step_fn: StepFn,
    score_fn: ScoreFn,
    sde: SDE,
    shape: Sequence[int],
    n_steps: int,
    eps: Optional[float],
    generator: Optional[torch.Generator],
    device,
    dtype: torch.dtype,
    x_init: Optional[Tensor],
    denoise: bool,
    callback: Optional[Callback],
) -> Tuple[Tensor, int]:
    return pc_sample(
        score_fn, sde, shape, n_steps, eps=eps, generator=generator, device=device, dtype=dtype,
        x_init=x_init, denoise=denoise, callback=callback, predictor=step_fn, corrector=None,
    )


def euler_maruyama_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape: Sequence[int],
    n_steps: int,
    *,
    eps: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    x_init: Optional[Tensor] = None,
    denoise: bool = True,
    callback: Optional[Callback] = None,
) -> Tuple[Tensor, int]:
    """Sample by Euler-Maruyama on the reverse SDE (:func:`euler_maruyama_step`); ``nfe = n_steps``."""
    return _predictor_loop(euler_maruyama_step, score_fn, sde, shape, n_steps, eps, generator, device, dtype, x_init, denoise, callback)


def reverse_diffusion_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape: Sequence[int],
    n_steps: int,
    *,
    eps: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    x_init: Optional[Tensor] = None,
    denoise: bool = True,
    callback: Optional[Callback] = None,
) -> Tuple[Tensor, int]:
    """Sample with the reverse-diffusion predictor (:func:`reverse_diffusion_step`); ``nfe = n_steps``."""
    return _predictor_loop(reverse_diffusion_step, score_fn, sde, shape, n_steps, eps, generator, device, dtype, x_init, denoise, callback)


def ancestral_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape: Sequence[int],
    n_steps: int,
    *,
    eps: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    x_init: Optional[Tensor] = None,
    denoise: bool = True,
    callback: Optional[Callback] = None,
) -> Tuple[Tensor, int]:
    """Ancestral sampling (:func:`ancestral_step`: DDPM for VP, SMLD for VE); ``nfe = n_steps``."""
    return _predictor_loop(ancestral_step, score_fn, sde, shape, n_steps, eps, generator, device, dtype, x_init, denoise, callback)


def pc_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape: Sequence[int],
    n_steps: int,
    *,
    eps: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    x_init: Optional[Tensor] = None,
    denoise: bool = True,
    callback: Optional[Callback] = None,
    predictor: Optional[StepFn] = reverse_diffusion_step,
    corrector: Optional[StepFn] = langevin_corrector_step,
    snr: float = 0.16,
    n_corrector_steps: int = 1,
) -> Tuple[Tensor, int]:
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 1).

    For ``i = 0..n_steps-1``: the predictor moves ``x`` from ``t_i`` to ``t_{i+1}``, then
    ``n_corrector_steps`` corrector steps (Langevin MCMC targeting ``p_{t_{i+1}}``) refine it.
    ``predictor=None`` gives corrector-only sampling, i.e. annealed Langevin dynamics
    (Song & Ermon 2019) on the continuous noise schedule ``t_1 > ... > t_N = eps``;
    ``corrector=None`` gives the predictor alone. With ``denoise=True`` the returned ``x`` is
    the mean of the very last update (its noise dropped).

    Args:
        predictor: ``step(score_fn, sde, x, t, dt, generator=...) -> (x, x_mean)``.
        corrector: ``step(score_fn, sde, x, t, snr=..., generator=...) -> (x, x_mean)``.
        snr: signal-to-noise ratio passed to the corrector.
        n_corrector_steps: corrector steps per time step (``>= 1`` when a corrector is given).

    Returns:
        ``(x, nfe)`` with ``x`` of ``shape`` and ``nfe = n_steps * (1 + n_corrector_steps)``
        (predictor and corrector both present). Book: :ref:`sec-samplers-pc`.
    """
    n_steps = _check_n_steps(n_steps)
    if predictor is None and corrector is None:
        raise ValueError("pc_sample needs a predictor, a corrector or both; got neither")
    if corrector is not None:
        if not isinstance(n_corrector_steps, int) or isinstance(n_corrector_steps, bool) or n_corrector_steps < 1:
            raise ValueError(f"n_corrector_steps must be a positive int, got {n_corrector_steps!r}")
    score_fn = checked_score_fn(score_fn)
    x = _initial_state(sde, shape, x_init, generator, device, dtype)
    ts = time_grid(sde, n_steps, eps, dtype=torch.float64).tolist()
    dt = (sde.T - ts[-1]) / n_steps
    nfe = 0
    x_mean = x
    for i in range(n_steps):
        if predictor is not None:
            x, x_mean = predictor(score_fn, sde, x, ts[i], dt, generator=generator)
            nfe += 1
        if corrector is not None:
            for _ in range(n_corrector_steps):
                x, x_mean = corrector(score_fn, sde, x, ts[i + 1], snr=snr, generator=generator)
                nfe += 1
        if callback is not None:
            callback(i, ts[i + 1], x)
    return (x_mean if denoise else x), nfe


# ----- probability-flow ODE -----------------------------------------------------------------
def _ode_func(score_fn: ScoreFn, sde: SDE, counter: list, callback: Optional[Callback], t_lo: float, t_hi: float):
    """The probability-flow velocity ``dx/dt = f - g^2 score / 2`` as ``func(t, x)``, counting calls."""

    def func(t: Tensor, x: Tensor) -> Tensor:
        counter[0] += 1
        # The solver's initial step-size heuristic may probe one trial time beyond [eps, T];
        # clamping only affects that estimate (later steps are forced to end exactly at t1).
        t = t.to(x.dtype).clamp(t_lo, t_hi)
        v = sde.ode_drift(score_fn, x, t.expand(x.shape[0]))
        if callback is not None:
            callback(counter[0] - 1, float(t), x)
        return v

    return func


def _odeint(func, x: Tensor, t0: float, t1: float, rtol: float, atol: float, method: str) -> Tensor:
    from torchdiffeq import odeint  # imported here: the rest of the module does not need it

    ts = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
    # torchdiffeq steps past the end and interpolates back; forcing a step onto t1 keeps every
    # evaluation inside [eps, T], where the score (and for VE the marginal) is defined.
    options = {"step_t": ts[1:]}
    return odeint(func, x, ts, rtol=rtol, atol=atol, method=method, options=options)[-1]


def ode_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape: Sequence[int],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    eps: Optional[float] = None,
    x_init: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    callback: Optional[Callback] = None,
) -> Tuple[Tensor, int]:
    """Sample by integrating the probability-flow ODE from ``T`` down to ``eps`` with an adaptive solver.

    ``dx/dt = f(x, t) - g(t)^2 score(x, t) / 2`` (Song et al. 2021, eq. 13), solved by
    torchdiffeq (``dopri5`` = Dormand-Prince RK45) from ``x_T ~ p_T`` (or ``x_init``). The
    only randomness is the prior draw. ``nfe`` counts velocity evaluations (one score call
    each), including the solver's initial step-size selection; ``callback(i, t, x)`` sees
    every evaluation, rejected trial steps included. Book: :ref:`sec-samplers-ode`.
    """
    rtol, atol = _check_tol("rtol", rtol), _check_tol("atol", atol)
    method = _check_method(method)
    eps = _check_eps(sde, eps)
    score_fn = checked_score_fn(score_fn)
    x = _initial_state(sde, shape, x_init, generator, device, dtype)
    counter = [0]
    x = _odeint(_ode_func(score_fn, sde, counter, callback, eps, sde.T), x, sde.T, eps, rtol, atol, method)
    return x, counter[0]


def ode_encode(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    eps: Optional[float] = None,
) -> Tuple[Tensor, int]:
    """Encode data into the latent ``z = x_T`` by integrating the probability-flow ODE from ``eps`` to ``T``.

    The inverse of :func:`ode_sample` (up to solver error): ``ode_sample(..., x_init=z)``
    reconstructs ``x``; interpolating latents gives interpolations of data (Song et al.
    2021, sec. 4.3). ``x`` is ``[B, ...]``; returns ``(z, nfe)`` with ``z`` shaped like ``x``.
    Book: :ref:`sec-samplers-ode`.
    """
    if not torch.is_tensor(x) or x.dim() < 1:
        raise TypeError("x must be a torch.Tensor of shape [B, ...]")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    rtol, atol = _check_tol("rtol", rtol), _check_tol("atol", atol)
    method = _check_method(method)
    eps = _check_eps(sde, eps)
    score_fn = checked_score_fn(score_fn)
    counter = [0]
    z = _odeint(_ode_func(score_fn, sde, counter, None, eps, sde.T), x.detach(), eps, sde.T, rtol, atol, method)
    return z, counter[0]


def _check_grid(sde: SDE, n_steps: int, eps: Optional[float], ts) -> list:
    """The default uniform grid, or ``ts`` checked: ``n_steps + 1`` strictly decreasing times in ``[eps, T]``."""
    if ts is None:
        return time_grid(sde, n_steps, eps, dtype=torch.float64).tolist()
    grid = torch.as_tensor(ts, dtype=torch.float64).flatten().tolist()
    if len(grid) != n_steps + 1:
        raise ValueError(f"ts must hold n_steps + 1 = {n_steps + 1} times, got {len(grid)}")
    lo = _check_eps(sde, eps)
    if any(b >= a for a, b in zip(grid, grid[1:])) or grid[-1] < lo * (1 - 1e-6) or grid[0] > sde.T:
        raise ValueError(f"ts must decrease strictly from at most T={sde.T} to at least eps={lo}, got {grid[0]:.4g} ... {grid[-1]:.4g}")
    return grid


def heun_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape: Sequence[int],
    n_steps: int,
    *,
    eps: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    x_init: Optional[Tensor] = None,
    denoise: bool = True,
    callback: Optional[Callback] = None,
    ts: Optional[Sequence[float] | Tensor] = None,
) -> Tuple[Tensor, int]:
    """Fixed-step Heun (2nd-order, explicit trapezoidal) integration of the probability-flow ODE.

    On the grid ``t_i`` (the uniform :func:`time_grid` unless ``ts`` gives another decreasing
    grid of ``n_steps + 1`` times from ``T`` to ``eps``, such as :func:`edm_time_grid`), with
    ``v(x, t) = f - g^2 score / 2``: ``d_i = v(x_i, t_i)``, ``x' = x_i + (t_{i+1} - t_i) d_i``,
    ``x_{i+1} = x_i + (t_{i+1} - t_i) (d_i + v(x', t_{i+1})) / 2``, so ``nfe = 2 n_steps``.
    Every step is a Heun step, the last one too: Karras et al. (2022, Algorithm 1) end with
    an Euler step only because their last time has zero noise, where the velocity is not
    needed; here ``t_N = eps > 0`` and a final Euler step would be the largest single error
    at low NFE. ``denoise`` is accepted for the shared signature; an ODE step adds no noise,
    so it has no effect. Book: :ref:`sec-samplers-ode`.
    """
    n_steps = _check_n_steps(n_steps)
    ts = _check_grid(sde, n_steps, eps, ts)
    score_fn = checked_score_fn(score_fn)
    x = _initial_state(sde, shape, x_init, generator, device, dtype)
    nfe = 0
    for i in range(n_steps):
        t, t_next = ts[i], ts[i + 1]
        h = t_next - t  # negative: we integrate backwards in time
        d = sde.ode_drift(score_fn, x, t)
        d_next = sde.ode_drift(score_fn, x + h * d, t_next)
        nfe += 2
        x = x + h * 0.5 * (d + d_next)
        if callback is not None:
            callback(i, t_next, x)
    return x, nfe
