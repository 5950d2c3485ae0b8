"""Tests for minisgm.ebm against analytic oracles (Gaussian energies, quadratic scores)."""

import math

import pytest
import torch

from minisgm.data import GaussianMixture
from minisgm.ebm import (
    EnergyMLP,
    energy_score_fn,
    log_partition_quadrature,
    normalized_log_prob_grid,
    quadrature_cost,
    quadrature_grid,
)


def quadratic_energy(A: torch.Tensor, b: torch.Tensor, c: float = 0.0):
    """E(x) = 1/2 (x - b)^T A (x - b) + c: a Gaussian N(b, A^{-1}) with log Z = d/2 log 2pi - 1/2 log det A - c."""

    def energy(x):
        diff = x - b.to(x)
        return 0.5 * ((diff @ A.to(x)) * diff).sum(-1) + c

    return energy


def gaussian_log_z(A: torch.Tensor, c: float = 0.0) -> float:
    d = A.shape[0]
    return 0.5 * d * math.log(2 * math.pi) - 0.5 * torch.logdet(A).item() - c


A2 = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
B2 = torch.tensor([0.3, -0.5], dtype=torch.float64)


@pytest.mark.parametrize("rule", ["simpson", "trapezoid"])
def test_log_z_of_gaussian_1d(rule):
    A = torch.tensor([[1 / 0.7**2]], dtype=torch.float64)
    energy = quadratic_energy(A, torch.tensor([0.4], dtype=torch.float64), c=3.0)
    log_z = log_partition_quadrature(energy, [-8.0], [8.0], 401, rule=rule)
    assert log_z.dtype == torch.float64 and log_z.dim() == 0
    assert abs(log_z.item() - gaussian_log_z(A, c=3.0)) < 1e-8


def test_log_z_of_correlated_gaussian_2d():
    energy = quadratic_energy(A2, B2)
    log_z = log_partition_quadrature(energy, [-9.0, -9.0], [9.0, 9.0], 201)
    assert abs(log_z.item() - gaussian_log_z(A2)) < 1e-7


def test_log_z_of_gaussian_3d_and_float32_module():
    A3 = torch.tensor([[1.5, 0.3, 0.0], [0.3, 1.0, -0.2], [0.0, -0.2, 0.8]], dtype=torch.float64)
    energy = quadratic_energy(A3, torch.zeros(3, dtype=torch.float64))
    log_z = log_partition_quadrature(energy, [-9.0] * 3, [9.0] * 3, 61, rule="trapezoid")
    assert abs(log_z.item() - gaussian_log_z(A3)) < 1e-8
    # A float32 module is evaluated in float32 by default; the sum is still float64.
    torch.manual_seed(0)
    net = EnergyMLP(2, hidden=16, n_layers=2, confinement=1.0)
    z32 = log_partition_quadrature(net, [-8, -8], [8, 8], 161)
    z64 = log_partition_quadrature(net.double(), [-8, -8], [8, 8], 161)
    assert z32.dtype == torch.float64 and abs(z32.item() - z64.item()) < 1e-4


def test_log_z_is_stable_for_huge_energies():
    # exp(-E) underflows to 0 in float64 for E = 1e4; logsumexp must not.
    energy = quadratic_energy(A2, B2, c=1e4)
    log_z = log_partition_quadrature(energy, [-9.0, -9.0], [9.0, 9.0], 101)
    assert torch.isfinite(log_z)
    assert abs(log_z.item() - gaussian_log_z(A2, c=1e4)) < 1e-6


def test_log_z_of_gaussian_mixture_is_zero():
    gmm = GaussianMixture([[-2.0, 0.0], [1.5, 1.0]], stds=[0.5, 0.8], weights=[0.3, 0.7])
    log_z = log_partition_quadrature(lambda x: -gmm.log_prob(x), [-7, -6], [7, 6], 161)
    assert abs(log_z.item()) < 1e-6


def test_simpson_converges_faster_than_trapezoid_on_a_truncating_box():
    # On [0, 1] the integrand exp(-x) is not negligible at the ends, so the trapezoid rule
    # is O(h^2) and Simpson O(h^4). Exact: log(1 - e^-1).
    energy = lambda x: x[:, 0]
    exact = math.log(1 - math.exp(-1))
    errs = {}
    for rule in ("trapezoid", "simpson"):
        errs[rule] = [abs(log_partition_quadrature(energy, [0.0], [1.0], n, rule=rule).item() - exact) for n in (11, 21)]
    # Halving h divides the error by ~4 (trapezoid) and ~16 (Simpson).
    assert 3.5 < errs["trapezoid"][0] / errs["trapezoid"][1] < 4.5
    assert 14 < errs["simpson"][0] / errs["simpson"][1] < 18


def test_quadrature_grid_shapes_order_and_weights():
    points, log_w = quadrature_grid([0.0, -1.0], [1.0, 1.0], 5, rule="simpson", dtype=torch.float32)
    assert points.shape == (25, 2) and points.dtype == torch.float32 and log_w.shape == (25,)
    # Row-major, last axis fastest, like meshgrid(indexing="ij").
    assert torch.equal(points[:5, 0], torch.zeros(5)) and torch.allclose(points[:5, 1], torch.linspace(-1, 1, 5))
    # Weights integrate constants exactly: the box area.
    assert abs(log_w.exp().sum().item() - 2.0) < 1e-12
    p1, lw1 = quadrature_grid([0.0], [2.0], 3, rule="trapezoid")
    assert p1.shape == (3, 1) and torch.allclose(lw1.exp(), torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64))


def test_quadrature_cost():
    assert quadrature_cost(1, 101) == 101
    assert quadrature_cost(3, 10) == 1000
    assert quadrature_cost(784, 2) == 2**784
    with pytest.raises(ValueError, match="d must be"):
        quadrature_cost(0, 10)


def test_normalized_log_prob_grid_sums_to_one_and_matches_log_prob():
    energy = quadratic_energy(A2, B2, c=-2.0)
    axes, log_prob, log_z = normalized_log_prob_grid(energy, [-8, -9], [8, 9], 161)
    assert len(axes) == 2 and log_prob.shape == (161, 161)
    assert abs(log_z.item() - gaussian_log_z(A2, c=-2.0)) < 1e-6
    _, log_w = quadrature_grid([-8, -9], [8, 9], 161)
    assert abs((log_prob.reshape(-1) + log_w).exp().sum().item() - 1.0) < 1e-6
    i, j = 50, 100  # log_prob[i, j] sits at (axes[0][i], axes[1][j])
    x = torch.stack([axes[0][i], axes[1][j]])[None]
    assert torch.allclose(log_prob[i, j], -energy(x)[0] - log_z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_score_of_quadratic_energy_is_analytic(dtype):
    energy = quadratic_energy(A2, B2, c=5.0)
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)
    score = energy_score_fn(energy)(x)
    expected = -(x - B2.to(dtype)) @ A2.to(dtype)  # A symmetric
    assert score.shape == x.shape and score.dtype == dtype
    assert torch.allclose(score, expected, atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_score_of_gaussian_mixture_energy_matches_exact_score():
    gmm = GaussianMixture([[-2.0, 0.0], [1.5, 1.0]], stds=[0.5, 0.8], weights=[0.3, 0.7])
    x = gmm.sample(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    score = energy_score_fn(lambda y: -gmm.log_prob(y))(x)
    assert torch.allclose(score, gmm.score(x), atol=1e-10)


def test_score_ignores_additive_constants_but_not_scaling():
    torch.manual_seed(0)
    net = EnergyMLP(2, hidden=16, n_layers=2).double()
    x = torch.randn(10, 2, dtype=torch.float64)
    s = energy_score_fn(net)(x)
    s_shift = energy_score_fn(lambda y: net(y) + 123.4)(x)  # p * exp(-123.4): same density shape
    s_scale = energy_score_fn(lambda y: 2.0 * net(y))(x)  # p^2: a different density
    assert torch.allclose(s, s_shift, atol=1e-12)
    assert torch.allclose(s_scale, 2 * s, atol=1e-12)
    assert not torch.allclose(s_scale, s)


def test_score_keeps_graph_for_training_and_detaches_under_no_grad():
    torch.manual_seed(0)
    net = EnergyMLP(2, hidden=16, n_layers=2)
    score_fn = energy_score_fn(net)
    x = torch.randn(8, 2)
    loss = score_fn(x).pow(2).sum()
    assert loss.requires_grad
    loss.backward()
    *weights, last_bias = net.parameters()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in weights)
    # The output bias shifts E by a constant, which the score cannot see: it gets no gradient.
    assert last_bias.grad is None
    with torch.no_grad():
        s = score_fn(x)
    assert not s.requires_grad
    assert not x.requires_grad  # the caller's tensor is untouched


def test_score_is_differentiable_in_x_for_implicit_score_matching():
    # d score / dx = -Hessian of E = -A for a quadratic energy.
    energy = quadratic_energy(A2, B2)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    s = energy_score_fn(energy)(x)
    (row0,) = torch.autograd.grad(s[:, 0].sum(), x)
    assert torch.allclose(row0, -A2[0].expand(3, 2))


def test_score_passes_extra_arguments():
    energy = lambda x, t: 0.5 * x.pow(2).sum(-1) / t**2
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.full((4,), 0.5, dtype=torch.float64)
    assert torch.allclose(energy_score_fn(energy)(x, t), -x / 0.25)


def test_energy_mlp_shapes_dtype_and_confinement():
    torch.manual_seed(0)
    net = EnergyMLP(3, hidden=8, n_layers=1, confinement=0.5)
    x = torch.randn(5, 3)
    assert net(x).shape == (5,)
    assert net(x.reshape(5, 3, 1)).shape == (5,)
    free = EnergyMLP(3, hidden=8, n_layers=1)
    free.load_state_dict(net.state_dict())
    assert torch.allclose(net(x) - free(x), 0.25 * x.pow(2).sum(-1))
    # The confined energy is integrable: log Z is finite and stable under a larger box.
    net2 = EnergyMLP(2, hidden=16, n_layers=2, confinement=1.0).double()
    with torch.no_grad():
        z1 = log_partition_quadrature(net2, [-8, -8], [8, 8], 121)
        z2 = log_partition_quadrature(net2, [-12, -12], [12, 12], 181)
    assert abs(z1.item() - z2.item()) < 1e-4


def test_log_partition_gradient_is_model_expectation():
    # d log Z / d theta = -E_p[d E / d theta]: the identity behind maximum likelihood for EBMs.
    torch.manual_seed(0)
    net = EnergyMLP(1, hidden=8, n_layers=1, confinement=1.0).double()
    log_z = log_partition_quadrature(net, [-10.0], [10.0], 801)
    grads = torch.autograd.grad(log_z, list(net.parameters()))
    axes, log_prob, _ = normalized_log_prob_grid(net, [-10.0], [10.0], 801)
    points, log_w = quadrature_grid([-10.0], [10.0], 801)
    expected = torch.autograd.grad(-(net(points) * (log_prob + log_w).exp()).sum(), list(net.parameters()))
    for g, e in zip(grads, expected):
        assert torch.allclose(g, e, atol=1e-10)


def test_bad_inputs_raise_clear_errors():
    energy = quadratic_energy(A2, B2)
    with pytest.raises(ValueError, match="odd n_points"):
        log_partition_quadrature(energy, [-1, -1], [1, 1], 10)
    with pytest.raises(ValueError, match="rule"):
        log_partition_quadrature(energy, [-1, -1], [1, 1], 11, rule="gauss")
    with pytest.raises(ValueError, match="same length"):
        log_partition_quadrature(energy, [-1], [1, 1], 11)
    with pytest.raises(ValueError, match="lows"):
        log_partition_quadrature(energy, [1, -1], [-1, 1], 11)
    with pytest.raises(ValueError, match="max_points"):
        quadrature_grid([0] * 10, [1] * 10, 11)
    with pytest.raises(ValueError, match="one energy per sample|\\[B\\] energies"):
        log_partition_quadrature(lambda x: x, [-1, -1], [1, 1], 11)
    with pytest.raises(ValueError, match="one energy per sample"):
        energy_score_fn(lambda x: x.sum())(torch.randn(3, 2))
    with pytest.raises(TypeError, match="callable"):
        energy_score_fn(3)
    with pytest.raises(TypeError, match="floating-point"):
        energy_score_fn(energy)(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="x must have shape"):
        EnergyMLP(2)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="confinement"):
        EnergyMLP(2, confinement=-1.0)
    with pytest.raises(ValueError, match="hidden"):
        EnergyMLP(2, hidden=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_module_defaults_to_its_device():
    net = EnergyMLP(2, hidden=8, n_layers=1, confinement=1.0).cuda()
    log_z = log_partition_quadrature(net, [-6, -6], [6, 6], 61)
    assert log_z.device.type == "cuda"
    x = torch.randn(4, 2, device="cuda")
    assert energy_score_fn(net)(x).device.type == "cuda"
