"""Sample quality for 8x8 digits: a small classifier's features and the Frechet distance.

The Frechet distance of FID (Heusel et al. 2017, NeurIPS, eq. (6)) between Gaussians fitted to
features of real and generated images, with the features of a small CNN trained on the
scikit-learn digits (deterministically, in a few seconds, once per process) instead of
Inception; plus a nearest-neighbour check, since copies of training images also score well.
Book: :ref:`sec-ncsn-digits`.
"""

from __future__ import annotations

import functools
from typing import Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .data import load_digits

__all__ = ["digits_split", "DigitClassifier", "digit_classifier", "digit_features",
           "classify_digits", "frechet_distance", "gaussian_stats", "digits_frechet_distance",
           "nearest_neighbour_distances"]

FEATURE_DIM = 64
"""Width ``k`` of the penultimate layer, i.e. of :func:`digit_features`."""


def _sklearn_digits() -> Tuple[Tensor, Tensor]:
    return load_digits()  # float32 images k / 16 in [0, 1], shipped with scikit-learn (no download)


def digits_split(test_fraction: float = 0.2, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """A fixed random split of the 1797 scikit-learn digits: ``(train_idx, test_idx)``, long tensors.

    ``test_fraction`` in ``(0, 1)`` is held out. :func:`digit_classifier` is trained on the
    default split's ``train_idx`` (it never sees ``test_idx``).
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n = 1797
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * float(test_fraction)))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


class DigitClassifier(nn.Module):
    """Small CNN: two 3x3 convolutions (16, 32 channels), 2x2 max-pool, ``512 -> 64 -> 10``.

    :meth:`features` is the 64-wide penultimate layer (after its ReLU). The convolutions see
    strokes, so images with digit-like pixel statistics but no strokes are told apart.
    """

    def __init__(self, width: int = 16, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``[N, k]`` of images ``[N, 1, 8, 8]``."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[N, 10]``."""
        return self.head(self.body(x))


def _train_classifier(seed: int = 0, n_steps: int = 300, batch_size: int = 128) -> DigitClassifier:
    images, labels = _sklearn_digits()
    train_idx, _ = digits_split()
    x, y = images[train_idx], labels[train_idx]
    gen = torch.Generator().manual_seed(seed)
    n_threads = torch.get_num_threads()
    # Initialise under a private seed so the caller's global RNG state is untouched, and train
    # on one thread so the order of float sums, hence the weights (and every Frechet distance
    # computed with them), do not depend on the machine's core count.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
        for _ in range(n_steps):
            idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(n_threads)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@functools.lru_cache(maxsize=None)
@torch.enable_grad()  # the first call may come from inside a caller's no_grad block
def digit_classifier(seed: int = 0) -> DigitClassifier:
    """The feature network, trained once per process on ``digits_split()[0]`` (a few seconds).

    Same weights on every call and process (fixed seeds, one thread); CPU, float32, frozen.
    """
    return _train_classifier(seed)


def _check_images(name: str, x) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dim() == 2 and x.shape[1] == 64:
        x = x.reshape(-1, 1, 8, 8)
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ValueError(f"{name} must have shape [N, 1, 8, 8] (or [N, 64]), got {list(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values")
    return x


@torch.no_grad()
def digit_features(images: Tensor) -> Tensor:
    """Penultimate-layer features ``[N, 64]`` of digit images ``[N, 1, 8, 8]`` in ``[0, 1]``.

    The result has the images' device and floating dtype (float32 for integer input).
    """
    x = _check_images("images", images)
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    f = digit_classifier().features(x.detach().to("cpu", torch.float32))
    return f.to(device=x.device, dtype=out_dtype)


@torch.no_grad()
def classify_digits(images: Tensor) -> Tensor:
    """Predicted labels ``[N]`` (long) of digit images ``[N, 1, 8, 8]``."""
    x = _check_images("images", images)
    return digit_classifier()(x.detach().to("cpu", torch.float32)).argmax(1).to(x.device)


def gaussian_stats(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean ``[k]`` and unbiased covariance ``[k, k]`` of features ``[N, k]``, in float64."""
    f = features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape [N, k] with N >= 2, got {list(f.shape)}")
    f = f.astype(np.float64)
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    # Symmetric square root by eigen-decomposition; round-off can leave tiny negative
    # eigenvalues in a PSD matrix, which are clipped to 0 rather than turned into NaNs.
    w, v = np.linalg.eigh(0.5 * (c + c.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Squared Frechet distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``, a float ``>= 0``.

        d^2 = ||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1^{1/2} C2 C1^{1/2})^{1/2})

    Heusel et al. (2017) eq. (6); Dowson & Landau (1982). The square root is taken of the
    *symmetric* PSD matrix ``C1^{1/2} C2 C1^{1/2}`` in float64, so singular covariances are fine.
    """
    arrs = []
    for name, a in (("mu1", mu1), ("cov1", cov1), ("mu2", mu2), ("cov2", cov2)):
        a = a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains non-finite values")
        arrs.append(a.astype(np.float64))
    mu1, cov1, mu2, cov2 = arrs
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must both have shape [k], got {list(mu1.shape)} and {list(mu2.shape)}")
    k = mu1.shape[0]
    for name, c in (("cov1", cov1), ("cov2", cov2)):
        if c.shape != (k, k):
            raise ValueError(f"{name} must have shape [k, k]=[{k}, {k}], got {list(c.shape)}")
    s1 = _psd_sqrt(cov1)
    m = s1 @ cov2 @ s1
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    d2 = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)
    # Round-off can push a true zero slightly negative.
    return max(d2, 0.0)


def digits_frechet_distance(x: Tensor, y: Tensor) -> float:
    """Frechet distance between digit images ``x [N, 1, 8, 8]`` and ``y [M, 1, 8, 8]`` (in ``[0, 1]``).

    Computed in :func:`digit_features` space. Like FID it is biased upwards for small sets:
    compare only numbers computed with equal ``N``.
    """
    return frechet_distance(*gaussian_stats(digit_features(x)), *gaussian_stats(digit_features(y)))


@torch.no_grad()
def nearest_neighbour_distances(samples: Tensor, train: Tensor, chunk_size: int = 1024) -> Tuple[Tensor, Tensor]:
    """Euclidean distance from each sample to its nearest training image, and that image's index.

    ``samples [N, ...]``, ``train [M, ...]`` -> ``(distances [N], indices [N])``; ``chunk_size``
    samples per block bound the memory. A sample that copies a training image has distance 0.
    """
    for name, a in (("samples", samples), ("train", train)):
        if not torch.is_tensor(a):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
        if a.dim() < 2 or a.shape[0] == 0:
            raise ValueError(f"{name} must have shape [N, ...] with N >= 1, got {list(a.shape)}")
    if samples.shape[1:] != train.shape[1:]:
        raise ValueError(f"samples and train items differ in shape: {list(samples.shape[1:])} vs {list(train.shape[1:])}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    dtype = samples.dtype if samples.is_floating_point() else torch.float32
    a = samples.reshape(samples.shape[0], -1).to(torch.float64)
    b = train.reshape(train.shape[0], -1).to(device=a.device, dtype=torch.float64)
    dists, idx = [], []
    for i in range(0, a.shape[0], chunk_size):
        # Direct differences (not the |a|^2 + |b|^2 - 2ab expansion) so an exact copy gives 0.
        d = torch.cdist(a[i : i + chunk_size], b, compute_mode="donot_use_mm_for_euclid_dist")
        v, j = d.min(dim=1)
        dists.append(v)
        idx.append(j)
    return torch.cat(dists).to(dtype), torch.cat(idx)
