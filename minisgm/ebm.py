"""Energy-based models ``p(x) = exp(-E(x)) / Z``: an energy network, its score, and ``Z`` by quadrature.

On a grid of ``n`` points per axis ``Z`` costs ``n^d`` energy evaluations (:func:`quadrature_cost`):
fine in one or two dimensions, hopeless beyond a handful. The score ``-grad_x E(x)`` does not need it.
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

__all__ = ["EnergyMLP", "energy_score_fn", "quadrature_cost", "quadrature_grid",
           "log_partition_quadrature", "normalized_log_prob_grid"]

EnergyFn = Callable[..., Tensor]
"""An energy: ``energy(x [B, d], *args) -> [B]``."""


class EnergyMLP(nn.Module):
    """A scalar energy ``E_theta(x)``: an MLP with smooth (SiLU) activations, ``[B, d] -> [B]``.

    ``E(x) = MLP(x) + confinement * ||x||^2 / 2``. Smooth, because score matching differentiates
    ``-grad_x E`` once more (with ReLU the Hessian would vanish almost everywhere). The MLP grows at
    most linearly, so ``exp(-E)`` need not be integrable on ``R^d``; any ``confinement > 0`` makes it
    so. Inputs ``[B, dim]`` or ``[B, ...]`` with ``dim`` entries. Book: :ref:`sec-ebm`.
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
    """The score of an EBM, ``score(x, *args) = -grad_x E(x, *args)``, computed by autograd.

    ``energy_fn(x [B, ...], *args) -> [B]``; extra arguments (``t``, ``sigma``) are passed through.
    With gradients enabled the score keeps its graph (``create_graph=True``), so a loss on it trains
    the energy, and reaches ``x`` itself if ``x.requires_grad`` (ISM); under ``torch.no_grad()`` it
    is detached. Book: :ref:`sec-ebm-score`. Song & Kingma (2021), eq. (3).
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
    """Number of energy evaluations of a tensor-product grid: ``n_points ** d`` (a fixed spacing costs a
    factor ``n`` per dimension). Book: :ref:`sec-partition-quadrature`."""
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


def quadrature_grid(lows: Sequence[float], highs: Sequence[float], n_points: int, rule: str = "simpson",
                    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                    max_points: int = 10**8) -> Tuple[Tensor, Tensor]:
    """Points and log-weights of a tensor-product quadrature rule on a box.

    ``integral f(x) dx ~= sum_i w_i f(x_i)``, ``n_points`` equispaced points per axis of the box
    ``[lows_j, highs_j]``, ``w_i`` the product of the 1-D ``"trapezoid"`` or ``"simpson"`` weights
    (Simpson needs an odd ``n_points``). ``dtype``, ``device`` are those of the points (log-weights
    are float64); grids above ``max_points`` are refused.

    Returns:
        ``(points [N, d], log_weights [N])``, ``N = n_points ** d``, the last axis varying fastest
        (``torch.meshgrid(..., indexing="ij")``). Book: :ref:`sec-partition-quadrature`.
    """
    lows, highs = _check_box(lows, highs)
    if rule not in ("trapezoid", "simpson"):
        raise ValueError(f"rule must be 'trapezoid' or 'simpson', got {rule!r}")
    check_int("n_points", n_points, 2)
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
    for x in points.split(batch_size):
        energy = energy_fn(x)
        if not torch.is_tensor(energy) or energy.shape != (x.shape[0],):
            shape = list(energy.shape) if torch.is_tensor(energy) else type(energy).__name__
            raise ValueError(f"energy_fn must map [B, d] to [B] energies, got {shape} for B={x.shape[0]}")
        chunks.append(energy)
    return torch.cat(chunks)


def log_partition_quadrature(energy_fn: EnergyFn, lows: Sequence[float], highs: Sequence[float],
                             n_points: int, rule: str = "simpson", dtype: Optional[torch.dtype] = None,
                             device: torch.device | str | None = None, batch_size: int = 65536) -> Tensor:
    """``log Z = log integral exp(-E(x)) dx ~= logsumexp_i(-E(x_i) + log w_i)`` on a box (0-d float64).

    The mass outside the box is ignored, so it must hold the region where ``exp(-E)`` matters.
    Cost ``n_points ** d``: a tool for ``d = 1, 2``. Gradients flow into ``energy_fn``'s parameters
    unless under ``torch.no_grad()`` (exact maximum likelihood in 1-D and 2-D). For a smooth density
    that decays inside the box both rules converge exponentially; the textbook ``O(h^4)`` (Simpson)
    and ``O(h^2)`` hold where the integrand is cut off. ``dtype``, ``device``: where the energy is
    evaluated (default: the module's parameters, else float64 on CPU); ``batch_size`` points per
    call. Book: :ref:`sec-partition-quadrature`.
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
    energy_fn: EnergyFn, lows: Sequence[float], highs: Sequence[float], n_points: int, rule: str = "simpson",
    dtype: Optional[torch.dtype] = None, device: torch.device | str | None = None, batch_size: int = 65536,
) -> Tuple[Tuple[Tensor, ...], Tensor, Tensor]:
    """``log p(x) = -E(x) - log Z`` on a grid, ready for ``contourf``/``plot``; detached, float64.

    Returns ``(axes, log_prob, log_Z)``: ``d`` coordinate vectors ``[n_points]``, ``log_prob`` of
    shape ``[n_points] * d`` with ``log_prob[i, j]`` at ``(axes[0][i], axes[1][j])`` (transpose it
    for ``plt.contourf(x, y, ...)``), and a 0-d ``log_Z``. Book: :ref:`sec-partition-quadrature`.
    """
    if not callable(energy_fn):
        raise TypeError(f"energy_fn must be callable, got {type(energy_fn).__name__}")
    dtype, device = _infer_dtype_device(energy_fn, dtype, device)
    points, log_weights = quadrature_grid(lows, highs, n_points, rule, dtype=dtype, device=device)
    with torch.no_grad():
        energy = _evaluate_on_grid(energy_fn, points, batch_size).to(torch.float64)
    log_z = torch.logsumexp(-energy + log_weights, dim=0)
    axes = tuple(torch.linspace(lo, hi, n_points, dtype=torch.float64) for lo, hi in zip(*_check_box(lows, highs)))
    log_prob = (-energy - log_z).reshape([n_points] * points.shape[1]).cpu()
    return axes, log_prob, log_z.cpu()
