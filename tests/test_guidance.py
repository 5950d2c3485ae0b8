"""Guided scores, inpainting and colorization checked against exact oracles.

Oracles: a 2-D Gaussian mixture whose components are the classes (the exact noise-conditional
classifier is its noised posterior, and the exact conditional score is the score of the
noised component), and Gaussians, whose conditionals given some coordinates (or given a
linear function of them) are Gaussian in closed form.
"""

import math

import pytest
import torch

from minisgm.data import GaussianMixture, exact_score_fn
from minisgm.guidance import (
    classifier_free_guided_score,
    classifier_guided_score,
    colorize_sample,
    colour_transform,
    gmm_class_logits_fn,
    inpaint_sample,
    to_grey,
)
from minisgm.metrics import energy_distance
from minisgm.samplers import reverse_diffusion_sample
from minisgm.sde import VESDE, VPSDE, batch_time

F64 = torch.float64


def mixture():
    return GaussianMixture([[-1.0, 0.5], [1.0, 0.5], [0.0, -1.0]], [0.3, 0.25, 0.35], [0.3, 0.4, 0.3])


def component(gmm, k):
    return GaussianMixture(gmm.means[k : k + 1], gmm.stds[k : k + 1])


def gaussian_score_fn(mu, cov, sde):
    """Exact score of the noised Gaussian N(m mu, m^2 cov + s^2 I) for x [B, ...] flattened to d."""

    def score(x, t):
        t = batch_time(t, x, sde.T)
        m, s = sde.marginal_coeffs(t)
        d = mu.numel()
        cov_t = m[:, None, None] ** 2 * cov + s[:, None, None] ** 2 * torch.eye(d, dtype=x.dtype)
        diff = x.reshape(x.shape[0], d) - m[:, None] * mu
        return -torch.linalg.solve(cov_t, diff[..., None])[..., 0].reshape(x.shape)

    return score


def random_points(n=64, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, 2, generator=g, dtype=dtype), torch.rand(n, generator=g, dtype=dtype) * 0.99 + 0.01


# ----- classifier guidance ------------------------------------------------------------------
@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_max=10.0)], ids=["VP", "VE"])
def test_exact_guided_score_is_the_class_conditional_score(sde):
    gmm = mixture()
    x, t = random_points()
    for k in range(3):
        guided = classifier_guided_score(exact_score_fn(gmm, sde), gmm_class_logits_fn(gmm, sde), k, scale=1.0)
        target = exact_score_fn(component(gmm, k), sde)(x, t)
        assert torch.allclose(guided(x, t), target, atol=1e-9, rtol=1e-7)
    # One class per sample, under no_grad (as inside a sampler).
    y = torch.arange(64) % 3
    with torch.no_grad():
        s = classifier_guided_score(exact_score_fn(gmm, sde), gmm_class_logits_fn(gmm, sde), y)(x, t)
    for k in range(3):
        assert torch.allclose(s[y == k], exact_score_fn(component(gmm, k), sde)(x[y == k], t[y == k]), atol=1e-9)


def test_scale_zero_is_unconditional_and_scale_is_linear():
    gmm, sde = mixture(), VPSDE()
    x, t = random_points()
    score, logits = exact_score_fn(gmm, sde), gmm_class_logits_fn(gmm, sde)
    assert torch.allclose(classifier_guided_score(score, logits, 1, 0.0)(x, t), score(x, t))
    s1, s3 = (classifier_guided_score(score, logits, 1, w)(x, t) for w in (1.0, 3.0))
    assert torch.allclose(s3 - score(x, t), 3 * (s1 - score(x, t)), atol=1e-10)


def test_guidance_float32_follows_input_dtype():
    gmm, sde = mixture(), VPSDE()
    x, t = random_points(dtype=torch.float32)
    s = classifier_guided_score(exact_score_fn(gmm, sde), gmm_class_logits_fn(gmm, sde), 2)(x, t)
    assert s.dtype == torch.float32 and not s.requires_grad
    ref = exact_score_fn(component(gmm, 2), sde)(x.double(), t.double())
    assert torch.allclose(s.double(), ref, atol=1e-3, rtol=1e-3)


def test_classifier_free_guidance_is_classifier_guidance_with_scale_one_plus_w():
    gmm, sde = mixture(), VPSDE()
    components = [exact_score_fn(component(gmm, k), sde) for k in range(3)]
    marginal = exact_score_fn(gmm, sde)

    def cond_score(x, t, y):
        if y is None:
            return marginal(x, t)
        return torch.stack([components[k](x, t) for k in range(3)])[y, torch.arange(x.shape[0])]

    x, t = random_points()
    for w in [0.0, 0.5, 2.0]:
        cfg = classifier_free_guided_score(cond_score, 2, w)(x, t)
        cg = classifier_guided_score(marginal, gmm_class_logits_fn(gmm, sde), 2, 1.0 + w)(x, t)
        assert torch.allclose(cfg, cg, atol=1e-9)


def test_classifier_free_guidance_with_the_null_class_of_a_network():
    from minisgm.models import ScoreMLP

    torch.manual_seed(0)
    model = ScoreMLP(2, hidden=32, num_classes=3).double()
    x, t = random_points(8)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    with torch.no_grad():
        expected = 3.0 * model(x, t, y) - 2.0 * model(x, t, None)
        assert torch.allclose(classifier_free_guided_score(model, y, 2.0)(x, t), expected)
        # The explicit null label (num_classes) is the same as None.
        assert torch.allclose(classifier_free_guided_score(model, y, 2.0, null=3)(x, t), expected)
        ones = torch.ones(8, dtype=torch.long)
        assert torch.allclose(classifier_free_guided_score(model, 1, 0.0)(x, t), model(x, t, ones))


def test_guided_sampling_draws_from_the_class_component():
    gmm, sde = mixture(), VPSDE()
    k, n = 1, 1500
    guided = classifier_guided_score(exact_score_fn(gmm, sde), gmm_class_logits_fn(gmm, sde), k)
    x, _ = reverse_diffusion_sample(guided, sde, (n, 2), 300, generator=torch.Generator().manual_seed(1), dtype=F64)
    g = torch.Generator().manual_seed(2)
    ref = component(gmm, k).sample(n, g, dtype=F64)
    floor = max(float(energy_distance(component(gmm, k).sample(n, g, dtype=F64), ref)) for _ in range(3))
    assert float(energy_distance(x, ref)) < 3 * floor
    # Without guidance the samples come from the whole mixture: far above the floor.
    x_u, _ = reverse_diffusion_sample(exact_score_fn(gmm, sde), sde, (n, 2), 300,
                                      generator=torch.Generator().manual_seed(1), dtype=F64)
    assert float(energy_distance(x_u, ref)) > 20 * floor


def test_larger_scale_sharpens_the_class_posterior():
    sde = VPSDE()
    # Overlapping classes, so that scale 1 leaves room to sharpen.
    gmm = GaussianMixture([[-0.5, 0.0], [0.5, 0.0]], [0.5, 0.5])
    score, logits = exact_score_fn(gmm, sde), gmm_class_logits_fn(gmm, sde)
    post = []
    for w in [0.0, 1.0, 4.0]:
        x, _ = reverse_diffusion_sample(classifier_guided_score(score, logits, 0, w), sde, (2000, 2), 200,
                                        generator=torch.Generator().manual_seed(3), dtype=F64)
        post.append(float(gmm.posterior_probs(x)[:, 0].mean()))
    x_class = component(gmm, 0).sample(20000, torch.Generator().manual_seed(4), dtype=F64)
    exact = float(gmm.posterior_probs(x_class)[:, 0].mean())
    assert abs(post[0] - 0.5) < 0.03  # unguided: the prior class probability
    assert abs(post[1] - exact) < 0.02  # scale 1: the true conditional
    assert post[2] > post[1] + 0.05  # scale 4: sharper


# ----- inpainting ---------------------------------------------------------------------------
def correlated_gaussian():
    A = torch.tensor([[1.0, 0, 0, 0], [0.8, 0.6, 0, 0], [0.5, -0.3, 0.6, 0], [-0.4, 0.5, 0.2, 0.5]], dtype=F64)
    return torch.tensor([0.5, -0.5, 1.0, 0.0], dtype=F64), A @ A.T


def test_inpainting_with_correctors_samples_the_exact_conditional():
    mu, cov = correlated_gaussian()
    sde = VESDE(sigma_max=10.0)
    a = torch.tensor([1.5, -1.0], dtype=F64)
    # p(x_miss | x_known = a) = N(mu_m + S_mk S_kk^-1 (a - mu_k), S_mm - S_mk S_kk^-1 S_km)
    gain = cov[2:, :2] @ torch.linalg.inv(cov[:2, :2])
    cond_mean, cond_cov = mu[2:] + gain @ (a - mu[:2]), cov[2:, 2:] - gain @ cov[:2, 2:]
    n = 2000
    x_known = torch.cat([a.expand(n, 2), torch.full((n, 2), 123.0, dtype=F64)], 1)  # missing entries ignored
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64)
    score = gaussian_score_fn(mu, cov, sde)
    x, nfe = inpaint_sample(score, sde, x_known, mask, 100, n_corrector_steps=10,
                            generator=torch.Generator().manual_seed(5))
    assert nfe == 100 * 11
    assert torch.equal(x[:, :2], x_known[:, :2])  # the known entries are returned exactly
    se = (cond_cov.diagonal() / n).sqrt()
    assert ((x[:, 2:].mean(0) - cond_mean).abs() < 4 * se).all()
    assert torch.allclose(torch.cov(x[:, 2:].T), cond_cov, atol=0.04)
    # The replacement method alone (no corrector) is biased: the imputations lean towards the
    # unconditional mean; correctors remove most of the error.
    x_p, nfe_p = inpaint_sample(score, sde, x_known, mask, 100, corrector=None,
                                generator=torch.Generator().manual_seed(5))
    assert nfe_p == 100
    err = lambda y: float((y[:, 2:].mean(0) - cond_mean).norm())  # noqa: E731
    assert err(x_p) > 0.3 and err(x) < 0.1


def test_inpainting_a_mask_broadcast_over_the_batch_and_float32():
    gmm, sde = mixture(), VPSDE()
    x_known = gmm.sample(8, torch.Generator().manual_seed(6))
    mask = torch.tensor([[1.0, 0.0]])
    x, nfe = inpaint_sample(exact_score_fn(gmm, sde), sde, x_known, mask, 20, corrector=None,
                            generator=torch.Generator().manual_seed(7))
    assert x.dtype == torch.float32 and x.shape == (8, 2) and nfe == 20
    assert torch.equal(x[:, 0], x_known[:, 0]) and not torch.allclose(x[:, 1], x_known[:, 1])
    again, _ = inpaint_sample(exact_score_fn(gmm, sde), sde, x_known, mask, 20, corrector=None,
                              generator=torch.Generator().manual_seed(7))
    assert torch.equal(x, again)  # reproducible with a generator


# ----- colorization -------------------------------------------------------------------------
@pytest.mark.parametrize("C", [2, 3, 4])
def test_colour_transform_is_orthogonal_with_the_grey_axis_first(C):
    M = colour_transform(C, dtype=F64)
    assert torch.allclose(M @ M.T, torch.eye(C, dtype=F64), atol=1e-12)
    assert torch.allclose(M[0], torch.full((C,), 1 / math.sqrt(C), dtype=F64))
    x = torch.randn(5, C, 4, 4, generator=torch.Generator().manual_seed(8), dtype=F64)
    u = torch.einsum("ij,bjhw->bihw", M, x)
    assert torch.allclose(u[:, :1], math.sqrt(C) * to_grey(x))
    assert torch.allclose(torch.einsum("ij,bihw->bjhw", M, u), x)  # M^T inverts M


def test_colorization_samples_the_exact_conditional_given_grey():
    # One 3-channel pixel x ~ N(mu, S); given grey = a^T x with a = (1, 1, 1)/3, x is Gaussian
    # with mean mu + S a (g - a^T mu) / (a^T S a) and covariance S - S a a^T S / (a^T S a).
    mu = torch.tensor([0.8, 0.2, -0.3], dtype=F64)
    L = torch.tensor([[0.5, 0, 0], [0.3, 0.4, 0], [-0.2, 0.1, 0.3]], dtype=F64)
    S = L @ L.T
    sde = VESDE(sigma_max=10.0)
    a = torch.full((3,), 1 / 3, dtype=F64)
    g_value = 0.6
    Sa = S @ a
    cond_mean = mu + Sa * (g_value - a @ mu) / (a @ Sa)
    cond_cov = S - torch.outer(Sa, Sa) / (a @ Sa)
    n = 2000
    grey = torch.full((n, 1, 1, 1), g_value, dtype=F64)
    x, _ = colorize_sample(gaussian_score_fn(mu, S, sde), sde, grey, 100, n_corrector_steps=10,
                           generator=torch.Generator().manual_seed(9))
    assert x.shape == (n, 3, 1, 1)
    assert torch.allclose(to_grey(x), grey, atol=1e-12)
    xf = x.flatten(1)
    se = (cond_cov.diagonal() / n).sqrt()
    assert ((xf.mean(0) - cond_mean).abs() < 4 * se + 1e-3).all()
    assert torch.allclose(torch.cov(xf.T), cond_cov, atol=0.01)


# ----- bad inputs ---------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors():
    gmm, sde = mixture(), VPSDE()
    score, logits = exact_score_fn(gmm, sde), gmm_class_logits_fn(gmm, sde)
    x, t = random_points(4)
    with pytest.raises(ValueError, match="scale"):
        classifier_guided_score(score, logits, 0, -1.0)
    with pytest.raises(ValueError, match="0..2"):
        classifier_guided_score(score, logits, 3)(x, t)
    with pytest.raises(ValueError, match="shape"):
        classifier_guided_score(score, logits, torch.zeros(3, dtype=torch.long))(x, t)
    with pytest.raises(TypeError, match="integer"):
        classifier_guided_score(score, logits, torch.zeros(4))(x, t)
    with pytest.raises(ValueError, match="logits"):
        classifier_guided_score(score, lambda x, t: x.sum(1), 0)(x, t)
    with pytest.raises(TypeError, match="callable"):
        classifier_guided_score(score, "classifier", 0)
    with pytest.raises(ValueError, match="w must"):
        classifier_free_guided_score(lambda x, t, y: x, 0, float("nan"))
    with pytest.raises(ValueError, match="does not broadcast"):
        inpaint_sample(score, sde, x, torch.ones(3), 5)
    with pytest.raises(ValueError, match="only 0"):
        inpaint_sample(score, sde, x, torch.full((2,), 0.5, dtype=F64), 5)
    with pytest.raises(ValueError, match="neither"):
        inpaint_sample(score, sde, x, torch.ones(2), 5, predictor=None, corrector=None)
    with pytest.raises(ValueError, match="n_steps"):
        inpaint_sample(score, sde, x, torch.ones(2), 0)
    with pytest.raises(ValueError, match="n_channels"):
        colour_transform(1)
    with pytest.raises(ValueError, match=r"grey must be .*\[B, 1, H, W\]"):
        colorize_sample(score, sde, torch.zeros(2, 3, 4, 4), 5)
    with pytest.raises(TypeError, match="unexpected keyword"):
        colorize_sample(score, sde, torch.zeros(2, 1, 4, 4), 5, sampler="euler")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_follows_the_input_device_with_a_cpu_generator():
    gmm, sde = mixture(), VPSDE()
    x, t = random_points(dtype=torch.float32)
    score, logits = exact_score_fn(gmm, sde), gmm_class_logits_fn(gmm, sde)
    s_cpu = classifier_guided_score(score, logits, 1)(x, t)
    s_gpu = classifier_guided_score(score, logits, torch.ones(64, dtype=torch.long, device="cuda"))(x.cuda(), t.cuda())
    assert s_gpu.is_cuda and torch.allclose(s_gpu.cpu(), s_cpu, atol=1e-4)
    x_known, mask = gmm.sample(16, torch.Generator().manual_seed(10)), torch.tensor([1.0, 0.0])
    kw = dict(corrector=None)
    x_c, _ = inpaint_sample(score, sde, x_known, mask, 20, generator=torch.Generator().manual_seed(11), **kw)
    x_g, _ = inpaint_sample(score, sde, x_known.cuda(), mask.cuda(), 20,
                            generator=torch.Generator().manual_seed(11), **kw)
    assert x_g.is_cuda and torch.allclose(x_g.cpu(), x_c, atol=1e-3)
    grey = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(12))
    image_score = lambda x, t: -x  # noqa: E731  (score of N(0, I) at every t for VP)
    x_col, _ = colorize_sample(image_score, sde, grey.cuda(), 10, generator=torch.Generator().manual_seed(13))
    assert x_col.is_cuda and torch.allclose(to_grey(x_col).cpu(), grey, atol=1e-5)
