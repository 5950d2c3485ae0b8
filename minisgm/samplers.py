"""Samplers for score-based models: reverse-SDE, predictor-corrector and probability-flow ODE.

Song et al. (2021), "Score-Based Generative Modeling through SDEs" (arXiv:2011.13456), eqs. 6,
13, 45-47 and Algorithms 1, 4-5. Book: :ref:`sec-samplers`, :ref:`sec-samplers-ode`.

Every sampler is ``f(score_fn, sde, shape, n_steps, *, eps, ts, generator, device, dtype, x_init,
denoise, callback, **options) -> (x, nfe)``, ``nfe`` counting batched calls ``score_fn(x, t [B])``.
Fixed-step samplers run ``update(x, t, t_next) -> (x, x_mean)`` in :func:`sample_loop` over a grid
``T = t_0 > ... > t_N = eps`` (uniform, or ``ts``) from a prior draw or ``x_init``; ``denoise=True``
returns the last update's mean; ``callback(i, t, x)`` sees the state after each step. The loops
never read a tensor back to the host (a GPU would stall): non-finite samples are found once, after
(:class:`NonFiniteSampleError`). Samplers only call the SDE's methods: a new SDE needs no change.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .checks import check_callable, check_choice, check_int, check_like, check_number, check_positive, check_shape, check_tensor
from .sde import SDE, ScoreFn, batch_time, expand, randn_like

__all__ = ["NonFiniteSampleError", "CountedScore", "time_grid", "edm_time_grid", "sample_loop",
           "euler_maruyama_step", "reverse_diffusion_step", "ancestral_step", "langevin_corrector_step",
           "pc_update", "euler_maruyama_sample", "reverse_diffusion_sample", "ancestral_sample", "pc_sample",
           "heun_sample", "ode_sample", "ode_encode", "solve_ode", "ODE_METHODS", "lambda_time_grid", "soft_lambda_grid",
           "ddim_sample", "dpm_solver_orders", "dpm_solver_sample", "edm_sample"]

StepFn = Callable[..., Tuple[Tensor, Tensor]]
Update = Callable[[Tensor, float, float], Tuple[Tensor, Tensor]]
Callback = Callable[[int, float, Tensor], None]

ODE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
"""Adaptive Runge-Kutta solvers of torchdiffeq accepted by :func:`ode_sample` (``dopri5`` is RK45)."""
_SHORT_GRID = 15
"""Below this many steps the fast samplers' default grid spans [0.03, 60], not [0.002, 80], and the
multistep solver takes a first-order last step across that grid's tail (measured together)."""
_THIRD_ORDER_NSR = 3.0
"""DPM-Solver++'s default multistep form takes third-order steps only from ``sigma/alpha`` at most this."""
_CORRECTOR_STEPS = 15
"""From this many steps DPM-Solver++'s default multistep form corrects every step (UniPC-style)."""
_GAUSSIAN_STD = 0.1
"""From ``_SHORT_GRID`` steps DPM-Solver++'s default takes its linear part from Gaussian data of this std."""
_SOFT_SIGMA = 0.03
"""From ``_SHORT_GRID`` steps DPM-Solver++'s default grid thins out smoothly below this ``sigma/alpha``."""


class NonFiniteSampleError(FloatingPointError):
    """A sampler produced NaN or infinite values (the score model returned them)."""


# ----- the score model, counted -------------------------------------------------------------
class CountedScore:
    """``score_fn`` with its output checked (shaped like ``x``), counted (``nfe``) and detached.

    Detached unless ``detach=False`` (the likelihood keeps the graph for a divergence); samplers do
    not impose ``no_grad``, since scores of energy models call autograd.
    """

    def __init__(self, score_fn: ScoreFn, detach: bool = True):
        self.score_fn = check_callable("score_fn", score_fn, "score_fn(x, t)")
        self.detach = detach
        self.nfe = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        s = check_like("score_fn", self.score_fn(x, t), x)
        return s.detach() if self.detach else s


# ----- time grids ---------------------------------------------------------------------------
def _eps(sde: SDE, eps: Optional[float]) -> float:
    eps = sde.eps if eps is None else eps
    return check_number("eps", eps, 0.0, sde.T, lo_open=True, hi_open=True)


def time_grid(sde: SDE, n_steps: int, eps: Optional[float] = None, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The uniform sampling grid ``t_i = T - i (T - eps)/n_steps``, ``i = 0..n_steps``; shape ``[n_steps + 1]``.
    Computed in float64 and cast, so that ``t_0 = T`` and ``t_N = eps`` exactly."""
    n_steps = check_int("n_steps", n_steps)
    return torch.linspace(sde.T, _eps(sde, eps), n_steps + 1, dtype=torch.float64).to(device=device, dtype=dtype)


def _noise_to_signal(sde: SDE, t: Tensor) -> Tensor:
    alpha, sigma = sde.marginal_coeffs(t)
    return sigma / alpha


def _times_of_noise_to_signal(sde: SDE, target: Tensor, lo: float, hi: float) -> Tensor:
    """Times ``t`` in ``[lo, hi]`` with ``sigma_t / alpha_t = target`` (float64 bisection; the ratio
    increases with t). Values outside the range end at its ends."""
    lo_t, hi_t = torch.full_like(target, lo), torch.full_like(target, hi)
    for _ in range(100):  # halves the bracket 100 times: float64 resolution
        mid = 0.5 * (lo_t + hi_t)
        above = _noise_to_signal(sde, mid) > target
        hi_t = torch.where(above, mid, hi_t)
        lo_t = torch.where(above, lo_t, mid)
    return 0.5 * (lo_t + hi_t)


def _grid_of_noise_to_signal(sde: SDE, nsr: Tensor, eps: float, device, dtype: torch.dtype) -> Tensor:
    """The times of the decreasing ``sigma/alpha`` values ``nsr`` (float64), with the exact end points
    ``T`` and ``eps``: the last step of every ``*_time_grid``."""
    ts = _times_of_noise_to_signal(sde, nsr, eps, sde.T)
    ts[0], ts[-1] = sde.T, eps  # exact end points
    return ts.to(device=device, dtype=dtype)


def edm_time_grid(
    sde: SDE, n_steps: int, rho: float = 7.0, eps: Optional[float] = None, device=None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A grid ``T = t_0 > ... > t_N = eps`` whose noise-to-signal ratios follow Karras et al. (2022), eq. 5.

    ``sigma_i = (sigma(T)^(1/rho) + i/N (sigma(eps)^(1/rho) - sigma(T)^(1/rho)))^rho`` with
    ``sigma(t) = sigma_t / alpha_t``, inverted by bisection (any SDE). ``rho = 7`` spends most steps
    at small noise, ``rho = 1`` is uniform in sigma. Shape ``[n_steps + 1]``; pass it as ``ts=``.
    Book: :ref:`sec-samplers-ode`.
    """
    n_steps = check_int("n_steps", n_steps)
    eps = _eps(sde, eps)
    rho = check_positive("rho", rho)
    ends = _noise_to_signal(sde, torch.tensor([sde.T, eps], dtype=torch.float64))
    i = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
    target = (ends[0] ** (1 / rho) + i * (ends[1] ** (1 / rho) - ends[0] ** (1 / rho))) ** rho
    return _grid_of_noise_to_signal(sde, target, eps, device, dtype)


def _grid(sde: SDE, n_steps: int, eps: Optional[float], ts) -> List[float]:
    """The grid as Python floats: the uniform one, or ``ts`` checked (``n_steps + 1`` strictly
    decreasing times from at most ``T`` to at least ``eps``)."""
    n_steps = check_int("n_steps", n_steps)
    lo = _eps(sde, eps)
    if ts is None:
        return [sde.T - i * (sde.T - lo) / n_steps for i in range(n_steps)] + [lo]
    grid = [float(v) for v in (ts.detach().cpu().double().flatten() if torch.is_tensor(ts) else ts)]
    if len(grid) != n_steps + 1:
        raise ValueError(f"ts must hold n_steps + 1 = {n_steps + 1} times, got {len(grid)}")
    if any(not b < a for a, b in zip(grid, grid[1:])) or grid[-1] < lo * (1 - 1e-6) or grid[0] > sde.T:
        raise ValueError(f"ts must decrease strictly from at most T={sde.T} to at least eps={lo}, got {grid[0]:.4g} ... {grid[-1]:.4g}")
    return grid


# ----- start, loop, finish ------------------------------------------------------------------
def _initial_state(sde: SDE, shape, x_init: Optional[Tensor], generator, device, dtype: torch.dtype) -> Tensor:
    """``x_init`` (cloned; its dtype and device win) or a draw from the prior ``p_T``."""
    shape = check_shape(shape)
    if x_init is not None:
        check_tensor("x_init", x_init, floating=True)
        if tuple(x_init.shape) != shape:
            raise ValueError(f"x_init has shape {list(x_init.shape)} but shape={list(shape)}")
        return x_init.detach().clone()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    gen_device = generator.device if generator is not None else device
    x = sde.prior_sample(shape, generator=generator, device=gen_device, dtype=dtype)
    return x.to(device) if device is not None else x


def sample_loop(update: Update, x: Tensor, ts: Sequence[float], callback: Optional[Callback] = None) -> Tuple[Tensor, Tensor]:
    """The loop every fixed-step sampler runs: ``x, x_mean = update(x, t_i, t_{i+1})`` for ``i = 0..N-1``.
    ``ts``: Python floats ``t_0 > ... > t_N``; ``callback(i, t_{i+1}, x)`` after each step; returns the
    final ``(x, x_mean)``. Book: :ref:`sec-samplers`."""
    x_mean = x
    for i in range(len(ts) - 1):
        x, x_mean = update(x, ts[i], ts[i + 1])
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x, x_mean


def _finished(x: Tensor, nfe: int, what: str) -> Tuple[Tensor, int]:
    """``(x, nfe)`` after one check, outside the loop, that every value is finite."""
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    n_bad = int(bad.sum())  # the one host read of a sampler, after its loop
    if n_bad:
        raise NonFiniteSampleError(
            f"{what}: {n_bad} of {x.shape[0]} samples hold NaN or infinite values; the score model "
            "returned non-finite values (check the checkpoint's weights, or run with MINISGM_DEBUG=1)"
        )
    return x, nfe


# ----- predictors: one step from t to t - dt ------------------------------------------------
def euler_maruyama_step(
    score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor | float, dt: float, *, generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor]:
    """One Euler-Maruyama step of the reverse SDE from ``t`` to ``t - dt``.

    ``x_mean = x - [f(x, t) - g(t)^2 score(x, t)] dt``, ``x = x_mean + g(t) sqrt(dt) z`` (Song et al.
    2021, eq. 6; Kloeden & Platen 1992). Returns ``(x, x_mean)``. Book: :ref:`sec-samplers`.
    """
    t = batch_time(t, x, sde.T)
    x_mean = x - sde.reverse_drift(score_fn, x, t) * dt
    g = expand(sde.diffusion(t), x)
    return x_mean + g * math.sqrt(dt) * randn_like(x, generator), x_mean


def reverse_diffusion_step(
    score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor | float, dt: float, *, generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor]:
    """One reverse-diffusion step from ``t`` to ``t - dt`` (Song et al. 2021, eq. 45).

    With ``(f, G)`` the SDE's exact forward transition into ``t`` (``sde.discretize``):
    ``x_mean = x - f + G^2 score(x, t)``, ``x = x_mean + G z``: SMLD's step for VE, DDPM's to first
    order in ``beta`` for VP. Returns ``(x, x_mean)``. Book: :ref:`sec-samplers`.
    """
    t = batch_time(t, x, sde.T)
    f, G = sde.discretize(x, t, dt)
    G = expand(G, x)
    x_mean = x - f + G**2 * score_fn(x, t)
    return x_mean + G * randn_like(x, generator), x_mean


def ancestral_step(
    score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor | float, dt: float, *, generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor]:
    """One ancestral step: sample the Gaussian posterior ``q(x_s | x_t, x_0 = x0_hat)``, ``s = t - dt``.

    With the forward transition ``x_t | x_s ~ N(a x_s, v I)`` (``sde.transition_coeffs``) and
    Tweedie's ``x0_hat``, its mean is ``x_mean = (x_t + v score(x_t, t)) / a``, its variance
    ``v sigma_s^2 / sigma_t^2``: SMLD's ancestral step for VE (Song et al. 2021, eq. 47), DDPM's for
    VP (Ho et al. 2020, eqs. 7 and 11). Returns ``(x, x_mean)``. Book: :ref:`sec-samplers`.
    """
    t = batch_time(t, x, sde.T)
    a, v = sde.transition_coeffs(t, dt)
    sigma_t2 = sde.marginal_coeffs(t)[1] ** 2
    x_mean = (x + expand(v, x) * score_fn(x, t)) / expand(a, x)
    post_var = v * (sigma_t2 - v).clamp(min=0.0) / (a**2 * sigma_t2)  # v sigma_s^2 / sigma_t^2
    return x_mean + expand(post_var.sqrt(), x) * randn_like(x, generator), x_mean


# ----- corrector ----------------------------------------------------------------------------
def langevin_corrector_step(
    score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor | float, *, snr: float = 0.16,
    generator: Optional[torch.Generator] = None, per_sample: bool = False,
) -> Tuple[Tensor, Tensor]:
    """One Langevin MCMC step targeting ``p_t`` with the signal-to-noise step-size rule.

    ``x_mean = x + h score``, ``x = x_mean + sqrt(2 h) z``, ``h = 2 (snr ||z|| / ||score||)^2`` (Song
    et al. 2021, Algorithms 4-5; norms over the non-batch dimensions, averaged over the batch as in
    score_sde). With ``per_sample=True`` each sample has its own ``h``: batch-independent, but in 2-D
    a sample near a mode (``||score|| ~ 0``) takes a huge step. No VP ``alpha_i`` factor: the rule is
    the same for every SDE. Returns ``(x, x_mean)``. Book: :ref:`sec-samplers-pc`.
    """
    t = batch_time(t, x, sde.T)
    score = score_fn(x, t)
    z = randn_like(x, generator)
    z_norm = z.reshape(x.shape[0], -1).norm(dim=1)
    s_norm = score.reshape(x.shape[0], -1).norm(dim=1)
    if not per_sample:
        z_norm, s_norm = z_norm.mean().expand_as(z_norm), s_norm.mean().expand_as(s_norm)
    s_norm = s_norm.clamp(min=torch.finfo(x.dtype).tiny ** 0.5)
    h = 2 * (snr * z_norm / s_norm) ** 2
    x_mean = x + expand(h, x) * score
    return x_mean + expand((2 * h).sqrt(), x) * z, x_mean


# ----- predictor-corrector: the update of every stochastic sampler --------------------------
Project = Callable[[Tensor, Tensor, float], Tuple[Tensor, Tensor]]


def pc_update(
    score_fn: ScoreFn, sde: SDE, *, predictor: Optional[StepFn] = reverse_diffusion_step,
    corrector: Optional[StepFn] = langevin_corrector_step, snr: float = 0.16, n_corrector_steps: int = 1,
    generator: Optional[torch.Generator] = None, project: Optional[Project] = None,
) -> Update:
    """The update ``(x, t, t_next) -> (x, x_mean)`` of predictor-corrector sampling.

    The predictor moves ``x`` from ``t`` to ``t_next``, ``n_corrector_steps`` corrector steps refine
    it there; ``project(x, x_mean, t_next)``, if given, follows every sub-step (inpainting puts the
    known entries back). Either step may be ``None``, not both. Book: :ref:`sec-samplers-pc`.
    """
    if predictor is None and corrector is None:
        raise ValueError("predictor-corrector sampling needs a predictor, a corrector or both; got neither")
    if corrector is not None:
        check_positive("snr", snr)
        check_int("n_corrector_steps", n_corrector_steps)

    def update(x: Tensor, t: float, t_next: float) -> Tuple[Tensor, Tensor]:
        x_mean = x
        if predictor is not None:
            x, x_mean = predictor(score_fn, sde, x, t, t - t_next, generator=generator)
            if project is not None:
                x, x_mean = project(x, x_mean, t_next)
        for _ in range(n_corrector_steps if corrector is not None else 0):
            x, x_mean = corrector(score_fn, sde, x, t_next, snr=snr, generator=generator)
            if project is not None:
                x, x_mean = project(x, x_mean, t_next)
        return x, x_mean

    return update


def pc_sample(
    score_fn: ScoreFn, sde: SDE, shape: Sequence[int], n_steps: int, *, eps: Optional[float] = None,
    ts: Optional[Sequence[float] | Tensor] = None, generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    x_init: Optional[Tensor] = None, denoise: bool = True, callback: Optional[Callback] = None,
    predictor: Optional[StepFn] = reverse_diffusion_step,
    corrector: Optional[StepFn] = langevin_corrector_step, snr: float = 0.16, n_corrector_steps: int = 1,
) -> Tuple[Tensor, int]:
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 1): :func:`pc_update` on the grid.

    ``predictor=None`` is annealed Langevin dynamics (Song & Ermon 2019) on the continuous schedule,
    ``corrector=None`` the predictor alone. ``predictor(score_fn, sde, x, t, dt, generator=...)`` and
    ``corrector(score_fn, sde, x, t, snr=..., generator=...)`` return ``(x, x_mean)``. Returns
    ``(x, nfe)``, ``nfe = n_steps * (1 + n_corrector_steps)`` with both. Book: :ref:`sec-samplers-pc`.
    """
    grid = _grid(sde, n_steps, eps, ts)
    score = CountedScore(score_fn)
    update = pc_update(score, sde, predictor=predictor, corrector=corrector, snr=snr,
                       n_corrector_steps=n_corrector_steps, generator=generator)
    x, x_mean = sample_loop(update, _initial_state(sde, shape, x_init, generator, device, dtype), grid, callback)
    return _finished(x_mean if denoise else x, score.nfe, "pc_sample")


def euler_maruyama_sample(score_fn: ScoreFn, sde: SDE, shape: Sequence[int], n_steps: int, **options) -> Tuple[Tensor, int]:
    """Euler-Maruyama on the reverse SDE (:func:`euler_maruyama_step`); ``nfe = n_steps``.
    Options as :func:`pc_sample`. Book: :ref:`sec-samplers`."""
    return pc_sample(score_fn, sde, shape, n_steps, predictor=euler_maruyama_step, corrector=None, **options)


def reverse_diffusion_sample(score_fn: ScoreFn, sde: SDE, shape: Sequence[int], n_steps: int, **options) -> Tuple[Tensor, int]:
    """The reverse-diffusion predictor alone (:func:`reverse_diffusion_step`); ``nfe = n_steps``.
    Options as :func:`pc_sample`. Book: :ref:`sec-samplers`."""
    return pc_sample(score_fn, sde, shape, n_steps, predictor=reverse_diffusion_step, corrector=None, **options)


def ancestral_sample(score_fn: ScoreFn, sde: SDE, shape: Sequence[int], n_steps: int, **options) -> Tuple[Tensor, int]:
    """Ancestral sampling (:func:`ancestral_step`: DDPM for VP, SMLD for VE); ``nfe = n_steps``.
    Options as :func:`pc_sample`. Book: :ref:`sec-samplers`."""
    return pc_sample(score_fn, sde, shape, n_steps, predictor=ancestral_step, corrector=None, **options)


# ----- probability-flow ODE: fixed steps ----------------------------------------------------
def heun_sample(
    score_fn: ScoreFn, sde: SDE, shape: Sequence[int], n_steps: int, *, eps: Optional[float] = None,
    ts: Optional[Sequence[float] | Tensor] = None, generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    x_init: Optional[Tensor] = None, denoise: bool = True, callback: Optional[Callback] = None,
) -> Tuple[Tensor, int]:
    """Fixed-step Heun (2nd-order, explicit trapezoidal) integration of the probability-flow ODE.

    With ``v = f - g^2 score / 2`` and ``h = t_{i+1} - t_i``: ``x' = x_i + h v(x_i, t_i)``,
    ``x_{i+1} = x_i + h (v(x_i, t_i) + v(x', t_{i+1})) / 2``, so ``nfe = 2 n_steps``. The last step
    is a Heun step too: Karras et al. (2022) end with Euler only because their last time has zero
    noise; here ``t_N = eps > 0``. ``denoise`` has no effect (an ODE step adds no noise).
    Book: :ref:`sec-samplers-ode`.
    """
    grid = _grid(sde, n_steps, eps, ts)
    score = CountedScore(score_fn)

    def update(x: Tensor, t: float, t_next: float) -> Tuple[Tensor, Tensor]:
        h = t_next - t  # negative: we integrate backwards in time
        d = sde.ode_drift(score, x, t)
        x = x + h * 0.5 * (d + sde.ode_drift(score, x + h * d, t_next))
        return x, x

    x, _ = sample_loop(update, _initial_state(sde, shape, x_init, generator, device, dtype), grid, callback)
    return _finished(x, score.nfe, "heun_sample")


# ----- probability-flow ODE: adaptive steps (torchdiffeq) -----------------------------------
def solve_ode(func, state0, t0: float, t1: float, *, rtol: float, atol: float, method: str,
              max_steps: Optional[int] = None, what: str = "the ODE solver"):
    """``state(t1)`` of ``d state/dt = func(t, state)``, ``state(t0) = state0`` (a tensor or a tuple),
    by a torchdiffeq adaptive solver whose step-size failures become clear errors. A step forced onto
    ``t1`` keeps every evaluation in ``[t0, t1]``, where the score (for VE, the marginal) is defined."""
    from torchdiffeq import odeint  # the one place that needs torchdiffeq

    ref = state0[0] if isinstance(state0, tuple) else state0
    ts = torch.tensor([t0, t1], dtype=ref.dtype, device=ref.device)
    options = {"step_t": ts[1:]}
    if max_steps is not None:
        options["max_num_steps"] = max_steps
    try:
        out = odeint(func, state0, ts, rtol=rtol, atol=atol, method=method, options=options)
    except AssertionError as err:  # torchdiffeq reports step-size failures with assert
        if "max_num_steps" in str(err):
            raise RuntimeError(f"{what}: the solver needed more than n_steps={max_steps} steps at "
                               f"rtol={rtol:g}, atol={atol:g}; raise n_steps or the tolerances") from None
        raise NonFiniteSampleError(f"{what}: the ODE solver failed ({err}); the score model most likely "
                                   "returned NaN or infinite values (check the checkpoint's weights)") from None
    return tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1]


def _pf_ode(score: CountedScore, sde: SDE, x: Tensor, t0: float, t1: float, *, rtol: float, atol: float,
            method: str, max_steps: Optional[int], callback: Optional[Callback], what: str) -> Tensor:
    """Integrate the probability-flow ODE from ``t0`` to ``t1``."""
    lo, hi = min(t0, t1), max(t0, t1)

    def velocity(t: Tensor, x: Tensor) -> Tensor:
        # The solver's initial step-size heuristic may probe one trial time beyond [eps, T];
        # clamping only affects that estimate (later steps are forced to end exactly at t1).
        t = t.to(x.dtype).clamp(lo, hi)
        v = sde.ode_drift(score, x, t.expand(x.shape[0]))
        if callback is not None:
            callback(score.nfe - 1, float(t), x)  # adaptive solvers sync anyway (step control)
        return v

    return solve_ode(velocity, x, t0, t1, rtol=rtol, atol=atol, method=method, max_steps=max_steps, what=what)


def _ode_options(rtol: float, atol: float, method: str, n_steps: Optional[int]) -> Optional[int]:
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    check_choice("method", method, ODE_METHODS)
    return None if n_steps is None else check_int("n_steps", n_steps)


def ode_sample(
    score_fn: ScoreFn, sde: SDE, shape: Sequence[int], n_steps: Optional[int] = None, *,
    rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5", eps: Optional[float] = None,
    generator: Optional[torch.Generator] = None, device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32, x_init: Optional[Tensor] = None, callback: Optional[Callback] = None,
) -> Tuple[Tensor, int]:
    """Sample by integrating the probability-flow ODE from ``T`` down to ``eps`` with an adaptive solver.

    ``dx/dt = f(x, t) - g(t)^2 score(x, t) / 2`` (Song et al. 2021, eq. 13) by torchdiffeq
    (``dopri5`` is RK45), steps chosen from ``rtol``, ``atol``; ``n_steps``, if given, bounds their
    number (an error when too few). ``nfe`` counts velocity evaluations, the initial step-size
    selection included; ``callback(i, t, x)`` sees each, rejected trial steps too. Step-size control
    reads error estimates on the host: this sampler syncs every step. Book: :ref:`sec-samplers-ode`.
    """
    max_steps = _ode_options(rtol, atol, method, n_steps)
    eps = _eps(sde, eps)
    score = CountedScore(score_fn)
    x = _initial_state(sde, shape, x_init, generator, device, dtype)
    x = _pf_ode(score, sde, x, sde.T, eps, rtol=rtol, atol=atol, method=method, max_steps=max_steps,
                callback=callback, what="ode_sample")
    return _finished(x, score.nfe, "ode_sample")


def ode_encode(
    score_fn: ScoreFn, sde: SDE, x: Tensor, n_steps: Optional[int] = None, *, rtol: float = 1e-5,
    atol: float = 1e-5, method: str = "dopri5", eps: Optional[float] = None,
) -> Tuple[Tensor, int]:
    """Encode data into the latent ``z = x_T`` by integrating the probability-flow ODE from ``eps`` to ``T``.

    The inverse of :func:`ode_sample` up to solver error (Song et al. 2021, sec. 4.3):
    ``ode_sample(..., x_init=z)`` reconstructs ``x [B, ...]``. Book: :ref:`sec-samplers-ode`.
    """
    check_tensor("x", x, floating=True, nonempty=True)
    max_steps = _ode_options(rtol, atol, method, n_steps)
    eps = _eps(sde, eps)
    score = CountedScore(score_fn)
    z = _pf_ode(score, sde, x.detach(), eps, sde.T, rtol=rtol, atol=atol, method=method, max_steps=max_steps,
                callback=None, what="ode_encode")
    return _finished(z, score.nfe, "ode_encode")


# =============================================================================================
# Fast samplers: DDIM, DPM-Solver++ and EDM's solvers (book chapter 8, :ref:`sec-fast-sampling`).
# In ``y = x / alpha_t`` and ``sigma = sigma_t / alpha_t = exp(-lambda_t)`` (``lambda_t`` the
# log-SNR) every SDE here has the same probability-flow ODE (Karras et al. 2022, eq. 4):
#     dy/dsigma = (y - D)/sigma,    D = x0_hat = (x + sigma_t^2 score(x, t)) / alpha_t.
# Semi-linear in lambda, its linear part integrates exactly (variation of constants):
#     x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} exp(lambda) D dlambda.
# D frozen over the step is DDIM (= DPM-Solver++ order 1 = Euler in (y, sigma)); D expanded in
# lambda is DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095). Another linear part: for data
# N(mu, s^2 I), D = c y + (1 - c) mu with c = s^2 / (s^2 + sigma^2); writing any D so, with
# m = (D - c y) / (1 - c), gives dy/dsigma = sigma (y - m) / q^2, i.e. dy/dq = (y - m)/q in
# q = sqrt(sigma^2 + s^2): the same equation, so the same solvers with sigma -> q (exact for that
# Gaussian), where m = y + q^2 grad_y log p is Tweedie's formula at noise q. Grid quantities are
# Python floats computed in float64 before the loop, so the loops do tensor arithmetic only (no
# host syncs).
# =============================================================================================
def _marginals(sde: SDE, ts: Sequence[float]) -> Tuple[List[float], List[float]]:
    """``(alpha_t, sigma_t)`` at the times ``ts`` as Python floats, computed in float64 on the CPU."""
    alpha, sigma = sde.marginal_coeffs(torch.tensor(list(ts), dtype=torch.float64))
    return alpha.tolist(), sigma.tolist()


def lambda_time_grid(sde: SDE, n_steps: int, eps: Optional[float] = None, *, sigma_min: Optional[float] = None,
                     sigma_max: Optional[float] = None, tail_density: float = 0.1, device=None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """A grid ``T = t_0 > ... > t_N = eps`` uniform in the log-SNR ``lambda_t = log(alpha_t / sigma_t)``.

    Inverted by bisection (any SDE): DPM-Solver's "logSNR" grid (Lu et al. 2022, sec. 3.3), the
    ``rho -> infinity`` limit of :func:`edm_time_grid`. ``sigma_min``, ``sigma_max`` bound a range of
    ``sigma = sigma_t / alpha_t`` (EDM: ``[0.002, 80]`` for unit-scale data) outside which steps are
    nearly wasted and points ``tail_density`` times as dense in ``lambda``; ``tail_density > 0`` keeps
    every step shrinking like ``1/N``, so a solver keeps its order (for large enough ``N``: with 20 steps
    on ``[0.002, 80]``, VE's and sub-VP's tails below 0.002 fit in the last step, about 3 units of
    ``lambda`` long; ``benchmarks/paired_bias.py``). Shape ``[n_steps + 1]``; pass it as ``ts=``.
    Book: :ref:`sec-fast-grids`.
    """
    n_steps = check_int("n_steps", n_steps)
    eps = _eps(sde, eps)
    tail_density = check_number("tail_density", tail_density, 0.0, 1.0)
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if value is not None:
            check_positive(name, value)
    if sigma_min is not None and sigma_max is not None and not sigma_max > sigma_min:
        raise ValueError(f"need sigma_max > sigma_min, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    hi, lo = _noise_to_signal(sde, torch.tensor([sde.T, eps], dtype=torch.float64)).tolist()
    # Breakpoints of a piecewise-linear warp in log sigma = -lambda: density tail_density on
    # [sigma_max, sigma(T)] and [sigma(eps), sigma_min], 1 in between; uniform in the warp.
    log_hi, log_lo = math.log(hi), math.log(lo)
    a = max(min(math.log(sigma_max), log_hi), log_lo) if sigma_max is not None else log_hi
    b = min(max(math.log(sigma_min), log_lo), a) if sigma_min is not None else log_lo
    if a == b:
        raise ValueError(f"the range [sigma_min, sigma_max] must overlap the SDE's ({lo:.3g}, {hi:.3g})")
    knots_log = [log_hi, a, b, log_lo]  # decreasing
    lengths = [tail_density * (log_hi - a), a - b, tail_density * (b - log_lo)]
    knots_u = [0.0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    u = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps * knots_u[-1]
    log_nsr = torch.empty_like(u)
    for j in range(3):  # invert the warp segment by segment
        inside = (u >= knots_u[j]) & (u <= knots_u[j + 1])
        if knots_u[j + 1] > knots_u[j]:
            frac = (u - knots_u[j]) / (knots_u[j + 1] - knots_u[j])
            log_nsr = torch.where(inside, knots_log[j] + frac * (knots_log[j + 1] - knots_log[j]), log_nsr)
    log_nsr[0], log_nsr[-1] = log_hi, log_lo
    return _grid_of_noise_to_signal(sde, log_nsr.exp(), eps, device, dtype)


def _default_lambda_grid(sde: SDE, n_steps: int, eps: Optional[float] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The default grid of :func:`ddim_sample`, and of :func:`dpm_solver_sample` without its linear part
    (below 15 steps, or with an explicit order): uniform in ``lambda`` on EDM's noise range
    ``[0.002, 80]`` (:func:`lambda_time_grid`), on ``[0.03, 60]`` below 15 steps.

    A short grid's steps are 0.7 units of ``lambda`` long or more, and its ends are left to the
    sparse tails and the first-order last step, which jumps from about 0.03 to ``eps`` and lands
    near ``D``: narrower than the data (a component of std ``s`` by about ``s^2/(s^2 + 0.03^2)``),
    which takes back the excess spread of the coarse steps before it (a cancellation; chapter 8).
    Measured with exact scores (``samplers_vs_nfe.py --ablation``): at 10 NFE ``[0.03, 60]`` was
    closer to the floor than ``[0.01, 80]`` in seven of eight cases (not on the 3-mode mixture
    with VP), and DDIM at every budget; with chapter 8's learned digits model, better at 5 NFE and
    level at 10. A range that cuts the high noise further suits exact scores and hurts learned
    ones (chapter 8: ``[0.002, 7]`` nearly triples the digits model's Frechet distance at 20
    NFE). From 15 steps on, with the short range, 3M stays off the floor up to 50 NFE on sub-VP
    and VE.
    """
    sigma_min, sigma_max = (0.03, 60.0) if n_steps < _SHORT_GRID else (0.002, 80.0)
    return lambda_time_grid(sde, n_steps, eps, sigma_min=sigma_min, sigma_max=sigma_max, dtype=dtype)


def soft_lambda_grid(sde: SDE, n_steps: int, eps: Optional[float] = None, *, sigma_soft: float = _SOFT_SIGMA,
                     sigma_max: Optional[float] = 80.0, tail_density: float = 0.1, device=None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """A grid ``T = t_0 > ... > t_N = eps`` uniform in ``-log sqrt(sigma^2 + sigma_soft^2)``, ``sigma = sigma_t/alpha_t``.

    That is ``lambda`` well above ``sigma_soft`` and flat well below it, so the steps thin out
    smoothly below ``sigma_soft`` instead of at a hard end: the grid of :func:`dpm_solver_sample`'s
    default from 15 steps, whose linear part (``gaussian_std``) makes the low noise cheap to cross.
    From ``sigma(eps)`` up to ``sigma_max``; above it (VP and sub-VP reach 152) the points are
    ``tail_density`` times as dense in ``lambda``, as in :func:`lambda_time_grid`, so that every step
    shrinks like ``1/N`` and a solver keeps its order. Shape ``[n_steps + 1]``; pass it as ``ts=``.
    Book: :ref:`sec-fast-gaussian`.
    """
    n_steps = check_int("n_steps", n_steps)
    eps = _eps(sde, eps)
    sigma_soft = check_number("sigma_soft", sigma_soft, 0.0, None)
    tail_density = check_number("tail_density", tail_density, 0.0, 1.0, lo_open=True)
    hi, lo = _noise_to_signal(sde, torch.tensor([sde.T, eps], dtype=torch.float64)).tolist()
    top = hi if sigma_max is None else min(hi, check_positive("sigma_max", sigma_max))
    if not top > lo:
        raise ValueError(f"sigma_max={sigma_max} must exceed the SDE's sigma/alpha at eps ({lo:.3g})")
    # u = log q(sigma) up to sigma_max, then tail_density * log sigma: uniform in u, inverted piece by piece.
    u_top = math.log(math.hypot(top, sigma_soft))
    u = torch.linspace(u_top + tail_density * math.log(hi / top), math.log(math.hypot(lo, sigma_soft)), n_steps + 1,
                       dtype=torch.float64)
    inner = (torch.exp(2 * torch.clamp(u, max=u_top)) - sigma_soft**2).clamp_min(lo**2).sqrt()
    nsr = torch.where(u > u_top, top * torch.exp((u - u_top) / tail_density), inner)
    nsr[0], nsr[-1] = hi, lo
    return _grid_of_noise_to_signal(sde, nsr, eps, device, dtype)


def _fast_grid(sde: SDE, n_steps: int, eps: Optional[float], ts, default: Callable[..., Tensor]) -> List[float]:
    """``ts`` checked by :func:`_grid`, or the sampler's default grid (read back once, as a list)."""
    if ts is None:
        ts = default(sde, check_int("n_steps", n_steps), eps=eps, dtype=torch.float64).tolist()
    return _grid(sde, n_steps, eps, ts)


def _data_prediction(score: CountedScore, sde: SDE) -> Callable[[Tensor, float, float, float], Tensor]:
    """``D(x, t, alpha_t, sigma_t) = (x + sigma_t^2 score(x, t)) / alpha_t``: Tweedie's ``E[x_0 | x_t = x]``."""

    def D(x: Tensor, t: float, alpha: float, sigma: float) -> Tensor:
        return (x + sigma**2 * score(x, batch_time(t, x, sde.T))) / alpha

    return D


def _denoised(D, x: Tensor, denoise: bool, t: float, alpha: float, sigma: float) -> Tensor:
    """The final state, or with ``denoise`` one more evaluation: ``x0_hat(x_N, t_N)``, i.e. a first-order
    step from ``sigma_N`` to ``sigma = 0`` (EDM's final Euler step)."""
    return D(x, t, alpha, sigma) if denoise else x


# ----- DDIM ----------------------------------------------------------------------------------
def ddim_sample(
    score_fn: ScoreFn, sde: SDE, shape: Sequence[int], n_steps: int, *, eta: float = 0.0,
    eps: Optional[float] = None, ts: Optional[Sequence[float] | Tensor] = None,
    generator: Optional[torch.Generator] = None, device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32, x_init: Optional[Tensor] = None, denoise: bool = False,
    callback: Optional[Callback] = None,
) -> Tuple[Tensor, int]:
    """DDIM (Song, Meng & Ermon 2021, eq. 12) for any SDE: ``x0_hat`` and ``eps_hat`` recombined at the next time.

    From ``s = t_i`` to ``t = t_{i+1}``, with ``x0_hat = D(x_s)`` and ``eps_hat = (x_s - alpha_s x0_hat) / sigma_s``:

        x_t = alpha_t x0_hat + sqrt(sigma_t^2 - c^2) eps_hat + c z,   c = eta sigma_t sqrt(1 - exp(-2 h)),

    ``h = lambda_t - lambda_s``. ``eta = 0`` is deterministic: DPM-Solver++ of order 1, an Euler step
    of ``dy/dsigma = (y - D)/sigma``; ``eta = 1`` is ancestral sampling (the DDPM posterior);
    ``0 < eta < 1`` interpolates. ``nfe = n_steps`` (+1 with ``denoise``: a final ``x0_hat(x_N, t_N)``).

    Defaults, measured with exact scores (``benchmarks/samplers_vs_nfe.py --ablation``): the grid of
    :func:`dpm_solver_sample` without its linear part (:func:`lambda_time_grid` on ``[0.002, 80]``;
    ``[0.03, 60]`` below 15 steps), so that DDIM is ``dpm_solver_sample(order=1)`` (EDM's ``rho = 7``
    grid was worse in both measures); no final denoising (no better at equal NFE).
    Book: :ref:`sec-fast-ddim`.
    """
    eta = check_number("eta", eta, 0.0, None)
    grid = _fast_grid(sde, n_steps, eps, ts, _default_lambda_grid)
    alpha, sigma = _marginals(sde, grid)
    steps = []
    for i in range(len(grid) - 1):
        h = math.log(alpha[i + 1] / sigma[i + 1]) - math.log(alpha[i] / sigma[i])
        c = eta * sigma[i + 1] * math.sqrt(-math.expm1(-2 * h))
        keep = math.sqrt(max(sigma[i + 1] ** 2 - c**2, 0.0))  # coefficient of eps_hat
        # x_mean = alpha_t x0 + keep (x - alpha_s x0) / sigma_s; for eta = 0 the x0 weight is
        # alpha_t (1 - exp(-h)), written with expm1 so that short steps keep their digits.
        w_x = keep / sigma[i]
        w_0 = -alpha[i + 1] * math.expm1(-h) if eta == 0 else alpha[i + 1] - w_x * alpha[i]
        steps.append((grid[i], alpha[i], sigma[i], w_x, w_0, c))
    score = CountedScore(score_fn)
    D = _data_prediction(score, sde)
    it = iter(steps)

    def update(x: Tensor, t: float, t_next: float) -> Tuple[Tensor, Tensor]:
        t, a, s, w_x, w_0, c = next(it)
        x_mean = w_x * x + w_0 * D(x, t, a, s)
        return (x_mean + c * randn_like(x, generator) if c > 0 else x_mean), x_mean

    x, _ = sample_loop(update, _initial_state(sde, shape, x_init, generator, device, dtype), grid, callback)
    x = _denoised(D, x, denoise, grid[-1], alpha[-1], sigma[-1])
    return _finished(x, score.nfe, "ddim_sample")


# ----- DPM-Solver++ --------------------------------------------------------------------------
def dpm_solver_orders(nfe: int, order: int = 3) -> List[int]:
    """DPM-Solver's order schedule for single-step sampling with a budget of ``nfe`` evaluations.

    Steps of order ``order`` and at most two lower-order steps at the end, summing to ``nfe`` (Lu et
    al. 2022a, "DPM-Solver-fast", sec. 3.4): ``nfe = 10, order = 3 -> [3, 3, 3, 1]``. Pass it as
    ``order=`` to :func:`dpm_solver_sample` with ``multistep=False`` and ``n_steps = len(orders)``.
    """
    nfe = check_int("nfe", nfe)
    check_choice("order", order, (1, 2, 3))
    if order == 3 and nfe >= 3:
        k = nfe // 3
        return [3] * (k - 1) + {0: [2, 1], 1: [3, 1], 2: [3, 2]}[nfe % 3]
    if order >= 2 and nfe >= 2:
        return [2] * (nfe // 2) + [1] * (nfe % 2)
    return [1] * nfe


def _solver_orders(order, n_steps: int, multistep: bool, lower_order_final: bool,
                   nsr: Optional[Sequence[float]] = None) -> List[int]:
    """Per-step orders. The default (``order=None``): second order on grids of fewer than 10 steps,
    third order from 10 steps on, except that the multistep form takes second-order steps where a
    step starts above ``_THIRD_ORDER_NSR`` in ``sigma/alpha`` (``nsr``: one per grid time, of the
    default grid or of ``ts``)."""
    default = order is None
    if default:
        order = 3 if n_steps >= 10 else 2
    if isinstance(order, int) and not isinstance(order, bool):
        orders = [check_choice("order", order, (1, 2, 3))] * n_steps
        if default and multistep and nsr is not None:  # second order where a learned D errs most
            orders = [2 if v > _THIRD_ORDER_NSR else k for k, v in zip(orders, nsr)]
        if lower_order_final and n_steps < 10:  # at most order j + 1 in the j-th step from the end
            orders = [min(k, n_steps - i) for i, k in enumerate(orders)]
        elif lower_order_final and multistep and n_steps < _SHORT_GRID:  # a first-order (DDIM) last step
            orders[-1] = 1
    else:  # per-step orders are taken as given
        orders = [check_choice("order (each entry)", k, (1, 2, 3)) for k in order]
        if len(orders) != n_steps:
            raise ValueError(f"order holds {len(orders)} per-step orders but n_steps={n_steps}")
    if multistep:  # a multistep method starts with what its history allows
        orders = [min(k, i + 1) for i, k in enumerate(orders)]
    return orders


def _multistep_weights(order: int, h: float, h1: float, h2: float) -> List[float]:
    """Weights ``w`` of ``x_t = (sigma_t/sigma_s) x_s + alpha_t sum_j w_j D_{i-j}`` for DPM-Solver++(kM).

    ``h = lambda_t - lambda_s`` and ``h1``, ``h2`` the two previous steps. Order 2 is Algorithm 2 of
    Lu et al. (2022): ``D`` extrapolated linearly to the middle of the step. Order 3 integrates the
    quadratic through the last three ``D`` exactly: ``D = D_0 + tau D' + tau^2 D''/2`` in
    ``tau = lambda - lambda_s`` gives ``-phi_1 D_0 + h phi_2 D' - h^2 phi_3 D''`` with
    ``phi_1 = expm1(-h)``, ``phi_2 = phi_1/h + 1``, ``phi_3 = phi_2/h - 1/2``.
    """
    phi_1 = math.expm1(-h)
    if order == 1:
        return [-phi_1]
    if order == 2:
        r = h1 / h
        return [-phi_1 * (1 + 0.5 / r), phi_1 * 0.5 / r]
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    # Divided differences on the nodes 0, -h1, -h1 - h2: D' and D''/2 as combinations of D_0, D_1, D_2.
    a = [1 / h1, -1 / h1, 0.0]  # (D_0 - D_1)/h1
    b = [0.0, 1 / h2, -1 / h2]  # (D_1 - D_2)/h2
    second = [(a[j] - b[j]) / (h1 + h2) for j in range(3)]  # ~ D''/2
    first = [a[j] + h1 * second[j] for j in range(3)]  # ~ D' at 0
    return [-phi_1 * (j == 0) + h * phi_2 * first[j] - h**2 * phi_3 * 2 * second[j] for j in range(3)]


def _exponential_weights(nodes: Sequence[float], h: float) -> List[float]:
    """``w_j = int_0^h exp(-(h - tau)) l_j(tau) dtau``, ``l_j`` the Lagrange basis on ``nodes`` (in ``lambda``,
    relative to the step's start): the weights of ``D`` at the nodes in the variation-of-constants
    formula with ``D`` the polynomial through them. By 16-point Gauss-Legendre quadrature: a polynomial
    times an exponential, exact to rounding for the steps of a sampler (``h`` up to several units)."""
    u, q = np.polynomial.legendre.leggauss(16)
    tau = 0.5 * h * (u + 1)
    kernel = 0.5 * h * q * np.exp(tau - h)
    weights = []
    for j, node in enumerate(nodes):
        basis = np.ones_like(tau)
        for k, other in enumerate(nodes):
            if k != j:
                basis *= (tau - other) / (node - other)
        weights.append(float(kernel @ basis))
    return weights


def _multistep_plan(grid, orders, alpha, sigma, lam, D, correct: bool = False) -> Update:
    """The update of DPM-Solver++'s multistep form: the weights of every step from Python floats
    (before the loop), the ``D`` of the last three grid times kept in a history (four, briefly, for the
    corrector).

    ``correct``: before stepping on from ``t_i`` (``i >= 1``), replace ``x_i`` by a corrector step
    from ``x_{i-1}`` whose ``D`` is the polynomial through ``D_i`` (just evaluated at the predicted
    ``x_i``, needed anyway) and the predictor's nodes, one degree higher (UniPC's UniC, Zhao et al.
    2023, with exact exponential weights; an exponential Adams-Moulton step in PEC mode): no
    extra evaluation, and ``D_i`` is not re-evaluated at the corrected point."""
    steps = []
    for i, k in enumerate(orders):
        h = lam[i + 1] - lam[i]
        h1 = lam[i] - lam[i - 1] if i >= 1 else 0.0
        h2 = lam[i - 1] - lam[i - 2] if i >= 2 else 0.0
        w = [alpha[i + 1] * v for v in _multistep_weights(k, h, h1, h2)]
        fix = None
        if correct and i >= 1:  # nodes lambda_i, lambda_{i-1}, ..., measured from lambda_{i-1}
            n_nodes = min(orders[i - 1] + 1, i + 1, 4)
            nodes = [lam[i - j] - lam[i - 1] for j in range(n_nodes)]
            fix = (sigma[i] / sigma[i - 1], [alpha[i] * v for v in _exponential_weights(nodes, h1)])
        steps.append((grid[i], alpha[i], sigma[i], sigma[i + 1] / sigma[i], w, fix))
    it = iter(steps)
    history: List[Tensor] = []  # D at the previous grid times, newest first
    x_start: Optional[Tensor] = None  # x at the previous grid time, kept only for the corrector

    def update(x: Tensor, t: float, t_next: float) -> Tuple[Tensor, Tensor]:
        nonlocal x_start
        t, a, s, ratio, w, fix = next(it)
        history.insert(0, D(x, t, a, s))
        if fix is not None:
            x = fix[0] * x_start
            for w_j, D_j in zip(fix[1], history):
                x = x + w_j * D_j
        del history[3:]
        if correct:
            x_start = x
        x = ratio * x
        for w_j, D_j in zip(w, history):
            x = x + w_j * D_j
        return x, x

    return update


def _singlestep_plan(sde: SDE, grid, orders, alpha, sigma, lam, D) -> Update:
    """The update of DPM-Solver++'s single-step form: the stage times and weights of every step
    from Python floats (before the loop); each step evaluates ``D`` at its stages."""
    r_stages = {1: [], 2: [0.5], 3: [1 / 3, 2 / 3]}
    stage_lams = [lam[i] + r * (lam[i + 1] - lam[i]) for i, k in enumerate(orders) for r in r_stages[k]]
    stage_t = _times_of_noise_to_signal(sde, torch.tensor([-v for v in stage_lams], dtype=torch.float64).exp(),
                                        grid[-1], grid[0]).tolist()
    stage_a, stage_s = _marginals(sde, stage_t) if stage_t else ([], [])
    stages = iter(zip(stage_t, stage_a, stage_s))
    steps = []
    for i, k in enumerate(orders):
        h = lam[i + 1] - lam[i]
        inner = []
        for r in r_stages[k]:  # (t, alpha, sigma) of the stage and its weights on x and the D so far
            t_r, a_r, s_r = next(stages)
            phi = math.expm1(-r * h)
            w = [-a_r * phi]
            if len(inner) == 1:  # second stage of 3S: + (r2/r1) alpha phi_2(r2 h) (D_1 - D_0)
                c = r / r_stages[3][0] * a_r * (phi / (r * h) + 1)
                w = [w[0] - c, c]
            inner.append((t_r, a_r, s_r, s_r / sigma[i], w))
        phi_1 = math.expm1(-h)
        if k == 1:
            w = [-phi_1]
        elif k == 2:  # Algorithm 1 with r = 1/2: D at the midpoint stage
            w = [0.0, -phi_1]
        else:  # + (1/r2) alpha_t phi_2 (D_2 - D_0)
            c = 1.5 * (phi_1 / h + 1)
            w = [-phi_1 - c, 0.0, c]
        steps.append((grid[i], alpha[i], sigma[i], inner, sigma[i + 1] / sigma[i], [alpha[i + 1] * v for v in w]))
    it = iter(steps)

    def update(x: Tensor, t: float, t_next: float) -> Tuple[Tensor, Tensor]:
        t, a, s, inner, ratio, w = next(it)
        Ds = [D(x, t, a, s)]
        for t_r, a_r, s_r, ratio_r, w_r in inner:
            u = ratio_r * x
            for w_j, D_j in zip(w_r, Ds):
                u = u + w_j * D_j
            Ds.append(D(u, t_r, a_r, s_r))
        x = ratio * x
        for w_j, D_j in zip(w, Ds):
            if w_j != 0.0:
                x = x + w_j * D_j
        return x, x

    return update


def dpm_solver_sample(
    score_fn: ScoreFn, sde: SDE, shape: Sequence[int], n_steps: int, *,
    order: Optional[int | Sequence[int]] = None, multistep: bool = True, lower_order_final: bool = True,
    corrector: Optional[bool] = None, gaussian_std: Optional[float] = None, eps: Optional[float] = None,
    ts: Optional[Sequence[float] | Tensor] = None,
    generator: Optional[torch.Generator] = None, device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32, x_init: Optional[Tensor] = None, denoise: bool = False,
    callback: Optional[Callback] = None,
) -> Tuple[Tensor, int]:
    """DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): exponential integrators in the data prediction.

    The variation-of-constants formula (see the fast-samplers comment) with ``D`` a polynomial in
    ``lambda``: order 1 is DDIM; ``order=None`` is 2 below 10 steps and, from 10 steps on, 3 where a
    step starts at ``sigma/alpha <= 3`` and 2 above (multistep; single-step: 3); a sequence gives
    per-step orders, used as given (e.g. :func:`dpm_solver_orders`). ``multistep=True`` reuses the
    ``D`` of previous steps (2M: Algorithm 2; 3M: the quadratic through three), from order 1 up,
    ``nfe = n_steps``; ``multistep=False`` takes stages inside each step (2S: Algorithm 1,
    ``r = 1/2``; 3S: ``r = 1/3, 2/3``), ``nfe`` = the sum of the orders. ``lower_order_final`` lowers
    the last steps to orders 1, 2 below 10 steps (as the official code) and, multistep, the last step
    to order 1 with 10-14 steps (as diffusers): it spans the whole low-noise tail, where a polynomial
    fitted to the shorter steps before overshoots while ``D`` barely changes. ``corrector`` (multistep
    only) corrects each step with the ``D`` evaluated at its end, which the next step needs anyway:
    UniPC's corrector (Zhao et al. 2023), one order higher, no extra NFE, the last step uncorrected;
    ``callback`` then sees each step's predicted state, corrected after the next evaluation.
    ``gaussian_std = s > 0`` (multistep only) takes the linear part from Gaussian data of std ``s``
    (the fast-samplers comment): the same formulas with ``sigma_t`` replaced by
    ``sqrt(sigma_t^2 + alpha_t^2 s^2)`` and ``lambda`` by ``-log sqrt(sigma^2 + s^2)``, exact for
    ``N(mu, s^2 I)`` data at any number of steps; ``s = 0`` is DPM-Solver++ as published. ``None``
    (``corrector``, ``gaussian_std``): on (``s = 0.1``) from 15 steps with the default order, off with an
    explicit order. The default grid is :func:`soft_lambda_grid` when ``s > 0``, else DDIM's
    (:func:`lambda_time_grid` on ``[0.002, 80]``, ``[0.03, 60]`` below 15 steps). ``denoise`` adds a
    final ``x0_hat(x_N, t_N)`` (+1 NFE).

    Defaults, measured with exact scores (``benchmarks/samplers_vs_nfe.py``, ``paired_bias.py``) and
    learned ones (``benchmarks/grid_tradeoff.py``): multistep; 2M below 10 steps (3M overshoots on a
    short grid's long steps); from 10 steps third order only below ``sigma/alpha = 3``: a learned
    ``D``'s error is its error in ``eps_hat`` times ``sigma/alpha``, and 3M's quadratic extrapolation
    passes on about twice what 2M's linear one does (3.9 against 2.0 at ``h = 0.45``), while with
    exact scores ``D`` is nearly constant up there. From 15 steps the linear part of ``s = 0.1`` on the
    soft grid (``paired_bias.py --sweep``), with the corrector: with exact scores at the floor on all
    three measures at 20 NFE in all six cases (before, on ``[0.002, 80]`` without the linear part: four),
    the paired log-density error at 20 NFE -0.008 to -0.012 nats (before: -0.022 to +0.045), the
    samples 2.0-7.9 times closer to the exact solution; with learned models closer to their own ODE
    solutions at 15 NFE (the digits model 3.9 times), at 20 NFE closer or level. Below 15 steps the
    short grid with a first-order last step and no corrector (closer to the exact solution at 10 NFE
    than the linear part; within twice the energy-distance floor). No final denoising (no better). Book: :ref:`sec-fast-dpm-solver`, :ref:`sec-fast-corrector`,
    :ref:`sec-fast-gaussian`.
    """
    if corrector is not None and not isinstance(corrector, bool):
        raise ValueError(f"corrector must be True, False or None (the default), got {corrector!r}")
    if corrector and not multistep:
        raise ValueError("corrector=True needs multistep=True: the corrector reuses the D of earlier steps")
    if gaussian_std is not None:
        gaussian_std = check_number("gaussian_std", gaussian_std, 0.0, None)
        if gaussian_std > 0 and not multistep:
            raise ValueError("gaussian_std > 0 needs multistep=True (the single-step form's stages are placed in lambda)")
    default = multistep and order is None  # the default recipe; an explicit order is DPM-Solver++ as published

    def default_std(n: int) -> float:  # the default recipe's linear part: from _SHORT_GRID steps
        return _GAUSSIAN_STD if default and n >= _SHORT_GRID else 0.0

    if gaussian_std is None and ts is None:  # the default grid follows the linear part
        gaussian_std = default_std(check_int("n_steps", n_steps))
    grid = _fast_grid(sde, n_steps, eps, ts, soft_lambda_grid if gaussian_std else _default_lambda_grid)
    if gaussian_std is None:
        gaussian_std = default_std(len(grid) - 1)
    alpha, sigma = _marginals(sde, grid)
    nsr = [s / a for a, s in zip(alpha, sigma)]
    orders = _solver_orders(order, len(grid) - 1, multistep, lower_order_final, nsr)
    if corrector is None:
        corrector = default and len(grid) - 1 >= _CORRECTOR_STEPS
    # The linear part of Gaussian data of std s: the solver's formulas with sigma_t replaced by
    # sqrt(sigma_t^2 + alpha_t^2 s^2), D then being Tweedie's formula at that noise level (the
    # fast-samplers comment).
    sigma_lin = [math.hypot(s, a * gaussian_std) for a, s in zip(alpha, sigma)] if gaussian_std > 0 else sigma
    lam = [math.log(a / s) for a, s in zip(alpha, sigma_lin)]
    score = CountedScore(score_fn)
    D = _data_prediction(score, sde)

    if multistep:
        update = _multistep_plan(grid, orders, alpha, sigma_lin, lam, D, corrector)
    else:
        update = _singlestep_plan(sde, grid, orders, alpha, sigma, lam, D)
    x, _ = sample_loop(update, _initial_state(sde, shape, x_init, generator, device, dtype), grid, callback)
    x = _denoised(D, x, denoise, grid[-1], alpha[-1], sigma[-1])
    return _finished(x, score.nfe, "dpm_solver_sample")


# ----- EDM: Euler / Heun in (y, sigma), and the stochastic sampler -----------------------------
def _churn_times(sde: SDE, grid: List[float], nsr: List[float], S_churn: float, S_tmin: float,
                 S_tmax: float) -> List[float]:
    """The times ``t_hat_i`` that EDM's stochastic sampler starts its steps from (Algorithm 2):
    the noise-to-signal ratio ``nsr_i`` raised to ``(1 + gamma_i) nsr_i`` (capped at ``sde.T``'s)."""
    n = len(grid) - 1
    # Churn: raise sigma_i to sigma_hat_i = (1 + gamma_i) sigma_i, i.e. go back to the time t_hat_i.
    gamma = [min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= nsr[i] <= S_tmax else 0.0 for i in range(n)]
    if grid[0] == sde.T:
        nsr_max = nsr[0]
    else:
        (a_T,), (s_T,) = _marginals(sde, [sde.T])
        nsr_max = s_T / a_T
    nsr_hat = [min((1 + g) * s, max(nsr_max, s)) for g, s in zip(gamma, nsr)]
    churned = [i for i in range(n) if nsr_hat[i] > nsr[i]]
    t_hat = list(grid[:n])
    if churned:
        found = _times_of_noise_to_signal(sde, torch.tensor([nsr_hat[i] for i in churned], dtype=torch.float64),
                                          grid[-1], sde.T).tolist()
        for i, t in zip(churned, found):
            t_hat[i] = t
    return t_hat


def edm_sample(
    score_fn: ScoreFn, sde: SDE, shape: Sequence[int], n_steps: int, *, order: int = 2,
    S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = float("inf"), S_noise: float = 1.0,
    eps: Optional[float] = None, ts: Optional[Sequence[float] | Tensor] = None,
    generator: Optional[torch.Generator] = None, device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32, x_init: Optional[Tensor] = None, denoise: bool = False,
    callback: Optional[Callback] = None,
) -> Tuple[Tensor, int]:
    """EDM's samplers (Karras et al. 2022, Algorithms 1 and 2) in ``y = x / alpha_t``, ``sigma = sigma_t / alpha_t``.

    Integrates ``dy/dsigma = (y - D)/sigma`` step by step: ``order=1`` is Euler (identical to DDIM),
    ``order=2`` Heun (``nfe = 2 n_steps``), the last step too (EDM's final Euler step to
    ``sigma = 0`` is ``denoise=True``: a final ``x0_hat(x_N, t_N)``, +1 NFE). ``S_churn > 0`` first
    raises the noise of steps with ``S_tmin <= sigma_i <= S_tmax`` (noise-to-signal ratios, as in
    EDM) to ``sigma_hat = (1 + gamma) sigma_i``, ``gamma = min(S_churn / N, sqrt(2) - 1)``, capped at
    ``sigma(T)``, by adding ``N(0, (sigma_hat^2 - sigma_i^2) S_noise^2 I)`` to ``y`` (Algorithm 2).

    Defaults: Heun on EDM's ``rho = 7`` grid (:func:`edm_time_grid`), the only grid that worked at
    10 NFE with the book's learned digits model (exact scores favour others); no final denoising (it
    cost more than the Heun step it replaces); no churn (with exact scores it only added error).
    Book: :ref:`sec-fast-edm`.
    """
    check_choice("order", order, (1, 2))
    S_churn = check_number("S_churn", S_churn, 0.0, None)
    S_noise = check_number("S_noise", S_noise, 0.0, None)
    if not isinstance(S_tmin, (int, float)) or not isinstance(S_tmax, (int, float)) or not 0 <= S_tmin <= S_tmax:
        raise ValueError(f"need 0 <= S_tmin <= S_tmax, got S_tmin={S_tmin!r}, S_tmax={S_tmax!r}")
    grid = _fast_grid(sde, n_steps, eps, ts, edm_time_grid)
    n = len(grid) - 1
    alpha, sigma = _marginals(sde, grid)
    nsr = [s / a for a, s in zip(alpha, sigma)]  # EDM's sigma_i
    t_hat = _churn_times(sde, grid, nsr, S_churn, S_tmin, S_tmax)
    a_hat, s_hat = _marginals(sde, t_hat)
    nsr_hat = [s / a for a, s in zip(a_hat, s_hat)]  # consistent with the times actually used
    steps = iter([
        (t_hat[i], a_hat[i], s_hat[i], nsr_hat[i], alpha[i], nsr[i], grid[i + 1], alpha[i + 1], sigma[i + 1], nsr[i + 1])
        for i in range(n)
    ])
    score = CountedScore(score_fn)
    D = _data_prediction(score, sde)

    def update(x: Tensor, t: float, t_next: float) -> Tuple[Tensor, Tensor]:
        t_h, a_h, s_h, sig_h, a, sig, t_n, a_n, s_n, sig_n = next(steps)
        y = x / a
        if sig_h > sig:  # Algorithm 2, lines 5-6: add noise to reach sigma_hat
            y = y + math.sqrt(sig_h**2 - sig**2) * S_noise * randn_like(y, generator)
        d = (y - D(a_h * y, t_h, a_h, s_h)) / sig_h
        y_next = y + (sig_n - sig_h) * d
        if order == 2:  # Heun's correction with the slope at the end of the step
            d_next = (y_next - D(a_n * y_next, t_n, a_n, s_n)) / sig_n
            y_next = y + (sig_n - sig_h) * 0.5 * (d + d_next)
        x = a_n * y_next
        return x, x

    x, _ = sample_loop(update, _initial_state(sde, shape, x_init, generator, device, dtype), grid, callback)
    x = _denoised(D, x, denoise, grid[-1], alpha[-1], sigma[-1])
    return _finished(x, score.nfe, "edm_sample")
