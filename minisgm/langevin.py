"""Langevin samplers (ULA, MALA, annealed) and the NCSNv2 recipes for noise levels and step size.

Book: :ref:`sec-langevin`, :ref:`sec-annealed-langevin`, :ref:`sec-denoising-step`,
:ref:`sec-ncsnv2-techniques`. Song & Ermon (2019), Algorithm 1; Song & Ermon (2020), "Improved
techniques for training score-based generative models" (NCSNv2), techniques 1, 2 and 4.
Step convention (as NCSNv2's Algorithm 1): one step is ``x + alpha s + sqrt(2 alpha) z``; Song &
Ermon 2019 write ``alpha/2 s + sqrt(alpha) z`` (their alpha is twice ours). Every sampler returns
``(x, nfe)`` like :mod:`minisgm.samplers`; ``callback(k, x)`` sees the state after step ``k``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .checks import check_int, check_like, check_positive, check_tensor
from .score_matching import _sq_norm
from .sde import randn_like

__all__ = ["langevin_sample", "mala_sample", "annealed_langevin_sample", "geometric_sigmas",
           "recommended_sigma_max", "recommended_n_levels", "recommended_step_size"]


# ----- unadjusted and Metropolis-adjusted Langevin ----------------------------------------
@torch.no_grad()
def langevin_sample(score_fn: Callable[[Tensor], Tensor], x0: Tensor, step_size: float, n_steps: int, *,
                    generator: Optional[torch.Generator] = None,
                    callback: Optional[Callable[[int, Tensor], None]] = None) -> Tuple[Tensor, int]:
    """Unadjusted Langevin algorithm: ``x_{k+1} = x_k + h s(x_k) + sqrt(2 h) z_k``.

    Euler-Maruyama for ``dx = grad log p(x) dt + sqrt(2) dw``: biased for ``h > 0`` (on ``N(0, tau^2)``
    the variance is ``tau^2 / (1 - h / (2 tau^2))``). Runs the chains of ``x0 [B, ...]`` in parallel;
    ``nfe = n_steps``. Roberts & Tweedie (1996). Book: :ref:`sec-langevin`.
    """
    x = check_tensor("x0", x0, floating=True).clone()
    h = check_positive("step_size", step_size)
    check_int("n_steps", n_steps, 0)
    noise_scale = math.sqrt(2 * h)
    for k in range(n_steps):
        s = check_like("score_fn", score_fn(x), x)
        x = x + h * s + noise_scale * randn_like(x, generator)
        if callback is not None:
            callback(k, x)
    return x, n_steps


def _autograd_score(log_prob_fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def score_fn(x: Tensor) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(log_prob_fn(xg).sum(), xg)
        return g

    return score_fn


@torch.no_grad()
def mala_sample(log_prob_fn: Callable[[Tensor], Tensor], x0: Tensor, step_size: float, n_steps: int, *,
                score_fn: Optional[Callable[[Tensor], Tensor]] = None,
                generator: Optional[torch.Generator] = None,
                callback: Optional[Callable[[int, Tensor, Tensor], None]] = None) -> Tuple[Tensor, int]:
    """Metropolis-adjusted Langevin: a ULA proposal accepted with the MH probability.

    Leaves ``p`` exactly invariant for every ``h`` (Roberts & Tweedie 1996). ``log_prob_fn(x) -> [B]``
    may be unnormalised; ``score_fn`` defaults to its autograd gradient. ``callback(k, x, accepted)``
    also gets the ``[B]`` boolean acceptance mask. ``nfe = n_steps + 1``. Book: :ref:`sec-mala`.
    """
    x = check_tensor("x0", x0, floating=True).clone()
    h = check_positive("step_size", step_size)
    check_int("n_steps", n_steps, 0)
    score_fn = _autograd_score(log_prob_fn) if score_fn is None else score_fn
    noise_scale = math.sqrt(2 * h)

    def evaluate(v: Tensor) -> Tuple[Tensor, Tensor]:
        lp = log_prob_fn(v)
        if not torch.is_tensor(lp) or lp.shape != (v.shape[0],):
            got = list(lp.shape) if torch.is_tensor(lp) else type(lp).__name__
            raise ValueError(f"log_prob_fn must return shape [B]=[{v.shape[0]}], got {got}")
        return lp, check_like("score_fn", score_fn(v), v)

    lp_x, s_x = evaluate(x)
    gen_device = generator.device if generator is not None else x.device
    view = (-1,) + (1,) * (x.dim() - 1)
    for k in range(n_steps):
        z = randn_like(x, generator)
        y = x + h * s_x + noise_scale * z
        lp_y, s_y = evaluate(y)
        log_q_fwd = -0.5 * _sq_norm(z)  # log q(y|x) up to the shared constant
        log_q_rev = -_sq_norm(x - y - h * s_y) / (4 * h)  # log q(x|y)
        log_alpha = lp_y - lp_x + log_q_rev - log_q_fwd
        u = torch.rand(x.shape[0], generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
        # log u < log alpha; nan (e.g. -inf - -inf) is rejected.
        accept = torch.log(u) < log_alpha
        x = torch.where(accept.view(view), y, x)
        s_x = torch.where(accept.view(view), s_y, s_x)
        lp_x = torch.where(accept, lp_y, lp_x)
        if callback is not None:
            callback(k, x, accept)
    return x, n_steps + 1


# ----- annealed Langevin dynamics ---------------------------------------------------------
def _check_sigmas(sigmas, dtype: torch.dtype = torch.float64) -> Tensor:
    """The noise levels as a CPU tensor of ``dtype``: non-empty, 1-D, positive, decreasing."""
    sig = torch.as_tensor(sigmas).detach().to("cpu", dtype)
    if sig.dim() != 1 or sig.numel() == 0:
        raise ValueError(f"sigmas must be a non-empty 1-D sequence, got shape {list(sig.shape)}")
    if not (torch.isfinite(sig).all() and (sig > 0).all()):
        raise ValueError("sigmas must all be positive and finite")
    if sig.numel() > 1 and not (sig[1:] <= sig[:-1]).all():
        raise ValueError("sigmas must be in decreasing order (largest noise first)")
    return sig


@torch.no_grad()
def annealed_langevin_sample(score_fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor,
                             sigmas: Sequence[float] | Tensor, step_lr: float, n_steps_each: int, *,
                             denoise: bool = True, generator: Optional[torch.Generator] = None,
                             callback: Optional[Callable[[int, Tensor], None]] = None) -> Tuple[Tensor, int]:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1; NCSNv2 Algorithm 1).

    ``n_steps_each`` steps per level ``sigma_1 > ... > sigma_L`` with ``alpha_i = step_lr sigma_i^2 /
    sigma_L^2``. ``denoise=True`` ends with Tweedie's ``x + sigma_L^2 s(x, sigma_L)``
    (Jolicoeur-Martineau et al. 2020; NCSNv2 app. B). ``score_fn(x [B, ...], sigma [B])``; ``k`` of
    ``callback(k, x)`` counts the steps of all levels; ``nfe = L * n_steps_each + denoise``.
    Book: :ref:`sec-annealed-langevin`.
    """
    x = check_tensor("x0", x0, floating=True).clone()
    sig = _check_sigmas(sigmas, x.dtype)  # checked on the host, before the loop
    step_lr = check_positive("step_lr", step_lr)
    check_int("n_steps_each", n_steps_each, 0)
    alphas = [step_lr * r**2 for r in (sig / sig[-1]).tolist()]  # alpha_i = step_lr sigma_i^2 / sigma_L^2
    sig = sig.to(x.device)
    B = x.shape[0]
    nfe = 0
    for i, alpha in enumerate(alphas):
        sigma_b = sig[i].expand(B)
        for _ in range(n_steps_each):
            s = check_like("score_fn", score_fn(x, sigma_b), x)
            x = x + alpha * s + math.sqrt(2 * alpha) * randn_like(x, generator)
            if callback is not None:
                callback(nfe, x)
            nfe += 1
    if denoise:
        x = x + sig[-1] ** 2 * check_like("score_fn", score_fn(x, sig[-1].expand(B)), x)
        nfe += 1
    return x, nfe


# ----- NCSNv2 recommendations -------------------------------------------------------------
def geometric_sigmas(sigma_max: float, sigma_min: float, n: int, dtype: torch.dtype = torch.float64,
                     device: torch.device | str | None = None) -> Tensor:
    """``n`` noise levels ``[n]`` in geometric progression from ``sigma_max`` down to ``sigma_min``
    (Song & Ermon 2019, sec. 4.2)."""
    sigma_max = check_positive("sigma_max", sigma_max)
    sigma_min = check_positive("sigma_min", sigma_min)
    if not sigma_max > sigma_min:
        raise ValueError(f"need sigma_max > sigma_min, got sigma_max={sigma_max}, sigma_min={sigma_min}")
    check_int("n", n, 2)
    frac = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    sig = torch.exp(math.log(sigma_max) + frac * (math.log(sigma_min) - math.log(sigma_max)))
    return sig.to(dtype=dtype, device=device)


def recommended_sigma_max(x: Tensor, block: int = 2048) -> float:
    """NCSNv2 technique 1: ``sigma_1`` = the largest pairwise Euclidean distance in ``x [N, ...]``
    (flattened per sample; distances formed in blocks of ``block`` rows)."""
    if not torch.is_tensor(x) or x.dim() < 1 or x.shape[0] < 2:
        raise ValueError("x must be a tensor of shape [N, ...] with N >= 2")
    xf = x.reshape(x.shape[0], -1).to(torch.promote_types(x.dtype, torch.float32))
    best = xf.new_zeros(())
    for i in range(0, xf.shape[0], block):
        d = torch.cdist(xf[i : i + block], xf, compute_mode="donot_use_mm_for_euclid_dist")
        best = torch.maximum(best, d.max())
    return float(best)


def _normal_cdf(v: float) -> float:
    return 0.5 * math.erfc(-v / math.sqrt(2.0))


def _level_overlap(gamma: float, dim: int) -> float:
    """``Phi(sqrt(2D)(gamma-1) + 3 gamma) - Phi(sqrt(2D)(gamma-1) - 3 gamma)`` (NCSNv2 technique 2)."""
    a = math.sqrt(2.0 * dim) * (gamma - 1.0)
    return _normal_cdf(a + 3.0 * gamma) - _normal_cdf(a - 3.0 * gamma)


def recommended_n_levels(sigma_min: float, sigma_max: float, dim: int, target: float = 0.5) -> int:
    """NCSNv2 technique 2: number of geometric levels so adjacent noise shells overlap.

    Solves :func:`_level_overlap` ``= target`` for the ratio ``gamma > 1`` (bisection) and returns the
    smallest ``L`` with ``(sigma_max/sigma_min)^(1/(L-1)) <= gamma``. Needs ``dim >= 5`` (else ValueError).
    """
    sigma_min = check_positive("sigma_min", sigma_min)
    sigma_max = check_positive("sigma_max", sigma_max)
    if not sigma_max > sigma_min:
        raise ValueError(f"need sigma_max > sigma_min, got sigma_max={sigma_max}, sigma_min={sigma_min}")
    check_int("dim", dim, 1)
    if not 0 < target < _level_overlap(1.0, dim):
        raise ValueError(f"target must lie in (0, {_level_overlap(1.0, dim):.4f}), got {target}")
    if math.sqrt(2.0 * dim) <= 3.0:
        raise ValueError(f"technique 2 needs sqrt(2 dim) > 3 (dim >= 5) to have a solution, got dim={dim}")
    lo, hi = 1.0, 2.0
    while _level_overlap(hi, dim) > target:  # the overlap tends to 0 as gamma grows
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _level_overlap(mid, dim) > target else (lo, mid)
    gamma = 0.5 * (lo + hi)
    return int(math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma) - 1e-9)) + 1


def _variance_ratio(u: float, gamma: float, n_steps_each: int) -> float:
    """NCSNv2 technique 4: ``Var[x_T] / sigma_i^2`` after ``M`` Langevin steps on ``N(0, sigma_i^2 I)``.

    Started from ``N(0, sigma_{i-1}^2 I)``, ``u = h / sigma_L^2``: each step maps the variance
    ``v -> (1 - u)^2 v + 2 u sigma_i^2``, whose fixed point is ``sigma_i^2 / (1 - u/2)``.
    """
    c = 1.0 / (1.0 - 0.5 * u)
    return (1.0 - u) ** (2 * n_steps_each) * (gamma**2 - c) + c


def recommended_step_size(sigmas: Sequence[float] | Tensor, n_steps_each: int) -> float:
    """NCSNv2 technique 4: the ``step_lr`` (h) making :func:`_variance_ratio` as close to 1 as possible.

    The ratio exceeds 1 for every ``h``, so it is minimised over ``h in (0, sigma_L^2)`` (bounded
    Brent search); ``gamma`` is the geometric-mean ratio of consecutive ``sigmas``.
    """
    from scipy.optimize import minimize_scalar

    sig = _check_sigmas(sigmas)
    if sig.numel() < 2:
        raise ValueError("sigmas needs at least 2 levels")
    T = check_int("n_steps_each", n_steps_each, 1)
    gamma = float((sig[0] / sig[-1]) ** (1.0 / (sig.numel() - 1)))
    res = minimize_scalar(
        lambda u: _variance_ratio(u, gamma, T), bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-10}
    )
    return float(res.x) * float(sig[-1]) ** 2
