"""Samplers for score-based models: reverse-SDE, predictor-corrector and probability-flow ODE.

Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole (2021), "Score-Based Generative Modeling
through Stochastic Differential Equations", ICLR (arXiv:2011.13456): Euler-Maruyama on the
reverse SDE (eq. 6), reverse diffusion (eq. 45), ancestral sampling (eqs. 46-47), the
predictor-corrector scheme (Algorithm 1, with the Langevin corrector of Algorithms 4-5) and
the probability-flow ODE (eq. 13). Book: :ref:`sec-samplers`, :ref:`sec-samplers-ode`.

**One signature.** Every sampler is called as

    f(score_fn, sde, shape, n_steps, *, eps=None, ts=None, generator=None, device=None,
      dtype=torch.float32, x_init=None, denoise=..., callback=None, **options) -> (x, nfe)

and returns the sample ``x`` of the given ``shape`` and ``nfe``, the number of score
evaluations (each one a batched call ``score_fn(x [B, ...], t [B])``). ``options`` are the
sampler's own knobs (the corrector's ``snr``, the ODE solver's tolerances, ...).

**One loop.** Every fixed-step sampler is an ``update(x, t, t_next) -> (x, x_mean)`` run by
:func:`sample_loop` over a time grid ``T = t_0 > t_1 > ... > t_N = eps``: by default the
uniform :func:`time_grid`, ``t_i = T - i (T - eps) / N`` (``eps = sde.eps`` unless given);
any decreasing grid can be passed as ``ts`` (e.g. :func:`edm_time_grid`). A predictor moves
the state from ``t_i`` to ``t_{i+1}`` (score at ``t_i``), a corrector refines it at ``t_{i+1}``.
The state starts at ``x_{t_0} ~ p_T`` (``sde.prior_sample``) unless ``x_init`` is given.
``denoise=True`` returns the mean of the last update (its noise dropped): the usual final
denoising, which removes noise the score can no longer correct (Song et al. 2021, app. G).
``callback(i, t, x)`` sees the state ``x`` after step ``i`` at time ``t`` (a float): use it to
record trajectories for plots. Only the adaptive ODE solver (:func:`ode_sample`) has its own
loop, that of torchdiffeq, and its ``callback`` sees every velocity evaluation.

**No host syncs.** Times are Python floats and every check on them runs before the loop; the
loop itself never reads a tensor back to the host (on a GPU that would stall it once per
step). Non-finite samples are detected once, after the loop (:class:`NonFiniteSampleError`).

Samplers only call the SDE's methods (``drift``, ``diffusion``, ``discretize``,
``marginal_coeffs``, ``prior_sample``), so a new SDE needs no sampler change.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .checks import check_callable, check_choice, check_int, check_like, check_number, check_positive, check_shape, check_tensor
from .sde import SDE, ScoreFn, batch_time, expand, randn_like

__all__ = [
    "NonFiniteSampleError",
    "CountedScore",
    "time_grid",
    "edm_time_grid",
    "sample_loop",
    "euler_maruyama_step",
    "reverse_diffusion_step",
    "ancestral_step",
    "langevin_corrector_step",
    "pc_update",
    "euler_maruyama_sample",
    "reverse_diffusion_sample",
    "ancestral_sample",
    "pc_sample",
    "heun_sample",
    "ode_sample",
    "ode_encode",
    "solve_ode",
    "ODE_METHODS",
]

StepFn = Callable[..., Tuple[Tensor, Tensor]]
Update = Callable[[Tensor, float, float], Tuple[Tensor, Tensor]]
Callback = Callable[[int, float, Tensor], None]

ODE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
"""Adaptive Runge-Kutta solvers of torchdiffeq accepted by :func:`ode_sample` (``dopri5`` is RK45)."""


class NonFiniteSampleError(FloatingPointError):
    """A sampler produced NaN or infinite values (the score model returned them)."""


# ----- the score model, counted -------------------------------------------------------------
class CountedScore:
    """``score_fn`` with its output checked (shaped like ``x``), its calls counted, and detached.

    ``nfe`` is a Python int, so counting costs nothing. The output is detached unless
    ``detach=False``: a sampler never back-propagates through the trajectory, and detaching
    frees the graph a network builds in grad mode (we do not impose ``no_grad`` because scores
    of energy models call autograd; the likelihood keeps the graph to take a divergence).
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

    Computed in float64 and cast, so that ``t_0 = T`` and ``t_N = eps`` exactly.
    """
    n_steps = check_int("n_steps", n_steps)
    return torch.linspace(sde.T, _eps(sde, eps), n_steps + 1, dtype=torch.float64).to(device=device, dtype=dtype)


def edm_time_grid(
    sde: SDE, n_steps: int, rho: float = 7.0, eps: Optional[float] = None, device=None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A grid ``T = t_0 > ... > t_N = eps`` whose noise-to-signal ratios follow Karras et al. (2022), eq. 5.

    With ``sigma(t) = sigma_t / alpha_t`` (the noise level of ``x_t / alpha_t``, increasing in
    ``t``): ``sigma_i = (sigma(T)^(1/rho) + i/N (sigma(eps)^(1/rho) - sigma(T)^(1/rho)))^rho``,
    and ``t_i = sigma^{-1}(sigma_i)`` by bisection, so the grid works for any SDE. ``rho = 7``
    spends most steps at small noise, where the probability-flow ODE bends most; ``rho = 1`` is
    uniform in sigma. Shape ``[n_steps + 1]``. Pass it as ``ts=`` to any fixed-step sampler.
    Book: :ref:`sec-samplers-ode`.
    """
    n_steps = check_int("n_steps", n_steps)
    eps = _eps(sde, eps)
    rho = check_positive("rho", rho)

    def sigma(t: Tensor) -> Tensor:
        alpha, sigma_t = sde.marginal_coeffs(t)
        return sigma_t / alpha

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

    ``ts`` are Python floats ``t_0 > ... > t_N``; ``callback(i, t_{i+1}, x)`` after each step.
    Returns the final ``(x, x_mean)``. Book: :ref:`sec-samplers`.
    """
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

    ``x_mean = x - [f(x, t) - g(t)^2 score(x, t)] dt``, ``x = x_mean + g(t) sqrt(dt) z``
    (Song et al. 2021, eq. 6 discretised; Kloeden & Platen 1992). Returns ``(x, x_mean)``,
    both shaped like ``x``. Book: :ref:`sec-samplers`.
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
    ``x_mean = x - f + G^2 score(x, t)``, ``x = x_mean + G z``. For VE this is SMLD's
    ``x + (sigma_i^2 - sigma_{i-1}^2) score + ...``; for VP it is ``(2 - sqrt(1 - beta)) x + beta score``,
    which agrees with DDPM's ancestral step to first order in ``beta``. Returns ``(x, x_mean)``.
    Book: :ref:`sec-samplers`.
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

    The forward transition is ``x_t | x_s ~ N(a x_s, v I)`` (``sde.transition_coeffs``:
    ``a = alpha_t / alpha_s``, ``v = sigma_t^2 - a^2 sigma_s^2``). The posterior of ``x_s``
    given ``x_t`` and ``x_0`` has variance ``v sigma_s^2 / sigma_t^2`` and mean
    ``(a sigma_s^2 x_t + alpha_s v x_0) / sigma_t^2``. Plugging in Tweedie's estimate
    ``x0_hat = (x_t + sigma_t^2 score(x_t, t)) / alpha_t`` the mean simplifies to

        x_mean = (x_t + v score(x_t, t)) / a.

    For VE (``a = 1``, ``v = sigma_t^2 - sigma_s^2``) this is SMLD's ancestral step (Song et al.
    2021, eq. 47); for VP (``a = sqrt(1 - beta)``, ``v = beta``) it is DDPM's
    ``(x + beta score) / sqrt(1 - beta)`` with the posterior variance
    ``beta (1 - alphabar_s) / (1 - alphabar_t)`` (Ho et al. 2020, eqs. 7 and 11). Returns
    ``(x, x_mean)``. Book: :ref:`sec-samplers`.
    """
    t = batch_time(t, x, sde.T)
    a, v = sde.transition_coeffs(t, dt)
    sigma_t2 = sde.marginal_coeffs(t)[1] ** 2
    x_mean = (x + expand(v, x) * score_fn(x, t)) / expand(a, x)
    post_var = v * (sigma_t2 - v).clamp(min=0.0) / (a**2 * sigma_t2)  # v sigma_s^2 / sigma_t^2
    return x_mean + expand(post_var.sqrt(), x) * randn_like(x, generator), x_mean


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

    ``x_mean = x + h score(x, t)``, ``x = x_mean + sqrt(2 h) z`` with

        h = 2 (snr ||z|| / ||score(x, t)||)^2,

    so that the ratio of the drift ``h ||score||`` to the noise ``sqrt(2 h) ||z||`` is ``snr``
    whatever the scale of ``p_t`` (Song et al. 2021, Algorithms 4-5; norms over all non-batch
    dimensions). By default (``per_sample=False``) ``||z||`` and ``||score||`` are averaged
    over the batch, as in score_sde, giving one step size for all samples. With
    ``per_sample=True`` each sample gets its own ``h``: batch-independent, and fine in high
    dimension where ``||score||`` concentrates, but in 2-D a sample near a mode has
    ``||score|| ~ 0`` and gets a huge step (tests and ``benchmarks/samplers_vs_nfe.py`` show
    the collapse). Unlike score_sde's VP corrector there is no ``alpha_i`` factor, so the rule
    is the same for every SDE. Returns ``(x, x_mean)``. Book: :ref:`sec-samplers-pc`.
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
    score_fn: ScoreFn,
    sde: SDE,
    *,
    predictor: Optional[StepFn] = reverse_diffusion_step,
    corrector: Optional[StepFn] = langevin_corrector_step,
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    generator: Optional[torch.Generator] = None,
    project: Optional[Project] = None,
) -> Update:
    """The update ``(x, t, t_next) -> (x, x_mean)`` of predictor-corrector sampling.

    The predictor moves ``x`` from ``t`` to ``t_next``; then ``n_corrector_steps`` corrector
    steps (Langevin MCMC targeting ``p_{t_next}``) refine it. ``project(x, x_mean, t_next)``, if
    given, is applied after every sub-step: inpainting uses it to put the known entries back
    (:func:`minisgm.guidance.inpaint_sample`). Either step may be ``None``, not both.
    Book: :ref:`sec-samplers-pc`.
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
    score_fn: ScoreFn,
    sde: SDE,
    shape: Sequence[int],
    n_steps: int,
    *,
    eps: Optional[float] = None,
    ts: Optional[Sequence[float] | Tensor] = None,
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
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 1): :func:`pc_update` on the grid.

    ``predictor=None`` gives corrector-only sampling, i.e. annealed Langevin dynamics (Song &
    Ermon 2019) on the continuous noise schedule ``t_1 > ... > t_N = eps``; ``corrector=None``
    gives the predictor alone. With ``denoise=True`` the returned ``x`` is the mean of the very
    last update (its noise dropped).

    Args:
        predictor: ``step(score_fn, sde, x, t, dt, generator=...) -> (x, x_mean)``.
        corrector: ``step(score_fn, sde, x, t, snr=..., generator=...) -> (x, x_mean)``.
        snr: signal-to-noise ratio passed to the corrector.
        n_corrector_steps: corrector steps per time step (``>= 1`` when a corrector is given).

    Returns:
        ``(x, nfe)`` with ``x`` of ``shape`` and ``nfe = n_steps * (1 + n_corrector_steps)``
        (predictor and corrector both present). Book: :ref:`sec-samplers-pc`.
    """
    grid = _grid(sde, n_steps, eps, ts)
    score = CountedScore(score_fn)
    update = pc_update(score, sde, predictor=predictor, corrector=corrector, snr=snr,
                       n_corrector_steps=n_corrector_steps, generator=generator)
    x, x_mean = sample_loop(update, _initial_state(sde, shape, x_init, generator, device, dtype), grid, callback)
    return _finished(x_mean if denoise else x, score.nfe, "pc_sample")


def euler_maruyama_sample(score_fn: ScoreFn, sde: SDE, shape: Sequence[int], n_steps: int, **options) -> Tuple[Tensor, int]:
    """Euler-Maruyama on the reverse SDE (:func:`euler_maruyama_step`); ``nfe = n_steps``.

    Options as :func:`pc_sample` (``eps``, ``ts``, ``generator``, ``device``, ``dtype``,
    ``x_init``, ``denoise``, ``callback``). Book: :ref:`sec-samplers`.
    """
    return pc_sample(score_fn, sde, shape, n_steps, predictor=euler_maruyama_step, corrector=None, **options)


def reverse_diffusion_sample(score_fn: ScoreFn, sde: SDE, shape: Sequence[int], n_steps: int, **options) -> Tuple[Tensor, int]:
    """The reverse-diffusion predictor alone (:func:`reverse_diffusion_step`); ``nfe = n_steps``.

    Options as :func:`pc_sample`. Book: :ref:`sec-samplers`.
    """
    return pc_sample(score_fn, sde, shape, n_steps, predictor=reverse_diffusion_step, corrector=None, **options)


def ancestral_sample(score_fn: ScoreFn, sde: SDE, shape: Sequence[int], n_steps: int, **options) -> Tuple[Tensor, int]:
    """Ancestral sampling (:func:`ancestral_step`: DDPM for VP, SMLD for VE); ``nfe = n_steps``.

    Options as :func:`pc_sample`. Book: :ref:`sec-samplers`.
    """
    return pc_sample(score_fn, sde, shape, n_steps, predictor=ancestral_step, corrector=None, **options)


# ----- probability-flow ODE: fixed steps ----------------------------------------------------
def heun_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape: Sequence[int],
    n_steps: int,
    *,
    eps: Optional[float] = None,
    ts: Optional[Sequence[float] | Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    x_init: Optional[Tensor] = None,
    denoise: bool = True,
    callback: Optional[Callback] = None,
) -> Tuple[Tensor, int]:
    """Fixed-step Heun (2nd-order, explicit trapezoidal) integration of the probability-flow ODE.

    On the grid ``t_i`` (uniform unless ``ts`` is given, e.g. :func:`edm_time_grid`), with
    ``v(x, t) = f - g^2 score / 2``: ``d_i = v(x_i, t_i)``, ``x' = x_i + (t_{i+1} - t_i) d_i``,
    ``x_{i+1} = x_i + (t_{i+1} - t_i) (d_i + v(x', t_{i+1})) / 2``, so ``nfe = 2 n_steps``.
    Every step is a Heun step, the last one too: Karras et al. (2022, Algorithm 1) end with
    an Euler step only because their last time has zero noise, where the velocity is not
    needed; here ``t_N = eps > 0`` and a final Euler step would be the largest single error
    at low NFE. ``denoise`` is accepted for the shared signature; an ODE step adds no noise,
    so it has no effect. Book: :ref:`sec-samplers-ode`.
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
    """``state(t1)`` of ``d state/dt = func(t, state)`` from ``state(t0) = state0`` (a tensor or a tuple),
    with a torchdiffeq adaptive solver; its step-size failures become clear errors.

    torchdiffeq steps past the end and interpolates back; forcing a step onto ``t1`` keeps every
    evaluation inside ``[t0, t1]``, where the score (and for VE the marginal) is defined.
    """
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
    score_fn: ScoreFn,
    sde: SDE,
    shape: Sequence[int],
    n_steps: Optional[int] = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    eps: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    x_init: Optional[Tensor] = None,
    callback: Optional[Callback] = None,
) -> Tuple[Tensor, int]:
    """Sample by integrating the probability-flow ODE from ``T`` down to ``eps`` with an adaptive solver.

    ``dx/dt = f(x, t) - g(t)^2 score(x, t) / 2`` (Song et al. 2021, eq. 13), solved by
    torchdiffeq (``dopri5`` = Dormand-Prince RK45) from ``x_T ~ p_T`` (or ``x_init``). The
    solver chooses its steps from ``rtol`` and ``atol``; ``n_steps``, if given, bounds their
    number (an error, not a silent stop, when it is not enough). The only randomness is the
    prior draw. ``nfe`` counts velocity evaluations (one score call each), including the
    solver's initial step-size selection; ``callback(i, t, x)`` sees every evaluation, rejected
    trial steps included. Adaptive step-size control compares error estimates on the host, so
    unlike the fixed-step samplers this one synchronises at every step. Book: :ref:`sec-samplers-ode`.
    """
    max_steps = _ode_options(rtol, atol, method, n_steps)
    eps = _eps(sde, eps)
    score = CountedScore(score_fn)
    x = _initial_state(sde, shape, x_init, generator, device, dtype)
    x = _pf_ode(score, sde, x, sde.T, eps, rtol=rtol, atol=atol, method=method, max_steps=max_steps,
                callback=callback, what="ode_sample")
    return _finished(x, score.nfe, "ode_sample")


def ode_encode(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    n_steps: Optional[int] = None,
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
    check_tensor("x", x, floating=True, nonempty=True)
    max_steps = _ode_options(rtol, atol, method, n_steps)
    eps = _eps(sde, eps)
    score = CountedScore(score_fn)
    z = _pf_ode(score, sde, x.detach(), eps, sde.T, rtol=rtol, atol=atol, method=method, max_steps=max_steps,
                callback=None, what="ode_encode")
    return _finished(z, score.nfe, "ode_encode")
