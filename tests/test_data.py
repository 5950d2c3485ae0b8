"""Tests of the 2-D toy samplers, the digits loader and the CIFAR-10 reader (minisgm.data).

GaussianMixture and the exact scores are tested in tests/test_gmm.py.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle

import numpy as np
import pytest
import torch

import cifar_archive
from minisgm import data
from minisgm.data import (
    CIFAR10_CLASSES,
    checkerboard,
    eight_gaussians,
    eight_gaussians_mixture,
    load_cifar10,
    load_digits,
    rings,
    spirals,
    swiss_roll,
    two_moons,
)

SAMPLERS = [two_moons, swiss_roll, checkerboard, rings, spirals, eight_gaussians]


# ----- 2-D toy samplers ---------------------------------------------------------------------
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_toy_shape_dtype_and_reproducible(sampler, dtype):
    x = sampler(500, generator=torch.Generator().manual_seed(3), dtype=dtype)
    assert x.shape == (500, 2) and x.dtype == dtype and torch.isfinite(x).all()
    y = sampler(500, generator=torch.Generator().manual_seed(3), dtype=dtype)
    assert torch.equal(x, y)
    z = sampler(500, generator=torch.Generator().manual_seed(4), dtype=dtype)
    assert not torch.equal(x, z)
    # Randomness is drawn in float64 first, so dtypes agree up to rounding.
    x64 = sampler(500, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(x.double(), x64, atol=1e-6)
    assert sampler(0).shape == (0, 2)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda f: f.__name__)
def test_toy_unit_scale(sampler):
    x = sampler(40_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert x.mean(0).abs().max() < 0.05
    avg_var = x.var(0).mean()
    assert 0.9 < avg_var < 1.1, avg_var  # documented: average per-coordinate variance about 1


def test_exact_unit_variance_where_promised():
    g = torch.Generator().manual_seed(1)
    n = 200_000
    cb = checkerboard(n, generator=g, dtype=torch.float64)
    assert torch.allclose(cb.var(0), torch.ones(2, dtype=torch.float64), atol=0.015)
    assert cb.abs().max() <= math.sqrt(3) + 1e-12
    r = rings(n, generator=g, dtype=torch.float64, noise=0.0)
    assert abs(float(r.pow(2).sum(1).mean()) - 2.0) < 0.02
    radii = r.norm(dim=1)
    # Four radii R/4, ..., R, chosen with probability proportional to the radius.
    levels = torch.unique(radii.round(decimals=6))
    assert len(levels) == 4 and torch.allclose(levels / levels[-1], torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    s = spirals(n, generator=g, dtype=torch.float64, noise=0.0)
    assert abs(float(s.pow(2).sum(1).mean()) - 2.0) < 0.02


def test_checkerboard_only_dark_squares():
    x = checkerboard(5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64, n_squares=4)
    cell = torch.floor((x + math.sqrt(3)) / (2 * math.sqrt(3) / 4)).long()
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    with pytest.raises(ValueError, match="even"):
        checkerboard(10, n_squares=3)


def test_eight_gaussians_matches_its_mixture():
    gmm = eight_gaussians_mixture(radius=2.0, std=0.05)
    assert gmm.n_components == 8 and torch.allclose(gmm.means.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    x = eight_gaussians(3000, generator=torch.Generator().manual_seed(0), radius=2.0, std=0.05, dtype=torch.float64)
    # Every sample is within 5 std of its nearest mean.
    d = torch.cdist(x, gmm.means).min(dim=1).values
    assert d.max() < 5 * 0.05 * 2
    assert torch.equal(
        x, gmm.sample(3000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )


def test_two_moons_without_noise_lies_on_the_arcs():
    x = two_moons(2000, generator=torch.Generator().manual_seed(0), noise=0.0, dtype=torch.float64)
    scale = math.sqrt((0.75 + 0.5 - 4 / math.pi**2 + (2 / math.pi - 0.25) ** 2) / 2)
    raw = x * scale + torch.tensor([0.5, 0.25], dtype=torch.float64)
    upper = (raw - torch.tensor([0.0, 0.0], dtype=torch.float64)).norm(dim=1)
    lower = (raw - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1)
    assert torch.minimum((upper - 1).abs(), (lower - 1).abs()).max() < 1e-9


def test_toy_device_argument():
    x = rings(10, generator=torch.Generator().manual_seed(0), device="cpu", dtype=torch.float64)
    assert x.device.type == "cpu"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: two_moons(-1), "n must"),
        (lambda: swiss_roll(2.5), "n must"),
        (lambda: rings(5, noise=-0.1), "noise"),
        (lambda: rings(5, n_rings=0), "n_rings"),
        (lambda: spirals(5, turns=0), "turns"),
        (lambda: eight_gaussians(5, std=0.0), "std"),
    ],
)
def test_toy_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_toy_integer_dtype_rejected():
    with pytest.raises(TypeError, match="floating"):
        two_moons(5, dtype=torch.int64)


# ----- digits -------------------------------------------------------------------------------
def test_load_digits():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1
    levels = x * 16
    assert torch.equal(levels, levels.round())  # exactly the 17 levels k / 16
    assert set(y.tolist()) == set(range(10))
    k, y2 = load_digits(return_int=True)
    assert k.dtype == torch.int64 and torch.equal(y, y2)
    assert set(torch.unique(k).tolist()) <= set(range(17)) and k.max() == 16
    assert torch.equal(k.to(torch.float32) / 16, x)
    x64, _ = load_digits(dtype=torch.float64)
    assert x64.dtype == torch.float64 and torch.allclose(x64.float(), x)


def test_load_digits_matches_sklearn():
    from sklearn.datasets import load_digits as sk

    bunch = sk()
    x, y = load_digits()
    assert np.array_equal(x[:, 0].numpy() * 16, bunch.images.astype(np.float32))
    assert np.array_equal(y.numpy(), bunch.target)


# ----- CIFAR-10 -----------------------------------------------------------------------------
def _expected(batches, train=True):
    names = cifar_archive.TRAIN_BATCHES if train else ("test_batch",)
    return (
        np.concatenate([batches[n][0] for n in names]),
        np.concatenate([batches[n][1] for n in names]),
    )


def test_cifar_classes():
    assert CIFAR10_CLASSES == cifar_archive.CLASSES and len(CIFAR10_CLASSES) == 10


@pytest.mark.parametrize("train", [True, False])
def test_cifar_round_trip_tar_gz(cifar10_archive, train):
    path, batches = cifar10_archive
    images, labels = load_cifar10(path, train=train)
    exp_x, exp_y = _expected(batches, train)
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert images.shape == (len(exp_y), 3, 32, 32)
    assert np.array_equal(images.numpy(), exp_x) and np.array_equal(labels.numpy(), exp_y)
    # Parent folder holding only the archive works too; so does a str path.
    images2, _ = load_cifar10(str(path.parent), train=train)
    assert torch.equal(images, images2)


def test_cifar_channel_layout(tmp_path):
    # The row-major [3072] vector is R plane, then G, then B: pixel (r, c) of channel ch sits at
    # ch * 1024 + r * 32 + c.
    flat = np.zeros((1, 3072), dtype=np.uint8)
    flat[0, 0 * 1024 + 1 * 32 + 2] = 10  # R at row 1, col 2
    flat[0, 1 * 1024 + 3 * 32 + 4] = 20  # G at row 3, col 4
    flat[0, 2 * 1024 + 31 * 32 + 0] = 30  # B at row 31, col 0
    files = {name: cifar_archive.batch_bytes(flat, [7]) for name in cifar_archive.TRAIN_BATCHES}
    folder = cifar_archive.write_cifar10_folder(tmp_path, files)
    images, labels = load_cifar10(folder)
    assert images.shape == (5, 3, 32, 32) and labels.tolist() == [7] * 5
    assert images[0, 0, 1, 2] == 10 and images[0, 1, 3, 4] == 20 and images[0, 2, 31, 0] == 30
    assert int(images[0].sum()) == 60


@pytest.mark.parametrize("which", ["folder", "parent"])
def test_cifar_round_trip_extracted_folder(tmp_path, which):
    batches = cifar_archive.make_cifar_like(n_per_batch=3, seed=1)
    folder = cifar_archive.write_cifar10_folder(tmp_path, cifar_archive.member_bytes(batches))
    images, labels = load_cifar10(folder if which == "folder" else tmp_path)
    exp_x, exp_y = _expected(batches)
    assert np.array_equal(images.numpy(), exp_x) and np.array_equal(labels.numpy(), exp_y)


def test_cifar_missing_path_message(tmp_path):
    missing = tmp_path / "nowhere" / "cifar-10-python.tar.gz"
    with pytest.raises(FileNotFoundError) as info:
        load_cifar10(missing)
    msg = str(info.value)
    assert str(missing) in msg and "cifar-10-python.tar.gz" in msg and "https://www.cs.toronto.edu/~kriz/cifar.html" in msg
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path)  # an existing folder with nothing CIFAR in it
    with pytest.raises(TypeError, match="path"):
        load_cifar10(123)


def test_cifar_truncated_archive(cifar10_archive, tmp_path):
    path, _ = cifar10_archive
    raw = path.read_bytes()
    bad = tmp_path / "truncated.tar.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated.tar.gz.*(truncated or corrupt)"):
        load_cifar10(bad)
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"this is not gzip at all" * 10)
    with pytest.raises(ValueError, match="garbage.tar.gz"):
        load_cifar10(garbage)


def test_cifar_missing_member(tmp_path):
    batches = cifar_archive.make_cifar_like(2)
    files = cifar_archive.member_bytes(batches)
    del files["data_batch_3"]
    path = cifar_archive.write_cifar10_archive(tmp_path / "a.tar.gz", files)
    with pytest.raises(ValueError, match="cifar-10-batches-py/data_batch_3"):
        load_cifar10(path)
    load_cifar10(path, train=False)  # the test split is intact
    folder = cifar_archive.write_cifar10_folder(tmp_path / "x", files)
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(folder)


def _with_bad_batch(tmp_path, raw: bytes, name: str = "data_batch_2"):
    files = cifar_archive.member_bytes(cifar_archive.make_cifar_like(2), overrides={name: raw})
    return cifar_archive.write_cifar10_archive(tmp_path / "bad.tar.gz", files)


@pytest.mark.parametrize(
    "batch, match",
    [
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, r"shape \[N, 3072\]"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"labels must lie in 0..9"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, -1]}, r"labels must lie in 0..9"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels for 2 images"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.5, 1.0]}, "only ints"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "missing key b'labels'"),
        ([1, 2, 3], "expected a pickled dict"),
    ],
)
def test_cifar_bad_batch_contents(tmp_path, batch, match):
    path = _with_bad_batch(tmp_path, cifar_archive._pickle_py2_style(batch))
    with pytest.raises(ValueError, match=match) as info:
        load_cifar10(path)
    assert "data_batch_2" in str(info.value)


def test_cifar_corrupt_pickle(tmp_path):
    good = cifar_archive.batch_bytes(np.zeros((2, 3072), np.uint8), [0, 1])
    path = _with_bad_batch(tmp_path, good[: len(good) // 3])
    with pytest.raises(ValueError, match="data_batch_2.*corrupt or refused pickle"):
        load_cifar10(path)


class _Exploit:
    """Unpickling this calls ``os.system(command)``: the classic malicious pickle."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_cifar_restricted_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    raw = pickle.dumps({b"data": _Exploit(f"touch '{marker}'"), b"labels": [0]}, protocol=2)
    path = _with_bad_batch(tmp_path, raw, name="data_batch_1")
    with pytest.raises(ValueError, match="data_batch_1.*refusing to load global '(posix|os|nt).system'"):
        load_cifar10(path)
    assert not marker.exists()  # refused before anything ran
    pickle.loads(raw)  # the plain unpickler does run it: the test's payload is live
    assert marker.exists()


def test_cifar_restricted_unpickler_refuses_builtins():
    raw = b"cbuiltins\neval\n(S'1 + 1'\ntR."
    assert pickle.loads(raw) == 2
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        data._RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()


def test_cifar_accepts_modern_protocols(tmp_path):
    # A batch re-pickled by Python 3 / numpy 2 (protocols 4 and 5) is read the same way.
    img = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    for protocol in (4, 5):
        raw = pickle.dumps({b"data": img, b"labels": [3, 4]}, protocol=protocol)
        files = {name: raw for name in cifar_archive.TRAIN_BATCHES}
        folder = cifar_archive.write_cifar10_folder(tmp_path / f"p{protocol}", files)
        images, labels = load_cifar10(folder)
        assert np.array_equal(images[:2].reshape(2, -1).numpy(), img) and labels[:2].tolist() == [3, 4]


def test_restricted_codecs_encode_only_latin1():
    with pytest.raises(pickle.UnpicklingError):
        data._safe_codecs_encode("x", "rot13")
    assert data._safe_codecs_encode("\xff", "latin1") == b"\xff"


def test_cifar_gzip_of_non_tar(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(gzip.compress(b"not a tar archive" * 100))
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path)
