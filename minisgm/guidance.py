"""Controllable generation: guided scores, inpainting and colorization with an unconditional model.

Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole (2021), "Score-Based Generative Modeling
through Stochastic Differential Equations", ICLR (arXiv:2011.13456), sec. 5 and app. I.
To sample ``p_0(x | y)`` run the reverse SDE with the conditional score, which Bayes' rule
splits into the unconditional score and the gradient of a forward model (eq. 14, 48):

    grad_x log p_t(x | y) = grad_x log p_t(x) + grad_x log p_t(y | x).

Every guided score here is again a ``score_fn(x [B, ...], t [B]) -> like x``, so it composes
with every sampler of :mod:`minisgm.samplers`. Inpainting and colorization edit the state
between steps: :func:`inpaint_sample` runs the samplers' own predictor-corrector update
(:func:`minisgm.samplers.pc_update`) with a projection that puts the known entries back.
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
    Callback,
    CountedScore,
    StepFn,
    _finished,
    _grid,
    langevin_corrector_step,
    pc_update,
    reverse_diffusion_step,
    sample_loop,
)
from .sde import SDE, ScoreFn, batch_time, expand, randn_like

__all__ = [
    "classifier_guided_score",
    "classifier_free_guided_score",
    "gmm_class_logits_fn",
    "inpaint_sample",
    "colour_transform",
    "to_grey",
    "colorize_sample",
]

ClassifierFn = Callable[[Tensor, Tensor], Tensor]
"""A noise-conditional classifier: ``logits(x [B, ...], t [B]) -> [B, K]`` (``log p_t(y | x)`` up to a constant)."""


# ----- labels -------------------------------------------------------------------------------
def _labels(y, x: Tensor, n_classes: Optional[int] = None) -> Tensor:
    """``y`` (an int or an integer tensor ``[B]``) as a long tensor ``[B]`` on x's device.

    The range ``0..n_classes-1`` of a tensor's values is checked only in debug mode
    (:mod:`minisgm.checks`); an int is checked here.
    """
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
    """The score of ``p_t(x | y)`` (``scale = 1``) or of ``p_t(x) p_t(y | x)^scale``.

        score(x, t) + scale * grad_x log softmax(classifier(x, t))[y]

    (Song et al. 2021, eq. 48 and app. I.1; the guidance scale of Dhariwal & Nichol 2021,
    Algorithm 1). The classifier must be *noise-conditional*: trained on ``x_t``, not ``x_0``.
    Its gradient is taken by autograd; the result is detached, like every score.

    Args:
        score_fn: the unconditional score ``score(x [B, ...], t [B]) -> like x``.
        classifier: ``classifier(x, t) -> logits [B, K]``, e.g. a
            :class:`~minisgm.models.TimeConditionedClassifier` or :func:`gmm_class_logits_fn`.
        y: the target class, an int or a long tensor ``[B]`` (one class per sample).
        scale: guidance scale ``>= 0``; ``0`` is unconditional, ``> 1`` sharpens
            ``p(y | x)`` (less diversity, higher class fidelity).

    Returns:
        ``guided(x [B, ...], t [B]) -> like x``. Book: :ref:`sec-classifier-guidance`.
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

    One network learns the conditional and the unconditional score (labels are dropped to the
    null class during training); their difference is the gradient of an *implicit* classifier,
    ``grad log p_t(y | x) = score(x, t, y) - score(x, t, null)``, so this is classifier
    guidance with scale ``1 + w`` (Ho & Salimans 2022, eq. 6, written for scores; ``w = 0`` is
    the conditional model).

    Args:
        cond_score_fn: ``cond_score_fn(x, t, y) -> like x``, e.g. a
            :class:`~minisgm.models.SmallUNet` or :class:`~minisgm.models.ScoreMLP` built with
            ``num_classes``.
        y: the target class, an int or a long tensor ``[B]``.
        w: guidance strength ``>= 0``.
        null: the label of the unconditional model; ``None`` (the default) is passed as is,
            which the package's networks read as the null class.

    Returns:
        ``guided(x [B, ...], t [B]) -> like x``. Book: :ref:`sec-classifier-free`.
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

    ``p_t`` is ``gmm.noised(alpha_t, sigma_t)``, so ``log p_t(k | x) = log w_k + log N(x; m mu_k,
    m^2 Sigma_k + s^2 I) - log p_t(x)``; the logits returned are the first two terms.
    Returns ``logits(x [B, d], t [B]) -> [B, K]``. Book: :ref:`sec-classifier-guidance`.
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
        raise ValueError(
            f"mask of shape {list(mask.shape)} does not broadcast to x_known's shape {list(x_known.shape)}"
        )
    # Read once, before sampling: a mask that is not 0/1 would silently blend data and samples.
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must contain only 0 (missing) and 1 (known)")
    return mask.to(device=x_known.device, dtype=x_known.dtype)


def inpaint_sample(
    score_fn: ScoreFn,
    sde: SDE,
    x_known: Tensor,
    mask: Tensor,
    n_steps: int,
    *,
    predictor: Optional[StepFn] = reverse_diffusion_step,
    corrector: Optional[StepFn] = langevin_corrector_step,
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    eps: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    denoise: bool = True,
    callback: Optional[Callback] = None,
) -> Tuple[Tensor, int]:
    """Fill in the missing entries of ``x_known`` with an unconditional score model (the replacement method).

    Predictor-corrector sampling as :func:`~minisgm.samplers.pc_sample`, except that after
    every update at time ``t`` the known entries are replaced by a fresh forward-noised copy
    of the data,

        x <- mask * (alpha_t x_known + sigma_t z) + (1 - mask) * x,

    so the missing entries evolve under ``grad log p_t`` evaluated next to a plausible noisy
    version of the known ones (Song et al. 2021, app. I.2). It is an approximation: the
    exact conditional score is ``grad log p_t(x_miss | x_known)`` with ``x_known`` clean, and
    the replaced copy is drawn independently of the current ``x_miss``. Corrector steps pull
    the missing entries towards ``p_t(x_miss | noisy x_known)`` at every ``t`` and so reduce
    the error. On return the known entries equal ``x_known`` exactly.

    Args:
        score_fn: unconditional score ``score(x [B, ...], t [B]) -> like x``.
        x_known: ``[B, ...]``, the data; its entries where ``mask == 0`` are ignored.
        mask: 1 (known) / 0 (missing), broadcastable to ``x_known`` (e.g. ``[1, C, H, W]``).
        n_steps, eps, generator, denoise, callback: as in :func:`~minisgm.samplers.pc_sample`.
        predictor, corrector, snr, n_corrector_steps: as in
            :func:`~minisgm.samplers.pc_sample` (either step may be ``None``, not both).

    Returns:
        ``(x, nfe)``: ``x`` shaped like ``x_known`` and the number of score evaluations.
        Book: :ref:`sec-inpainting`.
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

    ``u = M x`` (per pixel) decouples the channels: ``u_0 = sqrt(C) * grey(x)`` carries the
    grey value, the other ``C - 1`` coordinates the colour. The rows are the Helmert basis,
    ``M_k = (1, ..., 1, -k, 0, ..., 0) / sqrt(k (k + 1))`` (``k`` ones), for ``k = 1..C-1``.
    ``M^{-1} = M^T``. Book: :ref:`sec-colorization` (Song et al. 2021, app. I.3).
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


def colorize_sample(
    score_fn: ScoreFn,
    sde: SDE,
    grey: Tensor,
    n_steps: int,
    *,
    n_channels: int = 3,
    **inpaint_kwargs,
) -> Tuple[Tensor, int]:
    """Colour images ``[B, C, H, W]`` whose channel mean is ``grey [B, 1, H, W]``.

    Colorization is inpainting in decoupled colour coordinates (Song et al. 2021, app. I.3):
    with the orthogonal :func:`colour_transform` ``M``, ``u = M x`` has the known grey value
    ``u_0 = sqrt(C) grey`` and unknown colour coordinates ``u_1..u_{C-1}``. The forward SDE
    is isotropic, so in ``u`` it is the same SDE and its score is ``M score(M^T u, t)``; we
    inpaint channel 0 of ``u`` (:func:`inpaint_sample`) and return ``x = M^T u``, which has
    ``to_grey(x) == grey`` up to rounding.

    Args:
        score_fn: unconditional score of colour images, ``score(x [B, C, H, W], t) -> like x``.
        grey: ``[B, 1, H, W]`` grey images (channel means, on the data's scale).
        n_channels: ``C``.
        inpaint_kwargs: passed on to :func:`inpaint_sample` (predictor, corrector, snr,
            n_corrector_steps, eps, generator, denoise, callback).

    Returns:
        ``(x, nfe)``. Book: :ref:`sec-colorization`.
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
