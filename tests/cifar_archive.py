"""Write small CIFAR-10 archives in the exact python format, for tests (not part of minisgm).

The real ``cifar-10-python.tar.gz`` holds ``cifar-10-batches-py/{data_batch_1..5, test_batch,
batches.meta, readme.html}``; each batch is a protocol-2 pickle of a dict with byte-string keys
``b"batch_label"``, ``b"labels"`` (list of int), ``b"data"`` (uint8 ``[n, 3072]``: R, G, B
planes, row-major) and ``b"filenames"`` (list of bytes); ``batches.meta`` has
``b"label_names"``, ``b"num_cases_per_batch"`` and ``b"num_vis"``. The real archive was
pickled by Python 2 and names numpy's ``numpy.core.multiarray._reconstruct``; we pickle with
protocol 2 and rewrite that global's module name the same way.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _pickle_py2_style(obj) -> bytes:
    raw = pickle.dumps(obj, protocol=2)
    # GLOBAL opcodes are newline-terminated text, so renaming the module keeps the pickle valid.
    return raw.replace(b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n")


def batch_bytes(images: np.ndarray, labels: Sequence[int], batch_label: str = "training batch 1 of 5") -> bytes:
    """One batch file: ``images`` uint8 ``[n, 3, 32, 32]`` (or already ``[n, 3072]``), labels."""
    images = np.asarray(images)
    data = images.reshape(images.shape[0], -1) if images.ndim == 4 else images
    batch = {
        b"batch_label": batch_label.encode(),
        b"labels": [int(v) for v in labels],
        b"data": data,
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(data))],
    }
    return _pickle_py2_style(batch)


def meta_bytes(per_batch: int) -> bytes:
    return _pickle_py2_style(
        {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    )


def make_cifar_like(n_per_batch: int = 4, seed: int = 0) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Random images and labels for the five train batches and the test batch."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in TRAIN_BATCHES + ("test_batch",):
        images = rng.integers(0, 256, size=(n_per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).astype(np.int64)
        out[name] = (images, labels)
    return out


def member_bytes(batches: Dict[str, Tuple[np.ndarray, np.ndarray]], overrides: Optional[Dict[str, bytes]] = None) -> Dict[str, bytes]:
    """File name -> bytes for every member (``overrides`` replaces or adds raw files)."""
    files = {name: batch_bytes(img, lab, name.replace("_", " ")) for name, (img, lab) in batches.items()}
    n = len(next(iter(batches.values()))[1]) if batches else 0
    files["batches.meta"] = meta_bytes(n)
    files["readme.html"] = b"<html>test archive</html>"
    files.update(overrides or {})
    return files


def write_cifar10_archive(path: Path, files: Dict[str, bytes]) -> Path:
    """Write ``files`` as ``cifar-10-batches-py/<name>`` members of a .tar.gz at ``path``."""
    path = Path(path)
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(FOLDER)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for name, raw in files.items():
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(raw)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(raw))
    return path


def write_cifar10_folder(parent: Path, files: Dict[str, bytes]) -> Path:
    """Write ``files`` into ``parent/cifar-10-batches-py/`` (the extracted archive); returns it."""
    folder = Path(parent) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    return folder
