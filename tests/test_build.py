"""The build layer: one config -> objects path for training, sampling and evaluation.

* ``sde.eps`` reaches every path that uses the smallest time (training, the training-time
  sample grid, ``minisgm.sample``, bits/dim), so a run trained from ``t >= 0.05`` is also
  sampled down to 0.05;
* no host reads per training step and per sampler step: counted by wrapping the methods that
  read a tensor back to the host (on a GPU each one waits for the device);
* your own data: a folder of images (sub-folders = classes) or an array file trains, samples
  and evaluates; bad folders and files stop with one clear line.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_module
from minisgm import samplers as S
from minisgm.build import SAMPLERS, build_data, build_model, build_sde, dataset_info, generate, load_run
from minisgm.config import apply_overrides, get_preset, parse_overrides
from minisgm.train import build_optimizer, ema_update, main, train, train_step

READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")


@contextlib.contextmanager
def host_reads():
    """Count calls that read a tensor's value on the host, by the file that made them.

    Reads from ``torch/optim`` are Adam's step counters, which PyTorch keeps on the host on
    purpose (they never wait for a GPU; fused Adam does not read them at all): not counted.
    """
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name):
        def read(self, *args, **kwargs):
            caller = next((f for f in reversed(traceback.extract_stack()[:-1]) if "torch/_tensor" not in f.filename), None)
            if caller is None or "torch/optim" not in caller.filename:
                counts[f"{name} at {caller.filename}:{caller.lineno}" if caller else name] += 1
            return originals[name](self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counts
    finally:
        for name, f in originals.items():
            setattr(torch.Tensor, name, f)


def tiny(preset: str, *overrides: str):
    cfg = get_preset(preset)
    return apply_overrides(cfg, parse_overrides(cfg, list(overrides)))


# ----- sde.eps ----------------------------------------------------------------------------------
def test_sde_eps_reaches_every_sampling_path(tmp_path):
    cfg = tiny("digits_vp", "--sde.eps", "0.05", "--model.nf", "8", "--model.embed_dim", "16", "--train.batch_size", "8",
               "--train.n_steps", "2", "--train.log_every", "1", "--train.ckpt_every", "2", "--train.sample_every", "0",
               "--sample.n_steps", "4")
    assert build_sde(cfg.sde).eps == 0.05
    run = train(cfg, tmp_path / "run", progress=False)
    model, cfg2, sde, _ = load_run(run)
    assert sde.eps == 0.05
    for name in SAMPLERS:
        seen = []
        steps = 200 if name == "ode" else 4  # for the adaptive solver, a bound on its steps
        generate(model, cfg2, sde, 2, sampler=name, n_steps=steps, callback=lambda i, t, x: seen.append(t))
        assert min(seen) == pytest.approx(0.05), name  # stops at the run's eps, not the SDE's default 1e-3
    # The training loss draws t from [eps, T] too.
    assert float(sde.sample_time(10_000, generator=torch.Generator().manual_seed(0)).min()) >= 0.05


# ----- no host reads in hot loops -------------------------------------------------------------
@pytest.mark.parametrize(
    "preset, overrides",
    [("digits_vp", ["--model.nf", "8"]),
     ("digits_ve", ["--model.nf", "8", "--train.likelihood_weighting", "--train.importance_sampling"]),
     ("cifar10_small", ["--model.nf", "16", "--model.ch_mult", "1,2", "--model.num_res_blocks", "1",
                        "--train.mixed_precision", "false", "--data.path", "unused"])],
)
def test_a_training_step_reads_nothing_back(preset, overrides):
    cfg = tiny(preset, *overrides)
    sde = build_sde(cfg.sde)
    model = build_model(cfg, sde)
    ema = build_model(cfg, sde).requires_grad_(False)
    opt = build_optimizer(cfg.train, model, torch.device("cpu"))
    shape = dataset_info(cfg.data).shape
    g = torch.Generator()
    batches = [(torch.rand(4, *shape, generator=g) * 2 - 1, None, g) for _ in range(2)]  # two micro-batches
    train_step(model, opt, sde, batches, cfg.train, 1e-4)  # warm-up: lazy state of Adam
    with host_reads() as reads:
        for _ in range(3):
            train_step(model, opt, sde, batches, cfg.train, 1e-4)
            ema_update(ema, model, 0.999)
    assert not reads, dict(reads)


def test_the_training_loop_reads_only_at_log_and_checkpoint_steps(tmp_path):
    def run(n_steps: int, folder: str):
        cfg = tiny("digits_vp", "--model.nf", "8", "--model.embed_dim", "16", "--train.batch_size", "8",
                   "--train.n_steps", str(n_steps), "--train.log_every", "1000", "--train.ckpt_every", "1000",
                   "--train.sample_every", "0")
        with host_reads() as reads:
            train(cfg, tmp_path / folder, progress=False)
        return sum(reads.values())

    assert run(2, "a") == run(7, "b")  # five more steps, not one more read


@pytest.mark.parametrize("name", ["em", "pc", "heun", "ancestral", "reverse_diffusion", "ddim", "dpm_solver", "edm"])
def test_a_sampler_step_reads_nothing_back(name):
    cfg = tiny("digits_vp", "--model.nf", "8")
    sde = build_sde(cfg.sde)
    model = build_model(cfg, sde).eval()
    f = {"em": S.euler_maruyama_sample, "pc": S.pc_sample, "heun": S.heun_sample, "ancestral": S.ancestral_sample,
         "reverse_diffusion": S.reverse_diffusion_sample, "ddim": S.ddim_sample, "dpm_solver": S.dpm_solver_sample,
         "edm": functools.partial(S.edm_sample, S_churn=1.0)}[name]

    def reads(n_steps):
        with host_reads() as r, torch.no_grad():
            f(model, sde, (2, 1, 8, 8), n_steps, generator=torch.Generator().manual_seed(0))
        return sum(r.values())

    assert reads(2) == reads(6)  # only the finiteness check after the loop


def test_ncsnpp_forward_reads_nothing_back():
    cfg = tiny("cifar10_small", "--model.nf", "16", "--model.ch_mult", "1,2", "--model.num_res_blocks", "1",
               "--data.path", "unused", "--data.class_conditional")
    sde = build_sde(cfg.sde)
    model = build_model(cfg, sde).eval()
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.7]), torch.tensor([1, 2])
    with host_reads() as reads, torch.no_grad():
        model(x, t, y)
    assert not reads, dict(reads)


# ----- your own data ------------------------------------------------------------------------------
def _write_png_folder(root: Path, sizes, classes=("cat", "dog"), mode="RGB") -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, size in enumerate(sizes):
        folder = root / classes[i % len(classes)] if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def test_a_folder_of_images_trains_samples_and_evaluates(tmp_path):
    data = tmp_path / "pics"
    _write_png_folder(data, [(40, 30), (64, 64), (30, 50), (48, 48)] * 2)
    run = tmp_path / "run"
    res = run_module("minisgm.train", "--preset", "digits_vp", "--data.dataset", "folder", "--data.path", str(data),
                     "--data.image_size", "8", "--data.class_conditional", "--run-dir", str(run), "--model.nf", "8",
                     "--model.embed_dim", "16", "--train.batch_size", "4", "--train.n_steps", "2",
                     "--train.log_every", "1", "--train.sample_every", "2", "--sample.n_steps", "3",
                     "--sample.n_samples", "4", "--no-progress", timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    saved = json.loads((run / "config.json").read_text())["data"]
    assert (saved["image_size"], saved["channels"], saved["num_classes"]) == (8, 3, 2)  # found in the data
    assert (run / "samples" / "step-00000002.png").is_file()
    out = tmp_path / "s.npz"
    res = run_module("minisgm.sample", "--ckpt", str(run), "--n", "3", "--steps", "2", "--class", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    z = np.load(out)
    assert z["samples"].shape == (3, 3, 8, 8) and (z["labels"] == 1).all()


def test_an_array_file_trains(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "x.npz", images=rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8), labels=np.arange(10) % 3)
    cfg = tiny("digits_vp", "--data.dataset", "npz", "--data.path", str(tmp_path / "x.npz"), "--model.nf", "8",
               "--model.embed_dim", "16", "--train.batch_size", "4", "--train.n_steps", "2", "--train.sample_every", "0")
    data = build_data(cfg, torch.device("cpu"))
    assert len(data) == 10 and data.shape == (1, 8, 8) and cfg.data.num_classes == 3
    x, _ = data.batch(0, 0, 1, 4, torch.Generator())
    assert x.shape == (4, 1, 8, 8) and -1 <= float(x.min()) and float(x.max()) <= 1
    run = train(cfg, tmp_path / "run", progress=False)
    assert load_run(run).step == 2


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: d.mkdir(), "no image files"),
        (lambda d: (d.mkdir(), (d / "a.png").write_bytes(b"not an image")), "cannot read the image"),
        (lambda d: _write_png_folder(d, [(8, 8), (10, 8)], classes=()), "different sizes"),
        (lambda d: (d.parent.mkdir(exist_ok=True), d.write_text("x")), "is not a folder"),
    ],
)
def test_bad_image_folders_stop_with_one_line(tmp_path, capsys, make, needle, busy_machine):
    # one line even on a busy machine, whose note on CPU threads waits for training to start
    data = tmp_path / "pics"
    make(data)
    assert main(["--data.dataset", "folder", "--data.path", str(data), "--run-dir", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "arrays, needle",
    [
        ({"images": np.zeros((4, 8, 8, 2), np.uint8)}, "with C in 1 or 3"),
        ({"images": np.full((4, 8, 8), 2.0)}, "must lie in [0, 1]"),
        ({"images": np.zeros((4, 8, 8), np.int32)}, "must be uint8"),
        ({"a": np.zeros((4, 8, 8), np.uint8), "b": np.zeros(3)}, "name the image array 'images'"),
        ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(3, np.int64)}, "labels must be"),
    ],
)
def test_bad_array_files_are_named(tmp_path, capsys, arrays, needle):
    np.savez(tmp_path / "x.npz", **arrays)
    assert main(["--data.dataset", "npz", "--data.path", str(tmp_path / "x.npz"), "--run-dir", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    assert needle in capsys.readouterr().err
