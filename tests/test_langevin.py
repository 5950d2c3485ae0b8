"""Langevin samplers against exact targets (Gaussian mixtures, Gaussians) and the NCSNv2 recipes."""

import math

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from minisgm.data import GaussianMixture
from minisgm.langevin import (
    annealed_langevin_sample,
    geometric_sigmas,
    langevin_sample,
    mala_sample,
    recommended_n_levels,
    recommended_sigma_max,
    recommended_step_size,
)
from minisgm.metrics import energy_distance

DT = torch.float64
# Overlapping modes: a Langevin chain crosses between them, so the weights are learnable.
GMM = GaussianMixture([[-1.0, 0.0], [1.5, 0.5]], stds=[0.6, 0.8], weights=[0.3, 0.7])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def init(n=2000, seed=0):
    return 2.0 * torch.randn(n, 2, generator=gen(seed), dtype=DT)


def check_samples_match_gmm(x, seed):
    ref = GMM.sample(x.shape[0], generator=gen(seed), dtype=DT)
    ref2 = GMM.sample(x.shape[0], generator=gen(seed + 1), dtype=DT)
    floor = float(energy_distance(ref2, ref))  # V-statistic between two true sample sets
    d = float(energy_distance(x, ref))
    assert d < 3 * floor, (d, floor)
    assert float(energy_distance(init(x.shape[0]), ref)) > 50 * floor  # the start was far
    # E_p[p(k | x)] = w_k: the posterior responsibilities average to the weights.
    w = GMM.posterior_probs(x).mean(0)
    assert torch.allclose(w, GMM.weights, atol=0.04), w


def mala_with_rate(*args, **kwargs):
    """``(x, nfe, acceptance rate)``: the rate averaged over chains and steps from the callback."""
    accepted = []
    x, nfe = mala_sample(*args, callback=lambda k, x, a: accepted.append(a), **kwargs)
    return x, nfe, torch.stack(accepted).double().mean().item()


def test_ula_samples_the_mixture():
    x, nfe = langevin_sample(GMM.score, init(), 0.01, 800, generator=gen(1))
    check_samples_match_gmm(x, seed=2)


def test_mala_samples_the_mixture_and_reports_acceptance():
    x, nfe, rate = mala_with_rate(GMM.log_prob, init(), 0.1, 400, score_fn=GMM.score, generator=gen(3))
    check_samples_match_gmm(x, seed=4)
    assert 0.5 < rate <= 1.0
    assert nfe == 401


def test_mala_autograd_score_equals_given_score():
    a, _, ra = mala_with_rate(GMM.log_prob, init(50), 0.3, 20, score_fn=GMM.score, generator=gen(5))
    b, _, rb = mala_with_rate(GMM.log_prob, init(50), 0.3, 20, generator=gen(5))
    assert torch.allclose(a, b, atol=1e-12) and ra == rb


def test_mala_acceptance_decreases_with_step_size():
    rates = [mala_with_rate(GMM.log_prob, init(), eps, 50, score_fn=GMM.score, generator=gen(6))[2]
             for eps in [0.05, 0.3, 1.0, 2.0]]
    assert all(0 < r <= 1 for r in rates)
    assert all(b < a for a, b in zip(rates, rates[1:])), rates


def test_ula_stationary_variance_on_a_gaussian():
    # On N(0, s^2): x' = (1 - eps/s^2) x + sqrt(2 eps) z, so the stationary variance v solves
    # v = (1 - eps/s^2)^2 v + 2 eps, i.e. v = s^2 / (1 - eps / (2 s^2)): biased, growing with eps.
    s2 = 1.0
    n = 20_000
    x0 = torch.randn(n, 1, generator=gen(7), dtype=DT)
    variances = []
    for eps in [0.1, 0.4, 1.0]:
        x, _ = langevin_sample(lambda y: -y / s2, x0, eps, 150, generator=gen(8))
        v, exact = float(x.var()), s2 / (1 - eps / (2 * s2))
        assert abs(v / exact - 1) < 0.04, (eps, v, exact)
        variances.append(v)
    assert variances[0] < variances[1] < variances[2]


def test_mala_is_unbiased_where_ula_is_not():
    s2 = 1.0
    x0 = 2.0 * torch.randn(20_000, 1, generator=gen(9), dtype=DT)  # start far from the target
    x, _, rate = mala_with_rate(lambda y: -0.5 * y[:, 0] ** 2 / s2, x0, 1.0, 300, generator=gen(10))
    assert abs(float(x.var()) - s2) < 0.04  # ULA with the same step has variance 2.0
    assert 0 < rate < 1


def test_ula_callback_and_dtype():
    seen = []
    x0 = init(10).float()
    x, nfe = langevin_sample(GMM.score, x0, 0.01, 5, generator=gen(11), callback=lambda k, v: seen.append((k, v)))
    assert [k for k, _ in seen] == list(range(5)) and nfe == 5
    assert torch.equal(seen[-1][1], x) and x.dtype == torch.float32 and x.shape == x0.shape
    assert torch.equal(langevin_sample(GMM.score, x0, 0.01, 0)[0], x0)


# ----- annealed Langevin dynamics -----------------------------------------------------------
SEPARATED = GaussianMixture([[-5.0, -5.0], [5.0, 5.0]], stds=1.0, weights=[0.2, 0.8])


def separated_score(x, sigma):
    return SEPARATED.log_prob_and_score_noised(x, torch.ones_like(sigma), sigma)[1]


def test_annealed_langevin_recovers_weights_plain_langevin_does_not():
    # Song & Ermon (2019), fig. 3: uniform start on [-8, 8]^2, weights 1/5 and 4/5.
    n = 2000
    x0 = torch.rand(n, 2, generator=gen(12), dtype=DT) * 16 - 8
    sigmas = geometric_sigmas(20.0, 0.5, 16)
    steps = []
    x, nfe = annealed_langevin_sample(separated_score, x0, sigmas, 0.02, 30, generator=gen(13),
                                      callback=lambda k, v: steps.append(k))
    assert nfe == 16 * 30 + 1 and steps == list(range(16 * 30))
    frac = float((x.sum(1) > 0).double().mean())
    assert abs(frac - 0.8) < 0.04, frac
    # The final Tweedie step shrinks the sigma_L noise: std of a mode ~ 1/sqrt(1 + sigma_L^2).
    std = float(x[x.sum(1) > 0].std(0).mean())
    assert abs(std - 1 / math.sqrt(1.25)) < 0.06, std
    # Plain Langevin with the clean score keeps the split of the uniform start (~1/2).
    x_plain, _ = langevin_sample(SEPARATED.score, x0, 0.05, 500, generator=gen(14))
    frac_plain = float((x_plain.sum(1) > 0).double().mean())
    assert abs(frac_plain - 0.8) > 0.2, frac_plain


def test_annealed_without_denoise_keeps_sigma_L_noise():
    x0 = torch.rand(2000, 2, generator=gen(15), dtype=DT) * 16 - 8
    x, nfe = annealed_langevin_sample(separated_score, x0, geometric_sigmas(20.0, 0.5, 16), 0.02, 30,
                                      denoise=False, generator=gen(16))
    assert nfe == 16 * 30
    std = float(x[x.sum(1) > 0].std(0).mean())
    # Stationary std at level sigma_L with u = 0.02 / 0.25: sqrt(1.25 / (1 - u/2)).
    assert abs(std - math.sqrt(1.25 / (1 - 0.04))) < 0.06, std


def test_technique4_variance_ratio_matches_simulation():
    # One level of annealed Langevin on N(0, sigma_1^2) started from N(0, (gamma sigma_1)^2):
    # after T steps Var/sigma_1^2 = (1-u)^{2T} (gamma^2 - 1/(1-u/2)) + 1/(1-u/2), u = eps/sigma_L^2.
    sigmas = geometric_sigmas(10.0, 0.1, 30)
    T = 5
    eps = recommended_step_size(sigmas, T)
    gamma = float(sigmas[0] / sigmas[1])
    u = eps / float(sigmas[-1]) ** 2
    predicted = (1 - u) ** (2 * T) * (gamma**2 - 1 / (1 - u / 2)) + 1 / (1 - u / 2)
    x0 = gamma * float(sigmas[0]) * torch.randn(50_000, 1, generator=gen(17), dtype=DT)
    snap = {}
    annealed_langevin_sample(lambda x, s: -x / s[:, None] ** 2, x0, sigmas, eps, T, generator=gen(18),
                             callback=lambda k, v: snap.setdefault(k, v.clone()) if k == T - 1 else None)
    ratio = float(snap[T - 1].var()) / float(sigmas[0]) ** 2
    assert abs(ratio / predicted - 1) < 0.03, (ratio, predicted)
    assert 1.0 < predicted < 1.2  # the recommendation keeps the variance close to the target


# ----- NCSNv2 recommendations ---------------------------------------------------------------
def test_geometric_sigmas():
    s = geometric_sigmas(50.0, 0.01, 232)
    assert s.shape == (232,) and abs(float(s[0]) - 50) < 1e-12 and abs(float(s[-1]) - 0.01) < 1e-15
    ratios = s[:-1] / s[1:]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-12)


def test_recommended_sigma_max():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [2.0, 2.0]])
    assert recommended_sigma_max(x) == 5.0
    assert recommended_sigma_max(x[:, None, :]) == 5.0  # any trailing shape


def test_recommended_n_levels_cifar10():
    # Independent solve of Phi(sqrt(2D)(g-1) + 3g) - Phi(sqrt(2D)(g-1) - 3g) = 1/2 for D = 3072.
    D = 3072
    c = lambda g: norm.cdf(math.sqrt(2 * D) * (g - 1) + 3 * g) - norm.cdf(math.sqrt(2 * D) * (g - 1) - 3 * g) - 0.5
    gamma = brentq(c, 1.0 + 1e-9, 2.0)
    assert abs(gamma - 1.0398) < 1e-3
    n = recommended_n_levels(0.01, 50.0, D)
    assert n == math.ceil(math.log(5000) / math.log(gamma)) + 1 == 220
    # NCSNv2 used L = 232 for CIFAR-10, a ratio slightly below this gamma.
    assert (5000 ** (1 / 231)) < gamma
    with pytest.raises(ValueError, match="dim"):
        recommended_n_levels(0.01, 50.0, 2)


def test_recommended_step_size_cifar10():
    # NCSNv2 CIFAR-10: sigma 50 -> 0.01, L = 232, T = 5 gives step_lr = 6.2e-6.
    eps = recommended_step_size(geometric_sigmas(50.0, 0.01, 232), 5)
    assert abs(eps / 6.2e-6 - 1) < 0.01, eps


def test_bad_inputs():
    x0 = init(4)
    with pytest.raises(ValueError, match="step_size"):
        langevin_sample(GMM.score, x0, 0.0, 10)
    with pytest.raises(ValueError, match="step_size"):
        mala_sample(GMM.log_prob, x0, -1.0, 10)
    with pytest.raises(ValueError, match="n_steps"):
        langevin_sample(GMM.score, x0, 0.1, -1)
    with pytest.raises(ValueError, match="score_fn"):
        langevin_sample(lambda y: y[:, :1], x0, 0.1, 1)
    with pytest.raises(ValueError, match="log_prob_fn"):
        mala_sample(lambda y: y, x0, 0.1, 1)
    with pytest.raises(ValueError, match="decreasing"):
        annealed_langevin_sample(separated_score, x0, [0.1, 1.0], 0.01, 1)
    with pytest.raises(ValueError, match="positive"):
        annealed_langevin_sample(separated_score, x0, [1.0, 0.0], 0.01, 1)
    with pytest.raises(ValueError, match="sigma_max > sigma_min"):
        geometric_sigmas(0.1, 1.0, 10)
    with pytest.raises(ValueError, match="n must"):
        geometric_sigmas(1.0, 0.1, 1)
