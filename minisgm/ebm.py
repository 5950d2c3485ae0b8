"""Energy-based models: an energy network, its score, and the partition function by quadrature.

An energy-based model (EBM) defines a density through an energy ``E(x)``:

    p(x) = exp(-E(x)) / Z,      Z = integral exp(-E(x)) dx.

The normalising constant ``Z`` is an integral over the whole space. On a grid of ``n`` points
per axis it costs ``n^d`` energy evaluations (:func:`quadrature_cost`), which is fine in one or
two dimensions and hopeless beyond a handful. The score does not need it:

    score(x) = grad_x log p(x) = -grad_x E(x)       (log Z does not depend on x).

LeCun, Chopra, Hadsell, Ranzato & Huang (2006), "A tutorial on energy-based learning";
Song & Kingma (2021), "How to train your energy-based models", arXiv:2101.03288, eqs. (1)-(3).
Book: :ref:`sec-ebm`, :ref:`sec-partition-quadrature`, :ref:`sec-ebm-score`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .checks import check_int, check_number

__all__ = [
    "EnergyMLP",
    "energy_score_fn",
    "quadrature_cost",
    "quadrature_grid",
    "log_partition_quadrature",
    "normalized_log_prob_grid",
]

EnergyFn = Callable[..., Tensor]
"""An energy: ``energy(x [B, d], *args) -> [B]``."""


class EnergyMLP(nn.Module):
    """A scalar energy ``E_theta(x)``: an MLP with smooth (SiLU) activations, ``[B, d] -> [B]``.

    ``E(x) = MLP(x) + confinement * ||x||^2 / 2``. The activations are smooth because score
    matching differentiates the score ``-grad_x E`` once more: with ReLU the
    Hessian of ``E`` would vanish almost everywhere. An MLP with SiLU grows at most linearly,
    so ``exp(-E)`` need not be integrable on ``R^d``; any ``confinement > 0`` makes it so.

    Args:
        dim: data dimension ``d`` (inputs ``[B, d]`` or ``[B, ...]`` with ``d`` entries).
        hidden: width of the hidden layers.
        n_layers: number of hidden layers (``>= 1``).
        confinement: weight ``alpha >= 0`` of the quadratic term ``alpha ||x||^2 / 2``.

    Book: :ref:`sec-ebm`.
    """

    def __init__(self, dim: int, hidden: int = 128, n_layers: int = 3, confinement: float = 0.0):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("n_layers", n_layers)):
            check_int(name, value)
        self.dim = dim
        self.confinement = check_number("confinement", confinement, 0.0)
        layers: list[nn.Module] = []
        width = dim
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Energy ``E(x)``, shape ``[B]``."""
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x[0].numel() != self.dim:
            raise ValueError(f"x must have shape [B, {self.dim}] (or [B, ...] with {self.dim} entries), got {list(x.shape)}")
        xf = x.reshape(x.shape[0], self.dim)
        energy = self.net(xf).squeeze(-1)
        if self.confinement:
            energy = energy + 0.5 * self.confinement * xf.pow(2).sum(-1)
        return energy


def energy_score_fn(energy_fn: EnergyFn) -> Callable[..., Tensor]:
    """The score of an EBM, ``score(x) = -grad_x E(x)``, computed by autograd.

    ``log Z`` is a constant in ``x``, so it drops out of the gradient: the score of an
    unnormalised model is exact. Extra arguments (a time ``t`` or a noise level ``sigma``)
    are passed through, so ``energy_fn(x, t)`` gives ``score(x, t)``.

    When gradients are enabled the returned score keeps its graph (``create_graph=True``),
    so a loss on the score can be back-propagated into the energy's parameters, and into
    ``x`` itself if ``x.requires_grad`` (needed by implicit score matching). Under
    ``torch.no_grad()`` the score is still computed, but detached.

    Args:
        energy_fn: ``energy(x [B, ...], *args) -> [B]``.

    Returns:
        ``score(x [B, ...], *args) -> tensor shaped like x``.

    Book: :ref:`sec-ebm-score`. Song & Kingma (2021), eq. (3).
    """
    if not callable(energy_fn):
        raise TypeError(f"energy_fn must be callable, got {type(energy_fn).__name__}")

    def score_fn(x: Tensor, *args) -> Tensor:
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1:
            raise ValueError("x must have a batch dimension: expected shape [B, ...], got a 0-d tensor")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            # Keep x in the graph when the caller tracks it (ISM differentiates the score in x).
            x_in = x if x.requires_grad else x.detach().requires_grad_(True)
            energy = energy_fn(x_in, *args)
            if not torch.is_tensor(energy) or energy.shape != (x.shape[0],):
                shape = list(energy.shape) if torch.is_tensor(energy) else type(energy).__name__
                raise ValueError(f"energy_fn must return one energy per sample, shape [{x.shape[0]}], got {shape}")
            (grad,) = torch.autograd.grad(energy.sum(), x_in, create_graph=create_graph)
        return -grad

    return score_fn


def quadrature_cost(d: int, n_points: int) -> int:
    """Number of energy evaluations of a tensor-product grid: ``n_points ** d``.

    The error of a product rule with ``n`` points per axis is set by the spacing
    ``h = (high - low) / (n - 1)``; keeping ``h`` fixed while ``d`` grows multiplies the cost
    by ``n`` per dimension. Book: :ref:`sec-partition-quadrature`.
    """
    return check_int("n_points", n_points) ** check_int("d", d)


def _check_box(lows: Sequence[float], highs: Sequence[float]) -> Tuple[list, list]:
    lows = [float(v) for v in torch.as_tensor(lows, dtype=torch.float64).reshape(-1)]
    highs = [float(v) for v in torch.as_tensor(highs, dtype=torch.float64).reshape(-1)]
    if len(lows) != len(highs) or not lows:
        raise ValueError(f"lows and highs must have the same length d >= 1, got {len(lows)} and {len(highs)}")
    for i, (lo, hi) in enumerate(zip(lows, highs)):
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"need finite lows[{i}] < highs[{i}], got {lo} and {hi}")
    return lows, highs


def _log_weights_1d(low: float, high: float, n: int, rule: str) -> Tensor:
    """Log of the 1-D quadrature weights on ``n`` equispaced points of ``[low, high]``."""
    h = (high - low) / (n - 1)
    if rule == "trapezoid":
        w = torch.full((n,), h, dtype=torch.float64)
        w[0] = w[-1] = h / 2
    else:  # Simpson: h/3 [1, 4, 2, 4, ..., 2, 4, 1]
        w = torch.full((n,), 2 * h / 3, dtype=torch.float64)
        w[1::2] = 4 * h / 3
        w[0] = w[-1] = h / 3
    return w.log()


def quadrature_grid(
    lows: Sequence[float],
    highs: Sequence[float],
    n_points: int,
    rule: str = "simpson",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    max_points: int = 10**8,
) -> Tuple[Tensor, Tensor]:
    """Points and log-weights of a tensor-product quadrature rule on a box.

    ``integral f(x) dx ~= sum_i w_i f(x_i)`` with ``n_points`` equispaced points per axis and
    ``w_i`` the product of the 1-D trapezoid or Simpson weights (Simpson needs an odd
    ``n_points``). Cost: ``n_points ** d`` points (:func:`quadrature_cost`).

    Args:
        lows, highs: the box ``[low_j, high_j]`` per axis, ``d`` numbers each.
        n_points: points per axis (``>= 2``; odd ``>= 3`` for Simpson).
        rule: ``"trapezoid"`` or ``"simpson"``.
        dtype, device: of the returned points (log-weights are always float64).
        max_points: refuse grids larger than this (the cost grows as ``n^d``).

    Returns:
        ``(points [N, d], log_weights [N])`` with ``N = n_points ** d``, row-major order
        (the last axis varies fastest, like ``torch.meshgrid(..., indexing="ij")``).

    Book: :ref:`sec-partition-quadrature`.
    """
    lows, highs = _check_box(lows, highs)
    if rule not in ("trapezoid", "simpson"):
        raise ValueError(f"rule must be 'trapezoid' or 'simpson', got {rule!r}")
    if not isinstance(n_points, int) or isinstance(n_points, bool) or n_points < 2:
        raise ValueError(f"n_points must be an int >= 2, got {n_points!r}")
    if rule == "simpson" and n_points % 2 == 0:
        raise ValueError(f"Simpson's rule needs an odd n_points (an even number of intervals), got {n_points}")
    d = len(lows)
    cost = quadrature_cost(d, n_points)
    if cost > max_points:
        raise ValueError(
            f"a grid of {n_points} points per axis in d={d} has {cost:.3g} points (n_points^d), "
            f"more than max_points={max_points:.3g}; quadrature does not scale with dimension"
        )
    axes = [torch.linspace(lo, hi, n_points, dtype=torch.float64) for lo, hi in zip(lows, highs)]
    points = torch.cartesian_prod(*axes).reshape(-1, d)  # cartesian_prod drops the axis when d=1
    log_w = [_log_weights_1d(lo, hi, n_points, rule) for lo, hi in zip(lows, highs)]
    log_weights = torch.cartesian_prod(*log_w).reshape(-1, d).sum(-1)
    return points.to(device=device, dtype=dtype), log_weights.to(device=device)


def _infer_dtype_device(energy_fn, dtype, device):
    """Default to the parameters' dtype/device for a module, float64/CPU otherwise."""
    if isinstance(energy_fn, nn.Module):
        param = next(iter(energy_fn.parameters()), None)
        if param is not None:
            return dtype or param.dtype, device or param.device
    return dtype or torch.float64, device


def _evaluate_on_grid(energy_fn, points: Tensor, batch_size: int) -> Tensor:
    chunks = []
    for start in range(0, points.shape[0], batch_size):
        x = points[start : start + batch_size]
        energy = energy_fn(x)
        if not torch.is_tensor(energy) or energy.shape != (x.shape[0],):
            shape = list(energy.shape) if torch.is_tensor(energy) else type(energy).__name__
            raise ValueError(f"energy_fn must map [B, d] to [B] energies, got {shape} for B={x.shape[0]}")
        chunks.append(energy)
    return torch.cat(chunks)


def log_partition_quadrature(
    energy_fn: EnergyFn,
    lows: Sequence[float],
    highs: Sequence[float],
    n_points: int,
    rule: str = "simpson",
    dtype: Optional[torch.dtype] = None,
    device: torch.device | str | None = None,
    batch_size: int = 65536,
) -> Tensor:
    """``log Z = log integral exp(-E(x)) dx`` by a tensor-product quadrature rule on a box.

        log Z ~= logsumexp_i( -E(x_i) + log w_i )

    Summing in log space keeps it finite when energies are large (``exp(-E)`` would
    underflow or overflow). The mass outside the box is ignored, so the box must contain
    the region where ``exp(-E)`` is not negligible. Cost: ``n_points ** d`` energy
    evaluations, so this is a tool for ``d = 1, 2`` (and a demonstration of why it fails
    beyond). Gradients flow into ``energy_fn``'s parameters unless called under
    ``torch.no_grad()``: in 1-D and 2-D that gives exact maximum likelihood.

    Args:
        energy_fn: ``energy(x [B, d]) -> [B]``.
        lows, highs: the integration box, ``d`` numbers each.
        n_points: points per axis (odd for Simpson).
        rule: ``"simpson"`` or ``"trapezoid"``. For a smooth density that decays inside the box both
            converge exponentially in the number of points (Simpson is ``(4 T_h - T_2h) / 3``, so its
            error is about a third of the trapezoid error at spacing ``2h``); the textbook
            ``O(h^4)`` and ``O(h^2)`` hold where the integrand is cut off at the box.
        dtype, device: where the energy is evaluated; default: the module's parameters, or
            float64 on CPU for a plain function.
        batch_size: points per energy call (bounds memory).

    Returns:
        A 0-d float64 tensor ``log Z``.

    Book: :ref:`sec-partition-quadrature`.
    """
    if not callable(energy_fn):
        raise TypeError(f"energy_fn must be callable, got {type(energy_fn).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dtype, device = _infer_dtype_device(energy_fn, dtype, device)
    points, log_weights = quadrature_grid(lows, highs, n_points, rule, dtype=dtype, device=device)
    energy = _evaluate_on_grid(energy_fn, points, batch_size).to(torch.float64)
    return torch.logsumexp(-energy + log_weights, dim=0)


def normalized_log_prob_grid(
    energy_fn: EnergyFn,
    lows: Sequence[float],
    highs: Sequence[float],
    n_points: int,
    rule: str = "simpson",
    dtype: Optional[torch.dtype] = None,
    device: torch.device | str | None = None,
    batch_size: int = 65536,
) -> Tuple[Tuple[Tensor, ...], Tensor, Tensor]:
    """``log p(x) = -E(x) - log Z`` on a grid, ready for ``contourf``/``plot``.

    Returns:
        ``(axes, log_prob, log_Z)``: ``axes`` is a tuple of ``d`` float64 ``[n_points]``
        coordinate vectors, ``log_prob`` has shape ``[n_points] * d`` (``indexing="ij"``:
        ``log_prob[i, j]`` is at ``(axes[0][i], axes[1][j])``; transpose it for
        ``plt.contourf(x, y, ...)``) and ``log_Z`` is a 0-d tensor. All detached, float64.

    Book: :ref:`sec-partition-quadrature`.
    """
    if not callable(energy_fn):
        raise TypeError(f"energy_fn must be callable, got {type(energy_fn).__name__}")
    dtype, device = _infer_dtype_device(energy_fn, dtype, device)
    points, log_weights = quadrature_grid(lows, highs, n_points, rule, dtype=dtype, device=device)
    with torch.no_grad():
        energy = _evaluate_on_grid(energy_fn, points, batch_size).to(torch.float64)
    log_z = torch.logsumexp(-energy + log_weights, dim=0)
    d = points.shape[1]
    axes = tuple(torch.linspace(lo, hi, n_points, dtype=torch.float64) for lo, hi in zip(*_check_box(lows, highs)))
    log_prob = (-energy - log_z).reshape([n_points] * d).cpu()
    return axes, log_prob, log_z.cpu()
