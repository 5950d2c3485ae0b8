"""Tests of minisgm.digit_features: Frechet distance against closed forms, the classifier's
held-out accuracy, and the nearest-neighbour copy check."""

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm

from minisgm.digit_features import (
    FEATURE_DIM,
    _sklearn_digits,
    classify_digits,
    digit_classifier,
    digit_features,
    digits_frechet_distance,
    digits_split,
    frechet_distance,
    gaussian_stats,
    nearest_neighbour_distances,
)


@pytest.fixture(scope="module")
def digits():
    return _sklearn_digits()


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3.0, size=5), rng.uniform(0.1, 3.0, size=5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_full_covariance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    k = 6
    A, B = rng.normal(size=(k, k)), rng.normal(size=(k, k))
    c1, c2 = A @ A.T + 0.1 * np.eye(k), B @ B.T + 0.1 * np.eye(k)
    mu1, mu2 = rng.normal(size=k), rng.normal(size=k)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * sqrtm(c1 @ c2).real)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-8)
    # symmetric in its two arguments, and torch input works the same as numpy
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)
    assert frechet_distance(mu2, c2, mu1, c1) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(t(mu1), t(c1), t(mu2), t(c2)) == pytest.approx(ref, rel=1e-4)


def test_frechet_singular_covariances_are_finite_and_zero_on_self():
    # rank-1 covariances (as with dead ReLU features): no NaN, and d(P, P) = 0
    v = np.array([[1.0, 2.0, 0.0]])
    c = v.T @ v
    mu = np.array([0.5, -1.0, 2.0])
    assert frechet_distance(mu, c, mu, c) == pytest.approx(0.0, abs=1e-9)
    # 1-D Gaussians along the same line: |sigma1 - sigma2|^2 per the scalar formula
    assert frechet_distance(mu, c, mu, 4 * c) == pytest.approx(np.trace(c) * (1 - 2) ** 2, rel=1e-9)


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="cov2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_classifier_held_out_accuracy(digits):
    images, labels = digits
    train_idx, test_idx = digits_split()
    assert len(set(train_idx.tolist()) & set(test_idx.tolist())) == 0
    assert len(train_idx) + len(test_idx) == len(labels)
    acc = (classify_digits(images[test_idx]) == labels[test_idx]).float().mean().item()
    assert acc > 0.9


def test_classifier_is_cached_and_deterministic(digits):
    from minisgm.digit_features import _train_classifier

    assert digit_classifier() is digit_classifier()
    images, _ = digits
    again = _train_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(again.features(images[:50]), digit_classifier().features(images[:50]))


def test_features_shape_device_dtype_and_validation(digits):
    images, _ = digits
    f = digit_features(images[:7])
    assert f.shape == (7, FEATURE_DIM) and f.dtype == torch.float32
    f64 = digit_features(images[:7].double())
    assert f64.dtype == torch.float64
    torch.testing.assert_close(f64.float(), f)
    # [N, 64] flat input is accepted
    torch.testing.assert_close(digit_features(images[:7].reshape(7, 64)), f)
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        digit_features(torch.zeros(3, 1, 28, 28))
    with pytest.raises(TypeError):
        digit_features([[0.0] * 64])


def test_digits_frechet_distance_identical_floor_and_noise(digits):
    images, _ = digits
    train_idx, test_idx = digits_split()
    real = images[test_idx]
    assert digits_frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    floor = digits_frechet_distance(images[train_idx[: len(test_idx)]], real)
    noise = digits_frechet_distance(torch.rand(real.shape, generator=torch.Generator().manual_seed(0)), real)
    # two real sets are far closer to each other than uniform noise is to real digits
    assert 0 < floor < noise / 5


def test_gaussian_stats_matches_numpy():
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu, cov = gaussian_stats(x)
    np.testing.assert_allclose(mu, x.numpy().mean(0))
    np.testing.assert_allclose(cov, np.cov(x.numpy().T))
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(torch.zeros(1, 4))


def test_nearest_neighbour_finds_exact_copy(digits):
    images, _ = digits
    train = images[:500]
    gen = torch.Generator().manual_seed(0)
    fresh = images[1000:1005] + 0.0
    samples = torch.cat([train[123:124], fresh, train[7:8]])
    d, idx = nearest_neighbour_distances(samples, train, chunk_size=3)
    assert d.shape == (7,) and idx.shape == (7,)
    assert d[0].item() == 0.0 and idx[0].item() == 123
    assert d[-1].item() == 0.0 and idx[-1].item() == 7
    # brute-force oracle for the rest
    full = ((samples[:, None] - train[None]) ** 2).flatten(2).sum(-1).sqrt()
    torch.testing.assert_close(d, full.min(1).values, rtol=1e-5, atol=1e-6)
    assert torch.equal(idx, full.argmin(1))
    noisy = train[:4] + 0.01 * torch.randn(train[:4].shape, generator=gen)
    d2, idx2 = nearest_neighbour_distances(noisy, train)
    assert (d2 > 0).all() and torch.equal(idx2, torch.arange(4))


def test_nearest_neighbour_validation():
    with pytest.raises(ValueError, match="differ in shape"):
        nearest_neighbour_distances(torch.zeros(2, 1, 8, 8), torch.zeros(3, 64))
    with pytest.raises(TypeError):
        nearest_neighbour_distances(np.zeros((2, 3)), torch.zeros(3, 3))
