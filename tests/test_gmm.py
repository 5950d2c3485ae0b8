"""GaussianMixture and exact_score_fn against brute force: autograd, quadrature, Monte Carlo."""

import math

import pytest
import torch

from minisgm.data import GaussianMixture, exact_log_prob_fn, exact_score_fn
from minisgm.sde import SubVPSDE, VESDE, VPSDE

D64 = torch.float64


def iso_mixture():
    return GaussianMixture([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], [0.5, 0.8, 0.3], [0.2, 0.5, 0.3])


def full_mixture():
    covs = [[[0.5, 0.3], [0.3, 0.4]], [[0.2, -0.1], [-0.1, 0.9]]]
    return GaussianMixture([[-1.0, 0.5], [1.5, -0.5]], weights=[0.7, 0.3], covs=covs)


@pytest.mark.parametrize("make", [iso_mixture, full_mixture])
def test_log_prob_matches_torch_distributions(make):
    g = make()
    x = torch.randn(50, 2, dtype=D64, generator=torch.Generator().manual_seed(0)) * 2
    comps = torch.distributions.MultivariateNormal(g.means, covariance_matrix=g.covs)
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(g.weights), comps)
    torch.testing.assert_close(g.log_prob(x), mix.log_prob(x))


@pytest.mark.parametrize("make", [iso_mixture, full_mixture])
def test_density_integrates_to_one(make):
    g = make()
    h = 0.05
    grid = torch.arange(-8, 8, h, dtype=D64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.ravel(), yy.ravel()], 1)
    total = g.log_prob(pts).exp().sum() * h * h
    assert abs(total.item() - 1.0) < 1e-6


@pytest.mark.parametrize("make", [iso_mixture, full_mixture])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_score_is_gradient_of_log_prob(make, dtype):
    g = make()
    x = (torch.randn(64, 2, generator=torch.Generator().manual_seed(1)) * 2).to(dtype).requires_grad_()
    (grad,) = torch.autograd.grad(g.log_prob(x).sum(), x)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(g.score(x.detach()), grad, atol=tol, rtol=tol)
    assert g.score(x.detach()).dtype == dtype


def test_score_in_higher_dimension_and_image_shaped_input():
    gen = torch.Generator().manual_seed(2)
    means = torch.randn(4, 12, generator=gen, dtype=D64)
    g = GaussianMixture(means, torch.rand(4, generator=gen, dtype=D64) + 0.3)
    x = torch.randn(8, 12, dtype=D64, generator=gen).requires_grad_()
    (grad,) = torch.autograd.grad(g.log_prob(x).sum(), x)
    torch.testing.assert_close(g.score(x.detach()), grad)
    # [B, 3, 2, 2] inputs are flattened to d = 12 and the score keeps their shape.
    s = g.score(x.detach().reshape(8, 3, 2, 2))
    assert s.shape == (8, 3, 2, 2)
    torch.testing.assert_close(s.reshape(8, 12), grad)


def test_sampling_matches_moments_and_weights():
    g = full_mixture()
    x, k = g.sample(200_000, generator=torch.Generator().manual_seed(3), dtype=D64, return_labels=True)
    torch.testing.assert_close(x.mean(0), g.mean(), atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), g.covariance(), atol=0.02, rtol=0)
    freq = torch.bincount(k, minlength=2).to(D64) / len(k)
    torch.testing.assert_close(freq, g.weights, atol=0.005, rtol=0)


def test_sampling_is_reproducible_with_a_generator():
    g = iso_mixture()
    a = g.sample(100, generator=torch.Generator().manual_seed(7))
    b = g.sample(100, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert g.sample(0).shape == (0, 2)


@pytest.mark.parametrize("make", [iso_mixture, full_mixture])
def test_noised_matches_monte_carlo(make):
    """The law of m x + s z: moments, and in 1-D projections the whole CDF (Kolmogorov distance)."""
    g = make()
    m, s = 0.6, 0.9
    gen = torch.Generator().manual_seed(4)
    n = 200_000
    y = m * g.sample(n, generator=gen, dtype=D64) + s * torch.randn(n, 2, generator=gen, dtype=D64)
    q = g.noised(m, s)
    torch.testing.assert_close(y.mean(0), q.mean(), atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(y.T), q.covariance(), atol=0.02, rtol=0)
    # CDF of the first coordinate: marginal of a mixture is the mixture of marginals.
    grid = torch.linspace(-5, 5, 201, dtype=D64)
    var0 = q.covs[:, 0, 0]
    cdf = (q.weights * 0.5 * (1 + torch.erf((grid[:, None] - q.means[:, 0]) / (2 * var0).sqrt()))).sum(1)
    emp = (y[:, 0][None, :] <= grid[:, None]).to(D64).mean(1)
    assert (cdf - emp).abs().max() < 0.006  # ~ 2.7/sqrt(n) is a 99.9% Kolmogorov band


def test_noised_with_zero_noise_and_unit_coeff_is_identity():
    g = full_mixture()
    q = g.noised(1.0, 0.0)
    x = torch.randn(10, 2, dtype=D64)
    torch.testing.assert_close(q.log_prob(x), g.log_prob(x))


@pytest.mark.parametrize("sde", [VESDE(0.01, 10.0), VPSDE(), SubVPSDE()], ids=["ve", "vp", "subvp"])
@pytest.mark.parametrize("make", [iso_mixture, full_mixture])
def test_exact_score_fn_with_times_varying_across_batch(sde, make):
    g = make()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 2, dtype=D64, generator=gen) * 2
    t = torch.rand(16, dtype=D64, generator=gen)
    score = exact_score_fn(g, sde)(x, t)
    logp = exact_log_prob_fn(g, sde)(x, t)
    m, s = sde.marginal_coeffs(t)
    for i in range(16):
        q = g.noised(m[i].item(), s[i].item())
        torch.testing.assert_close(score[i], q.score(x[i : i + 1])[0])
        torch.testing.assert_close(logp[i], q.log_prob(x[i : i + 1])[0])
    # and the score is the gradient of the log-density of p_t
    xr = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(exact_log_prob_fn(g, sde)(xr, t).sum(), xr)
    torch.testing.assert_close(score, grad)


def test_posterior_probs_is_bayes_rule():
    g = iso_mixture()
    x = torch.randn(20, 2, dtype=D64)
    comp = torch.stack(
        [torch.distributions.MultivariateNormal(g.means[k], g.covs[k]).log_prob(x) for k in range(3)], 1
    )
    post = torch.softmax(comp + g.weights.log(), 1)
    torch.testing.assert_close(g.posterior_probs(x), post)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(means=[[0.0, 0.0]], stds=[-1.0]), "stds must be positive"),
        (dict(means=[[0.0, 0.0]], stds=[1.0, 2.0]), r"stds must have shape \[K\]"),
        (dict(means=[[0.0, 0.0]]), "exactly one of stds"),
        (dict(means=[[0.0, 0.0]], stds=[1.0], weights=[-1.0]), "weights must be non-negative"),
        (dict(means=[[0.0, 0.0]], covs=[[[1.0, 2.0], [2.0, 1.0]]]), "positive definite"),
        (dict(means=[[0.0, 0.0]], covs=[[[1.0, 0.5], [0.0, 1.0]]]), "symmetric"),
        (dict(means=[[float("nan"), 0.0]], stds=[1.0]), "non-finite"),
    ],
)
def test_bad_parameters_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)


def test_bad_inputs_raise_clear_errors():
    g = iso_mixture()
    with pytest.raises(ValueError, match=r"x must have shape \[B, 2\]"):
        g.log_prob(torch.zeros(5, 3))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        g.score([[0.0, 0.0]])
    with pytest.raises(ValueError, match="std >= 0"):
        g.noised(1.0, -0.1)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1"):
        exact_score_fn(g, VPSDE())(torch.zeros(2, 2), 1.5)  # a tensor t is checked in debug mode
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        g.sample(-1)
