"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Test helpers (e.g. cifar_archive) live next to the tests and are imported as modules.
sys.path.insert(0, str(Path(__file__).parent))

import cifar_archive  # noqa: E402


@pytest.fixture
def cifar10_archive(tmp_path):
    """A tiny CIFAR-10 in the real python format: ``(path of the .tar.gz, batches)``.

    ``batches`` maps ``data_batch_1..5`` / ``test_batch`` to ``(images uint8 [4, 3, 32, 32],
    labels int64 [4])``; ``minisgm.data.load_cifar10(path)`` must return their concatenation.
    """
    batches = cifar_archive.make_cifar_like(n_per_batch=4, seed=0)
    path = cifar_archive.write_cifar10_archive(tmp_path / "cifar-10-python.tar.gz", cifar_archive.member_bytes(batches))
    return path, batches
