"""ODE likelihoods against exact log-densities of noised Gaussian mixtures; bits/dim formula."""

import math

import pytest
import torch

from minisgm.data import GaussianMixture, exact_log_prob_fn, exact_score_fn
from minisgm.likelihood import bits_per_dim, bpd_from_logp, dequantize, log_likelihood
from minisgm.sde import SubVPSDE, VESDE, VPSDE

F64 = torch.float64


def gmm():
    return GaussianMixture([[-1.0, 0.5], [1.0, 0.5], [0.0, -1.0]], [0.25, 0.25, 0.3], [0.3, 0.3, 0.4])


@pytest.mark.parametrize("sde_cls", [VPSDE, VESDE, SubVPSDE])
def test_ode_logp_matches_exact(sde_cls):
    sde = sde_cls()
    x = gmm().sample(64, torch.Generator().manual_seed(0), dtype=F64)
    logp, nfe = log_likelihood(exact_score_fn(gmm(), sde), sde, x)
    exact = exact_log_prob_fn(gmm(), sde)(x, sde.eps)
    assert logp.shape == (64,) and logp.dtype == F64 and not logp.requires_grad
    assert float((logp - exact).abs().max()) < 0.01
    assert nfe > 0


@pytest.mark.parametrize("sde_cls", [VPSDE, VESDE])
def test_with_the_true_p_T_as_prior_the_ode_likelihood_is_exact(sde_cls):
    # The remaining ~1e-3 error above is prior mismatch (p_T is not exactly N(0, prior_std^2)):
    # give the solver the true p_T and only integration error is left.
    sde = sde_cls()
    exact_fn = exact_log_prob_fn(gmm(), sde)
    sde.prior_logp = lambda z: exact_fn(z, sde.T)
    x = gmm().sample(32, torch.Generator().manual_seed(0), dtype=F64)
    logp, _ = log_likelihood(exact_score_fn(gmm(), sde), sde, x, rtol=1e-7, atol=1e-7)
    assert float((logp - exact_fn(x, sde.eps)).abs().max()) < 1e-4


def test_ode_logp_detects_wrong_model():
    # the check can fail: a different mixture's score gives a visibly different log-density
    sde = VPSDE()
    other = GaussianMixture([[-1.0, 0.5], [1.0, 0.5], [0.0, -1.0]], [0.25, 0.25, 0.3], [0.6, 0.3, 0.1])
    x = gmm().sample(64, torch.Generator().manual_seed(0), dtype=F64)
    logp, _ = log_likelihood(exact_score_fn(other, sde), sde, x, rtol=1e-4, atol=1e-4)
    exact = exact_log_prob_fn(gmm(), sde)(x, sde.eps)
    assert float((logp - exact).abs().max()) > 0.1
    torch.testing.assert_close(logp, exact_log_prob_fn(other, sde)(x, sde.eps), atol=0.01, rtol=0)


def test_full_covariance_and_image_shaped_input():
    # [B, 1, 2, 2] data (D = 4) and an anisotropic component: the divergence loops over all dims
    sde = VPSDE()
    A = torch.tensor([[1.0, 0.3, 0.0, 0.1], [0.3, 0.5, 0.1, 0.0], [0.0, 0.1, 0.8, 0.2], [0.1, 0.0, 0.2, 0.3]], dtype=F64)
    mix = GaussianMixture(torch.zeros(2, 4) + torch.tensor([[0.5], [-0.5]]), weights=[0.4, 0.6], covs=torch.stack([A @ A.T + 0.05 * torch.eye(4, dtype=F64)] * 2))
    x = mix.sample(16, torch.Generator().manual_seed(1), dtype=F64).reshape(16, 1, 2, 2)
    logp, _ = log_likelihood(exact_score_fn(mix, sde), sde, x)
    torch.testing.assert_close(logp, exact_log_prob_fn(mix, sde)(x, sde.eps), atol=0.01, rtol=0)


def test_nfe_counts_score_calls_and_tolerance():
    sde = VPSDE()
    calls = [0]
    base = exact_score_fn(gmm(), sde)

    def score_fn(x, t):
        calls[0] += 1
        return base(x, t)

    x = gmm().sample(8, torch.Generator().manual_seed(0), dtype=F64)
    _, nfe_loose = log_likelihood(score_fn, sde, x, rtol=1e-3, atol=1e-3)
    assert nfe_loose == calls[0]
    _, nfe_tight = log_likelihood(score_fn, sde, x, rtol=1e-7, atol=1e-7)
    assert nfe_tight > nfe_loose


# ----- Hutchinson -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def replicated():
    """8 points, each repeated 64 times: every copy gets its own probes in one ODE solve."""
    sde = VPSDE()
    x = gmm().sample(8, torch.Generator().manual_seed(2), dtype=F64)
    xr = x.repeat(64, 1)  # [512, 2], copy r of point i at row r * 8 + i
    exact, _ = log_likelihood(exact_score_fn(gmm(), sde), sde, x)
    return sde, xr, exact


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_hutchinson_unbiased_and_variance_drops(replicated, kind):
    sde, xr, exact = replicated
    score_fn = exact_score_fn(gmm(), sde)
    stats = {}
    for n_probes in (1, 4):
        est, _ = log_likelihood(score_fn, sde, xr, hutchinson=kind, n_probes=n_probes, generator=torch.Generator().manual_seed(n_probes))
        est = est.reshape(64, 8)
        mean, sd = est.mean(0), est.std(0)
        se = sd / math.sqrt(64)
        # unbiased: the mean over 64 probe draws is within 4 standard errors of the exact divergence
        assert ((mean - exact).abs() <= 4 * se + 2e-3).all(), (mean - exact, se)
        stats[n_probes] = sd.pow(2).mean()
    assert stats[1] > 0
    assert stats[4] < stats[1] / 2  # ~1/n_probes in theory


def test_hutchinson_reproducible():
    sde = VPSDE()
    x = gmm().sample(8, torch.Generator().manual_seed(0), dtype=F64)
    run = lambda s: log_likelihood(exact_score_fn(gmm(), sde), sde, x, rtol=1e-3, atol=1e-3, hutchinson="gaussian", generator=torch.Generator().manual_seed(s))[0]  # noqa: E731
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


# ----- dequantisation and bits/dim ----------------------------------------------------------
def test_dequantize():
    x_int = torch.randint(0, 17, (100, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    u = dequantize(x_int, 17, generator=torch.Generator().manual_seed(1))
    assert u.dtype == torch.float32 and u.shape == x_int.shape
    assert (u >= 0).all() and (u < 1).all()
    assert torch.equal(torch.floor(u * 17).long(), x_int)
    assert torch.equal(u, dequantize(x_int, 17, generator=torch.Generator().manual_seed(1)))
    assert dequantize(x_int.double(), 17).dtype == F64
    # the noise is uniform within each cell: mean offset ~ 1/2
    assert abs(float((u * 17 - x_int).mean()) - 0.5) < 0.01


@pytest.mark.parametrize(
    "x_int,n_levels,match",
    [
        (torch.tensor([[0, 17]]), 17, "0..16"),
        (torch.tensor([[-1, 3]]), 17, "0..16"),
        (torch.tensor([[0.5, 3.0]]), 17, "integer"),
        (torch.tensor([[0, 1]]), 1, "n_levels"),
        (torch.tensor([[0, 1]]), 2.0, "n_levels"),
    ],
)
def test_dequantize_errors(x_int, n_levels, match):
    with pytest.raises(ValueError, match=match):
        dequantize(x_int, n_levels)


@pytest.mark.parametrize("n_levels,D,scale", [(17, 64, 2.0), (256, 3072, 2.0), (256, 5, 1.0), (17, 3, 7.5)])
def test_uniform_density_gives_log2_levels(n_levels, D, scale):
    # p_u = 1 on [0,1]^D  <=>  p_y = scale^-D on the image box: exactly log2(n_levels) bits/dim
    logp_y = torch.full((3,), -D * math.log(scale), dtype=F64)
    torch.testing.assert_close(bpd_from_logp(logp_y, D, n_levels, scale), torch.full((3,), math.log2(n_levels), dtype=F64))


def test_bpd_by_hand():
    # standard normal p_y at y = 0 in D = 2: log p = -log(2 pi); scale 2, 17 levels
    bpd = bpd_from_logp(torch.tensor([-math.log(2 * math.pi)], dtype=F64), 2, 17, 2.0)
    expected = -(-math.log(2 * math.pi) + 2 * math.log(2) - 2 * math.log(17)) / (2 * math.log(2))
    assert float(bpd) == pytest.approx(expected, rel=1e-14)
    assert float(bpd) == pytest.approx(math.log2(17) - 1 + math.log2(2 * math.pi) / 2, rel=1e-14)


def test_bits_per_dim_gaussian_model():
    # A model whose p_y is known exactly: a single Gaussian in D = 4 (image-shaped [B, 1, 2, 2]).
    sde = VPSDE()
    model = GaussianMixture(torch.zeros(1, 4), 0.5)
    x_int = torch.randint(0, 17, (32, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    bpd, nfe = bits_per_dim(exact_score_fn(model, sde), sde, x_int, 17, dtype=F64, generator=torch.Generator().manual_seed(5))
    y = 2.0 * dequantize(x_int, 17, generator=torch.Generator().manual_seed(5), dtype=F64) - 1.0
    expected = bpd_from_logp(exact_log_prob_fn(model, sde)(y, sde.eps), 4, 17, 2.0)
    assert bpd.shape == (32,) and nfe > 0
    torch.testing.assert_close(bpd, expected, atol=0.01 / (4 * math.log(2)), rtol=0)
    # and a closed form: at t = eps, p_y = N(0, (m^2 0.25 + s^2) I)
    m, s = sde.marginal_coeffs(torch.tensor([sde.eps], dtype=F64))
    var = float(m**2 * 0.25 + s**2)
    logp = -0.5 * (y.reshape(32, -1).pow(2).sum(1) / var + 4 * math.log(2 * math.pi * var))
    torch.testing.assert_close(expected, bpd_from_logp(logp, 4, 17, 2.0))


# ----- bad input --------------------------------------------------------------------------
def test_bad_input():
    sde = VPSDE()
    score_fn = exact_score_fn(gmm(), sde)
    x = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="dopri5"):
        log_likelihood(score_fn, sde, x, method="rk45")
    with pytest.raises(ValueError, match="hutchinson"):
        log_likelihood(score_fn, sde, x, hutchinson="normal")
    with pytest.raises(ValueError, match="n_probes"):
        log_likelihood(score_fn, sde, x, hutchinson="gaussian", n_probes=0)
    with pytest.raises(TypeError, match="floating"):
        log_likelihood(score_fn, sde, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="eps"):
        log_likelihood(score_fn, sde, x, eps=0.0)
    with pytest.raises(ValueError, match="shaped like x"):
        log_likelihood(lambda x, t: x[:, :1], sde, x)
    with pytest.raises(ValueError, match="scale"):
        bits_per_dim(score_fn, sde, torch.zeros(4, 2, dtype=torch.long), 17, scale=0.0)
    with pytest.raises(ValueError, match="n_dims"):
        bpd_from_logp(torch.zeros(2), 0, 17)
    with pytest.raises(ValueError, match="empty batch"):
        log_likelihood(score_fn, sde, torch.zeros(0, 2, dtype=F64))


def test_a_nan_score_is_reported_not_an_underflow():
    from minisgm.samplers import NonFiniteSampleError

    sde = VPSDE()
    with pytest.raises(NonFiniteSampleError, match="NaN or infinite"):
        log_likelihood(lambda x, t: torch.full_like(x, float("nan")), sde, torch.zeros(4, 2, dtype=F64))
