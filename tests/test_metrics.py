"""Sample distances: zero on identical sets, closed forms, monotonicity, symmetry, validation."""

import math

import pytest
import torch

from minisgm.metrics import energy_distance, mmd, sliced_wasserstein

DT = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_identical_sets_give_zero():
    x = randn(300, 3)
    assert abs(float(energy_distance(x, x))) < 1e-12
    assert abs(float(mmd(x, x))) < 1e-12
    assert float(sliced_wasserstein(x, x, generator=torch.Generator().manual_seed(0))) < 1e-12
    # The U-statistics are not exactly zero on identical sets, but close (bias ~1/N).
    assert abs(float(energy_distance(x, x, unbiased=True))) < 0.02


def test_energy_distance_normal_shift_closed_form():
    # X ~ N(0,1), Y ~ N(mu,1): X - Y ~ N(-mu, 2) and E|N(m, s^2)| = s sqrt(2/pi) e^{-m^2/2s^2} + m erf(m/(s sqrt 2)).
    def e_abs(m, s):
        return s * math.sqrt(2 / math.pi) * math.exp(-m * m / (2 * s * s)) + m * math.erf(m / (s * math.sqrt(2)))

    n = 4000
    for mu in [0.5, 1.0, 2.0]:
        exact = 2 * e_abs(mu, math.sqrt(2)) - 2 * e_abs(0.0, math.sqrt(2))
        x = randn(n, 1, seed=1)
        y = randn(n, 1, seed=2) + mu
        est = float(energy_distance(x, y, unbiased=True))
        assert abs(est - exact) < 0.1 * exact + 0.01, (mu, est, exact)
        # The V-statistic is above the U-statistic by exactly (E|X-X'| + E|Y-Y'|) / N (V-means).
        v = float(energy_distance(x, y))
        assert v > est


def test_v_minus_u_energy_distance_is_the_diagonal_correction():
    x, y = randn(50, 2, seed=3), randn(70, 2, seed=4)
    dxx = torch.cdist(x, x).sum() / 50**2
    dyy = torch.cdist(y, y).sum() / 70**2
    u = energy_distance(x, y, unbiased=True)
    v = energy_distance(x, y)
    expected = dxx * 50 / 49 + dyy * 70 / 69 - dxx - dyy  # U-means minus V-means
    assert torch.allclose(v - u, expected, atol=1e-12)


def test_w2_of_shifted_1d_sets_is_the_shift_exactly():
    x = randn(500, 1, seed=5)
    for shift in [0.1, 1.0, 3.0]:
        w = sliced_wasserstein(x, x + shift, n_projections=4, generator=torch.Generator().manual_seed(0))
        assert abs(float(w) - shift) < 1e-12


def test_w_unequal_sizes_exact_quantile_formula():
    # x = {0, 1}, y = {0, 1, 2}: quantile functions on (0,1) give
    # |0-0| on (0,1/3), |0-1| on (1/3,1/2), |1-1| on (1/2,2/3), |1-2| on (2/3,1) -> W2^2 = 1/6 + 1/3.
    x = torch.tensor([[0.0], [1.0]], dtype=DT)
    y = torch.tensor([[0.0], [1.0], [2.0]], dtype=DT)
    w = sliced_wasserstein(x, y, n_projections=3)
    assert abs(float(w) - math.sqrt(0.5)) < 1e-12
    w1 = sliced_wasserstein(x, y, n_projections=3, p=1)
    assert abs(float(w1) - 0.5) < 1e-12
    # Repeating each point keeps the empirical measure: W between {x} and {x, x} is 0.
    z = randn(30, 2, seed=6)
    assert float(sliced_wasserstein(z, torch.cat([z, z]), generator=torch.Generator().manual_seed(1))) < 1e-12


def test_sliced_w2_of_shift_in_d_dims():
    # E_theta (theta . c)^2 = |c|^2 / d for theta uniform on the sphere.
    d = 4
    x = randn(200, d, seed=7)
    c = torch.tensor([1.0, 2.0, 0.0, -2.0], dtype=DT)
    sw = float(sliced_wasserstein(x, x + c, n_projections=20_000, generator=torch.Generator().manual_seed(2)))
    assert abs(sw - c.norm().item() / math.sqrt(d)) < 0.03


@pytest.mark.parametrize("metric", ["energy", "mmd", "sw"])
def test_monotone_in_separation_and_symmetric(metric):
    x = randn(400, 2, seed=8)
    y0 = randn(400, 2, seed=9)

    def f(a, b):
        if metric == "energy":
            return float(energy_distance(a, b))
        if metric == "mmd":
            return float(mmd(a, b, bandwidths=[0.5, 1.0, 2.0]))
        return float(sliced_wasserstein(a, b, generator=torch.Generator().manual_seed(3)))

    vals = [f(x, y0 + torch.tensor([s, 0.0], dtype=DT)) for s in [0.0, 0.5, 1.0, 2.0, 4.0]]
    assert all(b > a for a, b in zip(vals, vals[1:])), vals
    y = y0 + 1.0
    assert abs(f(x, y) - f(y, x)) < 1e-10


def test_mmd_closed_form_for_two_points():
    # One point each at distance r: MMD^2 = 2 - 2 exp(-r^2 / (2 h^2)) for a single bandwidth.
    x = torch.tensor([[0.0, 0.0]], dtype=DT)
    y = torch.tensor([[3.0, 4.0]], dtype=DT)
    assert abs(float(mmd(x, y, bandwidths=2.0)) - (2 - 2 * math.exp(-25 / 8))) < 1e-12
    # Median heuristic: pooled median distance is 5, bandwidths 2.5, 5, 10.
    expected = 2 - 2 * sum(math.exp(-25 / (2 * h * h)) for h in (2.5, 5.0, 10.0)) / 3
    assert abs(float(mmd(x, y)) - expected) < 1e-12


def test_unbiased_mmd_near_zero_for_same_law():
    x, y = randn(500, 2, seed=10), randn(500, 2, seed=11)
    u = float(mmd(x, y, unbiased=True))
    v = float(mmd(x, y))
    assert abs(u) < 0.005
    assert v > u


def test_float32_and_nonflat_inputs():
    x = randn(64, 2, 3, seed=12).float()
    y = randn(64, 2, 3, seed=13).float()
    for val in (energy_distance(x, y), mmd(x, y), sliced_wasserstein(x, y)):
        assert val.dtype == torch.float32 and val.dim() == 0 and torch.isfinite(val)


def test_shape_validation():
    x = randn(10, 2)
    with pytest.raises(ValueError, match="trailing shape"):
        energy_distance(x, randn(10, 3))
    with pytest.raises(ValueError, match="trailing shape"):
        sliced_wasserstein(x, randn(10, 2, 1))
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(x, x, bandwidths=[1.0, -1.0])
    with pytest.raises(ValueError, match="n_projections"):
        sliced_wasserstein(x, x, n_projections=0)
    with pytest.raises(ValueError, match="at least 2"):
        energy_distance(x[:1], x, unbiased=True)
    with pytest.raises(TypeError, match="x must be"):
        mmd([[0.0, 1.0]], x)
