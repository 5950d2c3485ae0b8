"""Config system: presets, typed overrides, clear errors before any work, JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import run_module
from minisgm.config import (
    PRESETS,
    Config,
    ConfigError,
    ModelConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    flat_keys,
    get_preset,
    parse_overrides,
)
from minisgm.build import build_model, build_sde, dataset_info
from minisgm.train import resolve_config


def test_every_field_has_a_comment():
    # nanoGPT style: each dataclass field carries a comment in the source.
    import inspect

    import minisgm.config as mod

    src = inspect.getsource(mod)
    for cls in (mod.ModelConfig, mod.SDEConfig, mod.DataConfig, mod.TrainConfig, mod.SampleConfig):
        body = inspect.getsource(cls)
        for f in dataclasses.fields(cls):
            line = next(l for l in body.splitlines() if l.strip().startswith(f"{f.name}:"))
            assert "#" in line, f"{cls.__name__}.{f.name} has no comment"
    assert "exec(" not in src


def test_overrides_are_typed():
    cfg = get_preset("digits_vp")
    ov = parse_overrides(cfg, [
        "--train.lr", "1e-4", "--train.n_steps=10", "--model.ch_mult", "1,2,2", "--train.compile",
        "--data.centered", "false", "--sde.eps", "none", "--sde.kind", "ve", "--train.warmup", "1e3",
    ])
    assert ov == {"train.lr": 1e-4, "train.n_steps": 10, "model.ch_mult": (1, 2, 2), "train.compile": True,
                  "data.centered": False, "sde.eps": None, "sde.kind": "ve", "train.warmup": 1000}
    assert type(ov["train.n_steps"]) is int and type(ov["train.warmup"]) is int
    apply_overrides(cfg, ov)
    assert cfg.train.lr == 1e-4 and cfg.model.ch_mult == (1, 2, 2) and cfg.train.compile is True
    assert cfg.sde.eps is None and cfg.sde.kind == "ve"
    # A negative number is a value, not the next option.
    assert parse_overrides(cfg, ["--train.grad_clip", "-1"]) == {"train.grad_clip": -1.0}
    assert parse_overrides(cfg, ["--sde.eps", "1e-5"]) == {"sde.eps": 1e-5}


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--train.lrr", "1"], "--train.lr"),
        (["--lr", "1"], "--train.lr"),
        (["--train.batchsize", "8"], "--train.batch_size"),
        (["--train.lr", "fast"], "expects a float"),
        (["--train.n_steps", "2.5"], "expects an int"),
        (["--train.compile", "maybe"], "boolean"),
        (["--model.ch_mult", "1,x"], "comma-separated list of int"),
        (["--train.n_steps"], "needs a value"),
        (["train.lr", "1"], "unexpected argument"),
    ],
)
def test_bad_overrides_name_the_problem(args, needle):
    with pytest.raises(ConfigError, match=None) as err:
        parse_overrides(get_preset("digits_vp"), args)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "override, needle",
    [({"sde.kind": "vee"}, "'ve'"), ({"train.lr": -1.0}, "> 0"), ({"train.ema_rate": 1.0}, "[0, 1)"),
     ({"sample.sampler": "euler"}, "em, pc, ode, heun"), ({"train.batch_size": 0}, ">= 1"),
     ({"train.beta1": 2.0}, "[0, 1)"), ({"model.nf": 0}, ">= 1"), ({"sde.eps": 2.0}, "(0, 1)"),
     ({"train.seed": 10**30}, "[0, 9223372036854775807]"), ({"train.grad_clip": float("nan")}, "finite"),
     ({"model.ch_mult": (1, 0)}, ">= 1"), ({"data.channels": 2}, "0, 1, 3"),
     ({"data.dataset": "rocks"}, "folder, npz")],
)
def test_bad_values_are_rejected(override, needle):
    with pytest.raises(ConfigError) as err:
        apply_overrides(get_preset("digits_vp"), override)
    assert needle in str(err.value)


def test_unknown_preset_lists_close_matches():
    with pytest.raises(ConfigError, match="digits_vp"):
        get_preset("digit_vp")


def test_cli_errors_exit_2_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    res = run_module("minisgm.train", "--run-dir", str(run_dir), "--train.lrr", "1e-4", timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Did you mean: --train.lr" in res.stderr and "Traceback" not in res.stderr
    for args, needle in [
        (["--train.lr", "abc"], "expects a float"),
        (["--preset", "cifar_small"], "cifar10_small"),
        (["--resume", str(tmp_path / "nothing")], "no config.json"),
    ]:
        with pytest.raises(SystemExit) as e:
            resolve_config(["--run-dir", str(run_dir), *args])
        assert e.value.code == 2
        assert needle in capsys.readouterr().err
    assert not run_dir.exists()  # nothing was written: the errors came before any work


def test_resolve_config_and_help_config(capsys):
    cfg, args = resolve_config(["--preset", "digits_ve", "--train.lr", "3e-4", "--run-dir", "x"])
    assert cfg.preset == "digits_ve" and cfg.sde.kind == "ve" and cfg.train.lr == 3e-4 and args.run_dir == "x"
    with pytest.raises(SystemExit) as e:
        resolve_config(["--help-config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--train.lr" in out and "--model.ch_mult" in out


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = get_preset(name)
    assert cfg.preset == name
    back = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert back == cfg
    assert type(back.model) is type(cfg.model)
    # Overrides reach nested model configs of either kind.
    key = "model.nf"
    assert key in flat_keys(cfg)
    apply_overrides(cfg, parse_overrides(cfg, ["--model.nf", "16"]))
    assert cfg.model.nf == 16


def test_cifar10_presets_follow_the_paper():
    from minisgm.models.ncsnpp import NCSNppConfig

    for name in ("cifar10_ncsnpp_ve", "cifar10_ddpmpp_vp", "cifar10_ddpmpp_subvp",
                 "cifar10_ncsnpp_deep_ve", "cifar10_ddpmpp_deep_vp", "cifar10_ddpmpp_deep_subvp"):
        c = get_preset(name)
        ve = c.sde.kind == "ve"
        assert isinstance(c.model, NCSNppConfig)
        assert (c.train.lr, c.train.warmup, c.train.grad_clip, c.train.batch_size, c.train.n_steps) == (2e-4, 5000, 1.0, 128, 1_300_000)
        assert c.train.ema_rate == (0.999 if ve else 0.9999)
        assert (c.sde.sigma_min, c.sde.sigma_max, c.sde.beta_min, c.sde.beta_max) == (0.01, 50.0, 0.1, 20.0)
        assert not ve or c.sde.exact_variance is False  # score_sde's s(t) = sigma(t)
        assert c.data.centered == (not ve) and c.model.centered == c.data.centered and c.data.random_flip
        assert c.model.embedding_type == ("fourier" if ve else "positional")
        assert c.model.num_res_blocks == (8 if "deep" in name else 4)
    assert get_preset("cifar10_ddpmpp_subvp").sde.kind == "subvp"


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("cifar10")])
def test_small_presets_build_a_score_model(name):
    cfg = get_preset(name)
    shape = dataset_info(cfg.data).shape
    model = build_model(cfg)
    x = torch.randn(3, *shape)
    t = torch.tensor([0.1, 0.5, 0.9])
    y = torch.tensor([0, 3, 9]) if cfg.data.class_conditional else None
    out = model(x, t) if y is None else model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert type(build_sde(cfg.sde)).__name__.lower().startswith(cfg.sde.kind)


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("cifar10")])
def test_cifar10_presets_build_on_the_meta_device(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    # NCSN++ cont. ~62M (deep ~108M), DDPM++ cont. ~62M (deep ~108M) in the paper; small ~4M.
    lo, hi = (2e6, 10e6) if name == "cifar10_small" else ((100e6, 115e6) if "deep" in name else (55e6, 70e6))
    assert lo < n < hi, n
