"""Importing score_sde_pytorch checkpoints: the converted model must give the official scores.

The oracle: ``tests/data/score_sde_<case>.pth`` are small networks written by the official
code (``tests/data/make_score_sde_fixtures.py``; random weights, two training steps, its own
checkpoint format) and ``..._expected.pt`` their scores ``s(x, t)`` from the official
``get_score_fn`` with the raw and with the EMA weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_module
from minisgm.checkpoint import CheckpointError, save_checkpoint
from minisgm.config import ConfigError, apply_overrides, get_preset, parse_overrides
from minisgm.convert import convert_state_dict, import_checkpoint, main as convert_main, reference_order
from minisgm.build import load_run
from minisgm.build import build_model

DATA = Path(__file__).parent / "data"
CASES = ["ve_ncsnpp", "vp_ddpmpp", "subvp_ddpmpp", "ve_ncsnpp_skip"]


def expected(case):
    return torch.load(DATA / f"score_sde_{case}_expected.pt", weights_only=True)


def shrink_args(exp) -> list:
    """The overrides that give minisgm's preset the fixture's model fields."""
    args = []
    for key, value in exp["model"].items():
        args += [f"--model.{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return args


def config_for(case):
    exp = expected(case)
    cfg = get_preset(exp["preset"])
    apply_overrides(cfg, parse_overrides(cfg, shrink_args(exp)))
    return cfg, exp


def model_from(state, which):
    from minisgm.config import config_from_dict

    cfg = config_from_dict(state["config"])
    model = build_model(cfg).eval()
    model.load_state_dict(state[which])
    return model


def assert_scores_close(got, want):
    # float32 through ~20 layers: agreement to ~1e-6 of the largest score
    err = float((got - want).abs().max() / want.abs().max())
    assert err < 1e-4, err


@pytest.mark.parametrize("case", CASES)
def test_imported_weights_give_the_official_scores(case):
    cfg, exp = config_for(case)
    state = import_checkpoint(DATA / f"score_sde_{case}.pth", cfg)
    assert state["step"] == 2
    assert state["config"]["sde"]["exact_variance"] is (cfg.sde.kind != "ve")
    with torch.no_grad():
        for which, key in (("ema", "score_ema"), ("model", "score_model")):
            model = model_from(state, which)
            assert_scores_close(model(exp["x"], exp["t"]), exp[key])
        # EMA and raw weights differ, so matching both checks the EMA's parameter order too.
        diff = (exp["score_ema"] - exp["score_model"]).abs().max() / exp["score_model"].abs().max()
        assert diff > 1e-2


def test_ve_needs_the_official_sigma_convention():
    # With the exact VE variance the network would be fed log sqrt(sigma^2 - sigma_min^2):
    # visibly wrong at small t, which is why import_checkpoint switches the convention.
    cfg, exp = config_for("ve_ncsnpp")
    state = import_checkpoint(DATA / "score_sde_ve_ncsnpp.pth", cfg)
    state["config"]["sde"]["exact_variance"] = True
    with torch.no_grad():
        got = model_from(state, "ema")(exp["x"], exp["t"])
    err = (got[0] - exp["score_ema"][0]).abs().max() / exp["score_ema"][0].abs().max()
    assert err > 0.1


def test_convert_state_dict_rejects_another_architecture():
    cfg, _ = config_for("ve_ncsnpp")
    ref = torch.load(DATA / "score_sde_ve_ncsnpp.pth", weights_only=True)["model"]
    cfg.model.num_res_blocks = 2
    with pytest.raises(ValueError, match="not the same architecture"):
        convert_state_dict(ref, build_model(cfg))
    cfg.model.num_res_blocks, cfg.model.nf = 1, 16
    with pytest.raises(ValueError, match="checkpoint shape"):
        convert_state_dict(ref, build_model(cfg))
    with pytest.raises(ValueError, match="not a score_sde_pytorch"):
        convert_state_dict({"weight": torch.zeros(1)}, build_model(cfg))
    ref.pop("module.all_modules.4.Conv_0.weight")  # the first residual block
    cfg.model.nf = 8
    with pytest.raises(ValueError, match="module 4"):
        convert_state_dict(ref, build_model(cfg))


def test_reference_order_covers_every_tensor_once():
    cfg, _ = config_for("ve_ncsnpp")
    model = build_model(cfg)
    names = [n for n, _ in reference_order(model)]
    assert len(names) == len(set(names))
    covered = {k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)}
    assert covered == set(model.state_dict())


def test_convert_cli_then_sample(tmp_path):
    exp = expected("vp_ddpmpp")
    run = tmp_path / "imported"
    res = run_module("minisgm.convert", str(DATA / "score_sde_vp_ddpmpp.pth"), "--preset", exp["preset"],
                     *shrink_args(exp), "--out", str(run))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "step 2" in res.stdout and (run / "config.json").is_file()
    model, cfg, sde, step = load_run(run)  # EMA weights by default
    assert step == 2 and cfg.preset == exp["preset"]
    with torch.no_grad():
        assert_scores_close(model(exp["x"], exp["t"]), exp["score_ema"])
    out = tmp_path / "s.npz"
    res = run_module("minisgm.sample", "--ckpt", str(run), "--sampler", "em", "--n", "2", "--steps", "3",
                     "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    samples = np.load(out)["samples"]
    assert samples.shape == (2, 3, 32, 32) and np.isfinite(samples).all()


def test_convert_cli_errors(tmp_path, capsys):
    exp = expected("ve_ncsnpp")
    ckpt = str(DATA / "score_sde_ve_ncsnpp.pth")
    # another architecture (DDPM++ preset for an NCSN++ file)
    assert convert_main([ckpt, "--preset", "cifar10_ddpmpp_vp", *shrink_args(exp), "--out", str(tmp_path / "a")]) == 2
    assert "does not fit the model of preset cifar10_ddpmpp_vp" in capsys.readouterr().err
    assert convert_main([ckpt, "--preset", "digits_vp", "--out", str(tmp_path / "b")]) == 2
    assert "NCSN++" in capsys.readouterr().err
    assert convert_main([ckpt, "--preset", exp["preset"], "--model.nff", "8", "--out", str(tmp_path / "c")]) == 2
    assert "model.nff" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "none.pth"), "--preset", exp["preset"], "--out", str(tmp_path / "d")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes((DATA / "score_sde_ve_ncsnpp.pth").read_bytes()[:5000])
    assert convert_main([str(bad), "--preset", exp["preset"], *shrink_args(exp), "--out", str(tmp_path / "e")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abcde")
    ok = tmp_path / "ok"
    assert convert_main([ckpt, "--preset", exp["preset"], *shrink_args(exp), "--out", str(ok)]) == 0
    assert "exact_variance=false" in capsys.readouterr().out
    assert convert_main([ckpt, "--preset", exp["preset"], *shrink_args(exp), "--out", str(ok)]) == 2
    assert "exists" in capsys.readouterr().err


def test_imported_run_is_not_resumed(tmp_path, cifar10_archive):
    from minisgm.train import train

    cfg, _ = config_for("vp_ddpmpp")
    state = import_checkpoint(DATA / "score_sde_vp_ddpmpp.pth", cfg)
    save_checkpoint(state, tmp_path / "run" / "checkpoint.pt")
    cfg.data.path = str(cifar10_archive[0])
    cfg.train.device, cfg.train.batch_size, cfg.train.n_steps = "cpu", 4, 3
    with pytest.raises(CheckpointError, match="without an optimizer state"):
        train(cfg, tmp_path / "run", progress=False)


def test_import_checkpoint_refuses_conditional_models():
    cfg, _ = config_for("vp_ddpmpp")
    cfg.data.class_conditional = True
    with pytest.raises(ConfigError, match="unconditional"):
        import_checkpoint(DATA / "score_sde_vp_ddpmpp.pth", cfg)


def test_imported_run_evaluates_with_a_data_path(tmp_path, cifar10_archive, capsys):
    import json

    from minisgm.evaluate import main as evaluate_main

    exp = expected("vp_ddpmpp")
    run = tmp_path / "imported"
    assert convert_main([str(DATA / "score_sde_vp_ddpmpp.pth"), "--preset", exp["preset"], *shrink_args(exp),
                         "--out", str(run)]) == 0
    capsys.readouterr()
    args = ["--ckpt", str(run), "--metric", "bpd", "--n", "2", "--hutchinson", "rademacher",
            "--rtol", "1e-3", "--atol", "1e-3"]
    assert evaluate_main(args) == 2  # the imported config names no data
    assert "--data-path" in capsys.readouterr().err
    assert evaluate_main(args + ["--data-path", str(cifar10_archive[0])]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["metric"] == "bpd" and res["n"] == 2 and 0 < res["value"] < 20


def test_evaluate_names_data_path_when_the_config_has_none(tmp_path, capsys):
    from minisgm.evaluate import main as evaluate_main

    exp = expected("vp_ddpmpp")
    run = tmp_path / "imported"
    assert convert_main([str(DATA / "score_sde_vp_ddpmpp.pth"), "--preset", exp["preset"], *shrink_args(exp),
                         "--data.path", "", "--out", str(run)]) == 0
    capsys.readouterr()
    for metric in ("bpd", "fid"):
        assert evaluate_main(["--ckpt", str(run), "--metric", metric, "--n", "2"]) == 2
        assert "has no data.path" in capsys.readouterr().err
