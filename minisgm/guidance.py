"""Controllable generation: guided scores, inpainting and colorization with an unconditional model.

Song et al. (2021), "Score-Based Generative Modeling through Stochastic Differential Equations",
ICLR (arXiv:2011.13456), sec. 5 and app. I: ``grad_x log p_t(x | y) = grad_x log p_t(x) +
grad_x log p_t(y | x)`` (eqs. 14, 48). Every guided score is again a ``score_fn(x [B, ...], t [B])``
for any sampler of :mod:`minisgm.samplers`; inpainting and colorization run its predictor-corrector
update (:func:`minisgm.samplers.pc_update`) with a projection that puts the known entries back.
Book: :ref:`sec-guidance`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_callable, check_number, check_tensor, check_values
from .data import GaussianMixture
from .samplers import (
    Callback, CountedScore, StepFn, _finished, _grid, langevin_corrector_step, pc_update,
    reverse_diffusion_step, sample_loop,
)
from .sde import SDE, ScoreFn, batch_time, expand, randn_like

__all__ = ["classifier_guided_score", "classifier_free_guided_score", "gmm_class_logits_fn",
           "inpaint_sample", "colour_transform", "to_grey", "colorize_sample"]

ClassifierFn = Callable[[Tensor, Tensor], Tensor]
"""A noise-conditional classifier: ``logits(x [B, ...], t [B]) -> [B, K]`` (``log p_t(y | x)`` up to a constant)."""


# ----- labels -------------------------------------------------------------------------------
def _labels(y, x: Tensor, n_classes: Optional[int] = None) -> Tensor:
    """``y`` (an int or an integer tensor ``[B]``) as a long tensor ``[B]`` on x's device; a tensor's
    range ``0..n_classes-1`` is checked only in debug mode (:mod:`minisgm.checks`)."""
    if isinstance(y, bool):
        raise TypeError("class label y must be an int or an integer tensor [B], got a bool")
    if isinstance(y, int):
        if n_classes is not None and not 0 <= y < n_classes:
            raise ValueError(f"class labels must lie in 0..{n_classes - 1}, got {y}")
        y = torch.full((x.shape[0],), y, dtype=torch.long, device=x.device)
    if not torch.is_tensor(y) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"class label y must be an int or an integer tensor [B], got {type(y).__name__}")
    if y.dim() == 0:
        y = y.expand(x.shape[0])
    if y.shape != (x.shape[0],):
        raise ValueError(f"class labels y must have shape [B]=[{x.shape[0]}], got {list(y.shape)}")
    y = y.to(device=x.device, dtype=torch.long)
    if n_classes is not None:
        check_values(lambda: ((y >= 0) & (y < n_classes)).all(),
                     lambda: f"class labels must lie in 0..{n_classes - 1}, got values in [{int(y.min())}, {int(y.max())}]")
    return y


# ----- classifier guidance ------------------------------------------------------------------
def classifier_guided_score(score_fn: ScoreFn, classifier: ClassifierFn, y, scale: float = 1.0) -> ScoreFn:
    """The score of ``p_t(x) p_t(y | x)^scale``: ``score + scale * grad_x log softmax(classifier(x, t))[y]``.

    Song et al. (2021), eq. 48 and app. I.1; the scale of Dhariwal & Nichol (2021), Algorithm 1.
    The classifier (``logits [B, K]``, e.g. a :class:`~minisgm.models.TimeConditionedClassifier` or
    :func:`gmm_class_logits_fn`) must be *noise-conditional*: trained on ``x_t``, not ``x_0``.
    ``y``: an int or a long tensor ``[B]``. ``scale >= 0``: ``0`` is unconditional, ``> 1`` trades
    diversity for class fidelity. Book: :ref:`sec-classifier-guidance`.
    """
    check_callable("score_fn", score_fn, "score_fn(x, t)")
    check_callable("classifier", classifier, "classifier(x, t)")
    scale = check_number("scale", scale, 0.0)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        with torch.enable_grad():  # samplers may run under no_grad
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, t)
            if not torch.is_tensor(logits) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                got = list(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
                raise ValueError(f"classifier(x, t) must return logits [B={x.shape[0]}, K], got {got}")
            labels = _labels(y, x, logits.shape[1])  # within 0..K-1 (a tensor's values: debug mode)
            # Summing over the batch is fine: sample b's log-prob depends on x[b] only.
            log_p_y = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).sum()
            grad = torch.autograd.grad(log_p_y, x_in)[0]
        return score_fn(x, t) + scale * grad.detach()

    return guided


def classifier_free_guided_score(cond_score_fn: Callable[..., Tensor], y, w: float, null=None) -> ScoreFn:
    """Classifier-free guidance: ``(1 + w) score(x, t, y) - w score(x, t, null)``.

    Classifier guidance with scale ``1 + w`` by the implicit classifier ``score(x, t, y) -
    score(x, t, null)`` (Ho & Salimans 2022, eq. 6, for scores; ``w = 0`` is the conditional model).
    ``cond_score_fn(x, t, y)``: e.g. a :class:`~minisgm.models.SmallUNet` or
    :class:`~minisgm.models.ScoreMLP` built with ``num_classes``. ``y``: an int or a long tensor
    ``[B]``. ``null=None`` is passed as is (the package's networks read it as the null class).
    Book: :ref:`sec-classifier-free`.
    """
    check_callable("cond_score_fn", cond_score_fn, "cond_score_fn(x, t, y)")
    w = check_number("w", w, 0.0)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        labels = _labels(y, x)
        null_labels = None if null is None else _labels(null, x)
        s_cond = cond_score_fn(x, t, labels)
        if w == 0.0:  # skip the second network evaluation
            return s_cond
        return (1.0 + w) * s_cond - w * cond_score_fn(x, t, null_labels)

    return guided


def gmm_class_logits_fn(gmm: GaussianMixture, sde: SDE) -> ClassifierFn:
    """The exact noise-conditional classifier of a mixture whose components are the classes.

    The logits ``log w_k + log N_k(x)`` of ``gmm.noised(alpha_t, sigma_t)`` (``log p_t(k | x)`` up to
    ``log p_t(x)``): ``logits(x [B, d], t [B]) -> [B, K]``. Book: :ref:`sec-classifier-guidance`.
    """

    def logits(x: Tensor, t: Tensor) -> Tensor:
        t = batch_time(t, x, sde.T)
        m, s = sde.marginal_coeffs(t)
        return gmm.component_log_probs(x, m, s)[0]

    return logits


# ----- inpainting / imputation --------------------------------------------------------------
def _check_mask(mask: Tensor, x_known: Tensor) -> Tensor:
    check_tensor("x_known", x_known, min_dim=2, floating=True)
    if not torch.is_tensor(mask):
        raise TypeError(f"mask must be a torch.Tensor (1 = known, 0 = missing), got {type(mask).__name__}")
    try:
        shape = torch.broadcast_shapes(mask.shape, x_known.shape)
    except RuntimeError:
        shape = None
    if shape != x_known.shape:
        raise ValueError(f"mask of shape {list(mask.shape)} does not broadcast to x_known's shape "
                         f"{list(x_known.shape)}")
    # Read once, before sampling: a mask that is not 0/1 would silently blend data and samples.
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must contain only 0 (missing) and 1 (known)")
    return mask.to(device=x_known.device, dtype=x_known.dtype)


def inpaint_sample(score_fn: ScoreFn, sde: SDE, x_known: Tensor, mask: Tensor, n_steps: int, *,
                   predictor: Optional[StepFn] = reverse_diffusion_step,
                   corrector: Optional[StepFn] = langevin_corrector_step, snr: float = 0.16,
                   n_corrector_steps: int = 1, eps: Optional[float] = None,
                   generator: Optional[torch.Generator] = None, denoise: bool = True,
                   callback: Optional[Callback] = None) -> Tuple[Tensor, int]:
    """Fill in the missing entries of ``x_known`` with an unconditional score model (the replacement method).

    :func:`~minisgm.samplers.pc_sample` (same keyword arguments), except that after every update
    at time ``t`` the known entries are replaced by ``alpha_t x_known + sigma_t z`` (Song et al.
    2021, app. I.2). An approximation: the exact conditional score conditions on the clean
    ``x_known``; corrector steps reduce the error. ``mask``: 1 (known) / 0 (missing), broadcastable
    to ``x_known [B, ...]`` (e.g. ``[1, C, H, W]``). Returns ``(x, nfe)``; the known entries of ``x``
    equal ``x_known`` exactly. Book: :ref:`sec-inpainting`.
    """
    mask = _check_mask(mask, x_known)
    grid = _grid(sde, n_steps, eps, None)
    score = CountedScore(score_fn)
    x_known = x_known.detach()

    def project(x: Tensor, x_mean: Tensor, t: float) -> Tuple[Tensor, Tensor]:
        known_mean, std = sde.marginal(x_known, t)
        known = known_mean + expand(std, x_known) * randn_like(x_known, generator)
        return mask * known + (1 - mask) * x, mask * known_mean + (1 - mask) * x_mean

    update = pc_update(score, sde, predictor=predictor, corrector=corrector, snr=snr,
                       n_corrector_steps=n_corrector_steps, generator=generator, project=project)
    gen_device = generator.device if generator is not None else x_known.device
    x = sde.prior_sample(x_known.shape, generator=generator, device=gen_device, dtype=x_known.dtype).to(x_known.device)
    x, x_mean = project(x, x, grid[0])
    x, x_mean = sample_loop(update, x, grid, callback)
    x = x_mean if denoise else x
    return _finished(mask * x_known + (1 - mask) * x, score.nfe, "inpaint_sample")


# ----- colorization -------------------------------------------------------------------------
def colour_transform(n_channels: int = 3, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """An orthogonal ``[C, C]`` matrix ``M`` whose first row is ``(1, ..., 1) / sqrt(C)``.

    ``u = M x`` (per pixel): ``u_0 = sqrt(C) grey(x)``, the other rows (the Helmert basis) the
    colour; ``M^{-1} = M^T``. Book: :ref:`sec-colorization` (Song et al. 2021, app. I.3).
    """
    if isinstance(n_channels, bool) or not isinstance(n_channels, int) or n_channels < 2:
        raise ValueError(f"n_channels must be an int >= 2, got {n_channels!r}")
    C = n_channels
    M = torch.zeros(C, C, dtype=torch.float64)
    M[0] = 1.0 / math.sqrt(C)
    for k in range(1, C):
        M[k, :k] = 1.0
        M[k, k] = -float(k)
        M[k] /= math.sqrt(k * (k + 1))
    return M.to(device=device, dtype=dtype)


def to_grey(x: Tensor) -> Tensor:
    """The grey image ``[B, 1, H, W]``: the mean over the channels of ``x [B, C, H, W]``."""
    if not torch.is_tensor(x) or x.dim() != 4:
        got = list(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"x must be an image tensor [B, C, H, W], got {got}")
    return x.mean(dim=1, keepdim=True)


def _apply(M: Tensor, x: Tensor) -> Tensor:
    """``M`` applied to the channel vector of every pixel of ``x [B, C, H, W]``."""
    return torch.einsum("ij,bjhw->bihw", M, x)


def colorize_sample(score_fn: ScoreFn, sde: SDE, grey: Tensor, n_steps: int, *, n_channels: int = 3,
                    **inpaint_kwargs) -> Tuple[Tensor, int]:
    """Colour images ``[B, C, H, W]`` whose channel mean is ``grey [B, 1, H, W]`` (on the data's scale).

    Inpainting of the known ``u_0 = sqrt(C) grey`` in the coordinates ``u = M x`` of
    :func:`colour_transform` (Song et al. 2021, app. I.3): the forward SDE is isotropic, so the
    score in ``u`` is ``M score(M^T u, t)``. ``inpaint_kwargs`` go to :func:`inpaint_sample`.
    Returns ``(x, nfe)``. Book: :ref:`sec-colorization`.
    """
    if not torch.is_tensor(grey) or not grey.dtype.is_floating_point or grey.dim() != 4 or grey.shape[1] != 1:
        shape = list(grey.shape) if torch.is_tensor(grey) else type(grey).__name__
        raise ValueError(f"grey must be a floating-point tensor [B, 1, H, W], got {shape}")
    M = colour_transform(n_channels, device=grey.device, dtype=grey.dtype)
    score_fn = CountedScore(score_fn)  # checks the shape of the colour score itself

    def score_u(u: Tensor, t: Tensor) -> Tensor:
        return _apply(M, score_fn(_apply(M.T, u), t))

    B, _, H, W = grey.shape
    u_known = torch.zeros(B, n_channels, H, W, device=grey.device, dtype=grey.dtype)
    u_known[:, :1] = math.sqrt(n_channels) * grey
    mask = torch.zeros(1, n_channels, 1, 1, device=grey.device, dtype=grey.dtype)
    mask[:, 0] = 1.0
    u, nfe = inpaint_sample(score_u, sde, u_known, mask, n_steps, **inpaint_kwargs)
    return _apply(M.T, u), nfe
