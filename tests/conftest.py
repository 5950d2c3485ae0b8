"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Test helpers (e.g. cifar_archive) live next to the tests and are imported as modules.
sys.path.insert(0, str(Path(__file__).parent))

import cifar_archive  # noqa: E402


@pytest.fixture
def debug_mode():
    """Turn on the checks of tensor values (:mod:`minisgm.checks`) for one test; the test may
    call ``debug_mode(False)`` to turn them off again. Restored afterwards."""
    from minisgm import checks

    before = checks._debug
    checks.set_debug(True)
    yield checks.set_debug
    checks.set_debug(before)


@pytest.fixture
def busy_machine(monkeypatch):
    """A machine whose load average says it is busy and no ``OMP_NUM_THREADS``: the command
    lines then pick fewer CPU threads and print a note (as CI's 2 cores under load did). The
    thread count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cifar10_archive(tmp_path):
    """A tiny CIFAR-10 in the real python format: ``(path of the .tar.gz, batches)``.

    ``batches`` maps ``data_batch_1..5`` / ``test_batch`` to ``(images uint8 [4, 3, 32, 32],
    labels int64 [4])``; ``minisgm.data.load_cifar10(path)`` must return their concatenation.
    """
    batches = cifar_archive.make_cifar_like(n_per_batch=4, seed=0)
    path = cifar_archive.write_cifar10_archive(tmp_path / "cifar-10-python.tar.gz", cifar_archive.member_bytes(batches))
    return path, batches


# ----- training entry points (tests/test_train.py, test_cli.py) ------------------------------
import subprocess  # noqa: E402

#: Overrides that make the default digits preset train in a second or two.
TINY_DIGITS = [
    "--model.nf", "8", "--model.embed_dim", "16", "--train.batch_size", "16",
    "--train.n_steps", "4", "--train.log_every", "2", "--train.ckpt_every", "2",
    "--train.sample_every", "4", "--sample.n_steps", "5", "--sample.n_samples", "4", "--no-progress",
]


def run_module(module: str, *args: str, timeout: float = 240, cwd=None, env=None) -> subprocess.CompletedProcess:
    """``python -m module args...`` in a subprocess with one CPU thread; returns the result."""
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=e
    )


@pytest.fixture(scope="session")
def tiny_digits_run(tmp_path_factory):
    """A run folder of ``python -m minisgm.train`` (digits_vp, tiny overrides, 4 steps). Do not modify."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    res = run_module("minisgm.train", "--run-dir", str(run_dir), *TINY_DIGITS)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir
