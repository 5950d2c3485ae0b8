"""Write a stand-in CIFAR-10: synthetic 32x32 images in the real python archive format.

CIFAR-10 is not on the project's machines (nor on the GPU machines, which reach no network),
but a training run of a CIFAR-shaped model needs data in its format. This writes
``OUT/cifar-10-batches-py/`` with five training batches and a test batch of coloured discs,
squares and rings on dark, noisy backgrounds (class = shape x 3 + colour family, 9 classes),
through the same writer the tests use (``tests/cifar_archive.py``). Learnable structure, not
photographs: a loss that falls and samples that show shapes say the pipeline works, nothing
about CIFAR-10 FID.

    python benchmarks/standin_cifar10.py runs/standin --per-batch 2000
    python -m minisgm.train --preset cifar10_small --data.path runs/standin
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import cifar_archive  # noqa: E402

COLOURS = np.array([[230, 60, 50], [60, 200, 70], [70, 110, 240]], dtype=np.float32)  # red, green, blue families


def shapes(n: int, rng: np.random.Generator) -> tuple:
    """``n`` images uint8 ``[n, 3, 32, 32]`` and labels in 0..8."""
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    kind = rng.integers(0, 3, n)
    colour = rng.integers(0, 3, n)
    cy, cx = rng.uniform(9, 23, n), rng.uniform(9, 23, n)
    r = rng.uniform(4, 8, n)
    images = np.empty((n, 3, 32, 32), dtype=np.uint8)
    for i in range(n):
        d = np.hypot(yy - cy[i], xx - cx[i])
        if kind[i] == 0:
            mask = d <= r[i]
        elif kind[i] == 1:
            mask = (np.abs(yy - cy[i]) <= r[i]) & (np.abs(xx - cx[i]) <= r[i])
        else:
            mask = np.abs(d - r[i]) <= 1.5
        fg = COLOURS[colour[i]] * rng.uniform(0.7, 1.1) + rng.normal(0, 12, 3)
        bg = rng.uniform(10, 60, 3)
        img = np.where(mask[None], fg[:, None, None], bg[:, None, None]) + rng.normal(0, 6, (3, 32, 32))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return images, (kind * 3 + colour).astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write cifar-10-batches-py/ into")
    parser.add_argument("--per-batch", type=int, default=2000, help="images per batch (6 batches; real CIFAR-10: 10000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.per_batch < 1:
        parser.error("--per-batch must be >= 1")
    rng = np.random.default_rng(args.seed)
    batches = {name: shapes(args.per_batch, rng) for name in cifar_archive.TRAIN_BATCHES + ("test_batch",)}
    folder = cifar_archive.write_cifar10_folder(args.out, cifar_archive.member_bytes(batches))
    print(f"{6 * args.per_batch} stand-in images -> {folder}")


if __name__ == "__main__":
    main()
