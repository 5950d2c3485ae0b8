"""Run configuration: nested dataclasses, named presets, command-line overrides.

A run is one :class:`Config` of small dataclasses; the comment after each field is its help text
(``--help-config``). Presets are plain functions; the command line picks one and changes fields::

    python -m minisgm.train --preset digits_ve --train.lr 1e-4 --model.ch_mult 1,2 --train.compile

Overrides are checked against the annotations and :data:`RANGES` before any work starts. The
CIFAR-10 presets follow Song et al. (2021), ICLR, app. H. Book: :ref:`sec-scaling-up`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["ModelConfig", "SDEConfig", "DataConfig", "TrainConfig", "SampleConfig", "Config",
           "PRESETS", "get_preset", "apply_overrides", "parse_overrides", "config_to_dict",
           "config_from_dict", "flat_keys", "ConfigError", "validate", "describe", "field_help",
           "RANGES"]


class ConfigError(ValueError):
    """A bad preset name, override key or override value (the CLI turns it into exit code 2)."""


# ----- The configuration ----------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The small score networks of the book (toy MLP and the 8x8 U-Net)."""

    arch: str = "unet"  # "mlp" (minisgm.models.ScoreMLP, 2-D toy data) or "unet" (SmallUNet, images)
    hidden: int = 128  # MLP: width of the hidden layers
    n_layers: int = 3  # MLP: number of hidden layers
    nf: int = 32  # U-Net: channels at full resolution (base_channels)
    ch_mult: Tuple[int, ...] = (1, 2)  # U-Net: channel multiplier per resolution (each level halves H, W)
    num_res_blocks: int = 1  # U-Net: residual blocks per level going down (one more going up)
    attention: bool = True  # U-Net: self-attention at the lowest resolution
    embed_dim: int = 64  # size of the sinusoidal / Fourier features of t
    embedding: str = "sinusoidal"  # time embedding: "sinusoidal" (DDPM) or "fourier" (random Fourier features)
    dropout: float = 0.0  # U-Net: dropout inside residual blocks


@dataclass
class SDEConfig:
    """The forward SDE (:mod:`minisgm.sde`); Song et al. (2021) eqs. (30)-(34)."""

    kind: str = "vp"  # "ve" (SMLD), "vp" (DDPM) or "subvp"
    sigma_min: float = 0.01  # VE: smallest noise scale sigma(0)
    sigma_max: float = 50.0  # VE: largest noise scale sigma(1); ~ max pairwise data distance (NCSNv2)
    exact_variance: bool = True  # VE: marginal variance sigma(t)^2 - sigma_min^2; false: score_sde_pytorch's sigma(t)^2 (its checkpoints need it)
    beta_min: float = 0.1  # VP/sub-VP: beta(0)
    beta_max: float = 20.0  # VP/sub-VP: beta(1)
    eps: Optional[float] = None  # smallest training/sampling time; None = the SDE's default (VE 1e-5, VP 1e-3)


@dataclass
class DataConfig:
    """What to train on."""

    dataset: str = "digits"  # "digits" (sklearn 8x8), "cifar10", "folder" (your images), "npz" (an array file), or a 2-D toy: two_moons, swiss_roll, checkerboard, rings, spirals, eight_gaussians
    holdout: bool = True  # digits: train on digits_split()[0] (1438 images), keep [1] (359) for evaluate
    path: str = ""  # cifar10: the archive or its folder; folder: a folder of images (sub-folders = classes); npz: the .npz file
    image_size: int = 0  # folder/npz: resize and centre-crop to this many pixels (0: keep the size; filled in from the data)
    channels: int = 0  # folder/npz: 1 (grey) or 3 (RGB); 0: from the data (filled in when training starts)
    num_classes: int = 0  # folder/npz: number of classes (filled in from the sub-folders / labels when training starts)
    centered: bool = True  # map images from [0, 1] to [-1, 1] before noising (score-SDE: True for VP, False for VE); NCSN++ gets the same flag
    random_flip: bool = False  # random horizontal flips (CIFAR-10)
    class_conditional: bool = False  # train a class-conditional score s(x, t, y) (digits, cifar10)
    uniform_dequantization: bool = False  # add U[0, 1/levels) noise to the discrete pixel values


@dataclass
class TrainConfig:
    """The optimisation loop (:func:`minisgm.train.train`)."""

    n_steps: int = 3000  # optimizer steps in total (score-SDE CIFAR-10: 1.3M)
    batch_size: int = 128  # GLOBAL batch per optimizer step = per-rank batch x world size x grad_accum
    grad_accum: int = 1  # micro-batches per optimizer step (each a slice of the global batch)
    lr: float = 2e-3  # Adam learning rate after warm-up
    warmup: int = 100  # linear learning-rate warm-up, in optimizer steps (score-SDE: 5000)
    beta1: float = 0.9  # Adam beta_1
    beta2: float = 0.999  # Adam beta_2
    adam_eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # Adam (L2) weight decay
    grad_clip: float = 1.0  # clip the global gradient norm to this value; <= 0 disables
    ema_rate: float = 0.999  # exponential moving average of the weights (score-SDE: 0.999 VE, 0.9999 VP)
    likelihood_weighting: bool = False  # omega(t) = g(t)^2 (bound on the NLL, Song et al. 2021b) instead of sigma_t^2
    importance_sampling: bool = False  # with likelihood_weighting: draw t with density ~ g^2/sigma_t^2 and reweight (unbiased, lower variance)
    seed: int = 0  # seeds initialisation, data order and noise: a run is a function of (config, seed); 0 <= seed < 2^63
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda" or "cuda:N"
    threads: int = 0  # CPU threads of PyTorch (0: automatic, 1 per core, fewer if the machine is busy)
    mixed_precision: bool = False  # bf16 autocast for the forward pass (the loss and weights stay float32)
    channels_last: bool = False  # NHWC memory format for conv nets (faster on tensor cores)
    compile: bool = False  # torch.compile the model
    fused_adam: bool = True  # use the fused Adam kernel when training on CUDA
    deterministic: bool = False  # torch.use_deterministic_algorithms (bit-exact resume on GPU too, slower)
    log_every: int = 50  # write a metrics.jsonl line every this many steps
    sample_every: int = 1000  # write a PNG sample grid every this many steps (and at the end); 0 disables
    ckpt_every: int = 500  # write checkpoint.pt every this many steps (and at the end)
    keep_snapshots: bool = False  # also keep checkpoint-<step>.pt at every checkpoint
    max_steps_per_run: int = 0  # stop (cleanly, with a checkpoint) after this many steps in this process; 0 = no limit


@dataclass
class SampleConfig:
    """Sample grids written during training (and the defaults of ``python -m minisgm.sample``)."""

    sampler: str = "em"  # em (Euler-Maruyama), pc (predictor-corrector), ode (adaptive RK45), heun, ddim, dpm_solver (DPM-Solver++ with its defaults), edm (Heun in sigma)
    n_steps: int = 200  # discretisation steps of the reverse SDE / ODE
    n_samples: int = 64  # images in a grid (points in a 2-D scatter)
    snr: float = 0.16  # PC sampler: signal-to-noise ratio of the Langevin corrector
    seed: int = 1234  # seed of the sampling noise (fixed: grids of successive steps are comparable)


@dataclass
class Config:
    """Everything that defines a run."""

    preset: str = "digits_vp"  # name of the preset this config started from
    model: Any = field(default_factory=ModelConfig)  # ModelConfig, or NCSNppConfig for the CIFAR-10 presets
    sde: SDEConfig = field(default_factory=SDEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


# ----- Presets: plain functions ---------------------------------------------------------------
def _toy(preset: str, dataset: str) -> Config:
    return Config(
        preset=preset,
        model=ModelConfig(arch="mlp", hidden=128, n_layers=3, embed_dim=32, embedding="fourier"),
        sde=SDEConfig(kind="vp"),
        data=DataConfig(dataset=dataset, centered=False),
        train=TrainConfig(n_steps=3000, batch_size=512, lr=2e-3, warmup=100, ema_rate=0.99,
                          log_every=100, sample_every=1000, ckpt_every=1000),
        sample=SampleConfig(sampler="em", n_steps=200, n_samples=2000),
    )


def toy_moons() -> Config:
    """Two moons, ScoreMLP, VP SDE (about a minute on a CPU)."""
    return _toy("toy_moons", "two_moons")


def toy_checkerboard() -> Config:
    """Checkerboard, ScoreMLP, VP SDE."""
    return _toy("toy_checkerboard", "checkerboard")


def toy_swiss_roll() -> Config:
    """Swiss roll, ScoreMLP, VP SDE."""
    return _toy("toy_swiss_roll", "swiss_roll")


def toy_eight_gaussians() -> Config:
    """Eight Gaussians on a circle, ScoreMLP, VP SDE."""
    return _toy("toy_eight_gaussians", "eight_gaussians")


def digits_vp() -> Config:
    """The default: 8x8 digits, SmallUNet (0.43M parameters), VP SDE; ~6 CPU-minutes (3000 steps)."""
    return Config(
        preset="digits_vp",
        model=ModelConfig(arch="unet", nf=32, ch_mult=(1, 2), num_res_blocks=1, embed_dim=64),
        sde=SDEConfig(kind="vp", beta_min=0.1, beta_max=20.0),
        data=DataConfig(dataset="digits", centered=True),
        train=TrainConfig(n_steps=3000, batch_size=128, lr=2e-3, warmup=100, ema_rate=0.999,
                          log_every=50, sample_every=1000, ckpt_every=500),
        sample=SampleConfig(sampler="em", n_steps=200, n_samples=64),
    )


def digits_ve() -> Config:
    """8x8 digits, SmallUNet, VE SDE (sigma_max 50 as in score-SDE; data uncentred in [0, 1])."""
    c = digits_vp()
    c.preset = "digits_ve"
    # sigma_max >> the largest pairwise distance (NCSNv2 technique 1: ~7 for digits in [0, 1]); the paper's 50
    c.sde = SDEConfig(kind="ve", sigma_min=0.01, sigma_max=50.0)
    c.data.centered = False
    c.sample.sampler = "pc"
    return c


def digits_subvp() -> Config:
    """8x8 digits, SmallUNet, sub-VP SDE."""
    c = digits_vp()
    c.preset = "digits_subvp"
    c.sde = SDEConfig(kind="subvp", beta_min=0.1, beta_max=20.0)
    return c


def digits_cond() -> Config:
    """Class-conditional 8x8 digits (``s(x, t, y)``), SmallUNet, VP SDE."""
    c = digits_vp()
    c.preset = "digits_cond"
    c.data.class_conditional = True
    return c


def _cifar10(preset: str, model_preset: str, sde_kind: str) -> Config:
    from .models import ncsnpp  # only the CIFAR-10 presets need NCSN++

    ve = sde_kind == "ve"
    return Config(
        preset=preset,
        model=dataclasses.replace(getattr(ncsnpp, model_preset)(), centered=not ve),
        # VE: the paper's marginal std s(t) = sigma(t), as its code trains (exact_variance=False).
        sde=SDEConfig(kind=sde_kind, sigma_min=0.01, sigma_max=50.0, beta_min=0.1, beta_max=20.0, exact_variance=not ve),
        # score-SDE: VE models see data in [0, 1], VP/sub-VP models see [-1, 1]; random flips.
        data=DataConfig(dataset="cifar10", path="data/cifar10", centered=not ve, random_flip=True),
        train=TrainConfig(n_steps=1_300_000, batch_size=128, lr=2e-4, warmup=5000, grad_clip=1.0,
                          ema_rate=0.999 if ve else 0.9999, mixed_precision=True, channels_last=True,
                          log_every=100, sample_every=10_000, ckpt_every=5000, keep_snapshots=True),
        sample=SampleConfig(sampler="pc" if ve else "em", n_steps=1000, n_samples=64),
    )


def cifar10_ncsnpp_ve() -> Config:
    """NCSN++ (continuous), VE SDE, CIFAR-10: Song et al. (2021) table 3."""
    return _cifar10("cifar10_ncsnpp_ve", "ncsnpp_cifar10", "ve")


def cifar10_ddpmpp_vp() -> Config:
    """DDPM++ (continuous), VP SDE, CIFAR-10."""
    return _cifar10("cifar10_ddpmpp_vp", "ddpmpp_cifar10", "vp")


def cifar10_ddpmpp_subvp() -> Config:
    """DDPM++ (continuous), sub-VP SDE, CIFAR-10."""
    return _cifar10("cifar10_ddpmpp_subvp", "ddpmpp_cifar10", "subvp")


def cifar10_ncsnpp_deep_ve() -> Config:
    """NCSN++ cont. deep (8 residual blocks per resolution), VE SDE: FID 2.20 in the paper."""
    return _cifar10("cifar10_ncsnpp_deep_ve", "ncsnpp_deep_cifar10", "ve")


def cifar10_ddpmpp_deep_vp() -> Config:
    """DDPM++ cont. deep, VP SDE."""
    return _cifar10("cifar10_ddpmpp_deep_vp", "ddpmpp_deep_cifar10", "vp")


def cifar10_ddpmpp_deep_subvp() -> Config:
    """DDPM++ cont. deep, sub-VP SDE: the best likelihood (2.99 bits/dim) in the paper."""
    return _cifar10("cifar10_ddpmpp_deep_subvp", "ddpmpp_deep_cifar10", "subvp")


def cifar10_small() -> Config:
    """A small NCSN++ (4.8M parameters), VE SDE, CIFAR-10: a first GPU run (about 8e16 training FLOP), or a CPU smoke test."""
    c = _cifar10("cifar10_small", "ncsnpp_small", "ve")
    c.train = dataclasses.replace(c.train, n_steps=100_000, warmup=1000, ema_rate=0.999, sample_every=5000)
    c.sample.n_steps = 500
    return c


PRESETS: Dict[str, Callable[[], Config]] = {
    f.__name__: f
    for f in (
        digits_vp, digits_ve, digits_subvp, digits_cond,
        toy_moons, toy_checkerboard, toy_swiss_roll, toy_eight_gaussians,
        cifar10_ncsnpp_ve, cifar10_ddpmpp_vp, cifar10_ddpmpp_subvp,
        cifar10_ncsnpp_deep_ve, cifar10_ddpmpp_deep_vp, cifar10_ddpmpp_deep_subvp,
        cifar10_small,
    )
}
"""Preset name -> function returning a fresh :class:`Config`."""


def get_preset(name: str) -> Config:
    """A fresh :class:`Config` of the named preset (``ConfigError`` naming close matches)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}.{hint} Available: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ----- Field types, help texts and valid ranges -----------------------------------------------
def _hints(obj_or_cls) -> Dict[str, Any]:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return typing.get_type_hints(cls)


def field_help(cls) -> Dict[str, str]:
    """``{field: the comment after it in the class source}``: the help text of each field."""
    matches = (re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line) for line in inspect.getsource(cls).splitlines())
    return {m.group(1): m.group(2).strip() for m in matches if m}


def _leaves(cfg: Config):
    """``(dotted key, parent object, field name, annotation)`` of every leaf field."""
    def walk(obj, prefix: str):
        hints = _hints(obj)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", obj, f.name, hints.get(f.name, Any)

    yield from walk(cfg, "")


def flat_keys(cfg: Config) -> Dict[str, Any]:
    """All leaf fields as ``{"train.lr": <type annotation>, ...}`` (the valid override keys)."""
    return {key: tp for key, _, _, tp in _leaves(cfg)}


class Interval(typing.NamedTuple):
    """The range ``lo .. hi`` of a numeric field; each end closed unless marked open."""

    lo: float
    hi: float
    open_lo: bool = False
    open_hi: bool = False


TOY_DATASETS = ("two_moons", "swiss_roll", "checkerboard", "rings", "spirals", "eight_gaussians")
SAMPLER_NAMES = ("em", "pc", "ode", "heun", "ddim", "dpm_solver", "edm")

RANGES: Dict[str, Any] = {
    # a tuple: the allowed values; an Interval: the range of a number (or of each entry of a list)
    "sde.kind": ("ve", "vp", "subvp"),
    "sde.eps": Interval(0.0, 1.0, True, True),
    "data.dataset": ("digits", "cifar10", "folder", "npz") + TOY_DATASETS,
    "data.image_size": Interval(0, 4096),
    "data.channels": (0, 1, 3),
    "data.num_classes": Interval(0, 100_000),
    "model.arch": ("mlp", "unet"),
    "model.embedding": ("sinusoidal", "fourier"),
    "model.embed_dim": Interval(2, math.inf, open_hi=True),
    "train.weight_decay": Interval(0.0, math.inf, open_hi=True),
    "train.grad_clip": Interval(-math.inf, math.inf, True, True),
    "train.threads": Interval(0, 4096),
    "sample.sampler": SAMPLER_NAMES,
    **dict.fromkeys(("sde.sigma_min", "sde.sigma_max", "sde.beta_min", "sde.beta_max", "train.lr",
                     "train.adam_eps", "sample.snr"), Interval(0.0, math.inf, True, True)),
    **dict.fromkeys(("model.hidden", "model.n_layers", "model.nf", "model.ch_mult", "model.num_res_blocks",
                     "train.n_steps", "train.batch_size", "train.grad_accum", "train.log_every", "train.ckpt_every",
                     "sample.n_steps", "sample.n_samples"), Interval(1, math.inf, open_hi=True)),
    **dict.fromkeys(("train.warmup", "train.sample_every", "train.max_steps_per_run"),
                    Interval(0, math.inf, open_hi=True)),
    **dict.fromkeys(("model.dropout", "train.beta1", "train.beta2", "train.ema_rate"),
                    Interval(0.0, 1.0, open_hi=True)),
    **dict.fromkeys(("train.seed", "sample.seed"), Interval(0, 2**63 - 1)),
}
"""The valid values of the fields that a type alone does not pin down (checked by :func:`validate`)."""


def _in_range(value, rule) -> bool:
    if not isinstance(rule, Interval):
        return value in rule
    lo, hi, open_lo, open_hi = rule
    return all(
        (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)  # False for NaN
        for v in (value if isinstance(value, tuple) else (value,))
    )


def _describe_range(rule) -> str:
    if not isinstance(rule, Interval):
        return "one of " + ", ".join(str(r) for r in rule)
    lo, hi = (str(v) if isinstance(v, int) else f"{v:g}" for v in (rule.lo, rule.hi))
    if rule.hi == math.inf:
        return f"a finite number {'>' if rule.open_lo else '>='} {lo}" if rule.lo != -math.inf else "a finite number"
    return f"in {'(' if rule.open_lo else '['}{lo}, {hi}{')' if rule.open_hi else ']'}"


def validate(cfg: Config) -> None:
    """Check every field against :data:`RANGES` and the model's own rules (``ConfigError``)."""
    for key, obj, name, _ in _leaves(cfg):
        value = getattr(obj, name)
        rule = RANGES.get(key)
        if rule is None or value is None:
            continue
        if not _in_range(value, rule):
            close = difflib.get_close_matches(str(value), [str(r) for r in rule], n=1) if not isinstance(rule, Interval) else []
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--{key} must be {_describe_range(rule)}; got {value!r}.{hint}")
    if not cfg.sde.sigma_max > cfg.sde.sigma_min:
        raise ConfigError(f"--sde.sigma_max must exceed --sde.sigma_min, got {cfg.sde.sigma_max} <= {cfg.sde.sigma_min}")
    if not cfg.sde.beta_max >= cfg.sde.beta_min:
        raise ConfigError(f"--sde.beta_max must be >= --sde.beta_min, got {cfg.sde.beta_max} < {cfg.sde.beta_min}")
    if cfg.train.importance_sampling and not cfg.train.likelihood_weighting:
        raise ConfigError("--train.importance_sampling needs --train.likelihood_weighting (it reweights g(t)^2)")
    if isinstance(cfg.model, ModelConfig):
        if cfg.model.embed_dim % 2:
            raise ConfigError(f"--model.embed_dim must be even, got {cfg.model.embed_dim}")
        return
    from .models.ncsnpp import _validate_config

    try:
        _validate_config(cfg.model)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err).replace("NCSNppConfig.", "--model.")) from None


# ----- Values from the command line (text) and from config.json (JSON values) -----------------
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, Tuple, list, List):
        args = typing.get_args(tp)
        return f"comma-separated list of {_type_name(args[0]) if args else 'value'}"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def _coerce(value: Any, tp, key: str, text: bool):
    """``value`` (command-line text if ``text``, else a JSON value) as a value of annotation ``tp``."""
    bad = ConfigError(f"--{key} expects {'an int' if tp is int else 'a float' if tp is float else _type_name(tp)}, got {value!r}")
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (text and value.strip().lower() in ("none", "null", ""))):
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _coerce(value, a, key, text)
                except ConfigError:
                    pass
        raise bad
    if origin in (tuple, Tuple, list, List):
        elem = (typing.get_args(tp) or (str,))[0]
        parts = [p for p in value.replace(" ", "").strip("()[]").split(",") if p] if text else value
        if not isinstance(parts, list):
            raise bad
        try:
            vals = [_coerce(p, elem, key, text) for p in parts]
        except ConfigError:
            raise ConfigError(f"--{key} expects {_type_name(tp)} (e.g. 1,2,2), got {value!r}") from None
        return tuple(vals) if origin in (tuple, Tuple) else vals
    if not text and tp in (bool, int, float, str, Any):  # a JSON value must have the type already
        if not isinstance(value, {bool: bool, int: int, float: (int, float)}.get(tp, str)):
            raise bad
        if tp in (int, float) and isinstance(value, bool):
            raise bad
        return float(value) if tp is float else value
    if tp is bool:
        low = value.strip().lower()
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise ConfigError(f"--{key} expects a boolean (true/false), got {value!r}")
    if tp is int:
        try:
            return int(value)
        except ValueError:
            try:  # 1e5 is a whole number too
                f = float(value)
                if f.is_integer():
                    return int(f)
            except (ValueError, OverflowError):
                pass
            raise bad from None
    if tp is float:
        try:
            return float(value)
        except ValueError:
            raise bad from None
    if tp in (str, Any):
        return value
    raise ConfigError(f"--{key}: unsupported field type {tp!r}")


def _unknown_key_message(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if not close:  # also try the last component alone: --lr -> train.lr
        leaf = key.split(".")[-1]
        leaves = difflib.get_close_matches(leaf, [k.split(".")[-1] for k in valid], n=3)
        close = [k for k in valid if k.split(".")[-1] in leaves][:4]
    hint = f" Did you mean: {', '.join('--' + c for c in close)}?" if close else ""
    return f"unknown option --{key}.{hint} (run with --help-config to list all options)"


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def parse_overrides(cfg: Config, args: Sequence[str]) -> Dict[str, Any]:
    """Parse ``["--train.lr", "1e-4", "--train.compile", "--model.ch_mult=1,2"]`` into typed values.

    Returns ``{"train.lr": 1e-4, ...}``; a bare boolean flag means true. :class:`ConfigError` for an
    unknown key (naming the closest valid ones) or a value that does not parse as the field's type.
    """
    valid = flat_keys(cfg)
    out: Dict[str, Any] = {}
    args = list(args)
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--") or len(tok) <= 2:
            raise ConfigError(f"unexpected argument {tok!r}: options look like --train.lr 1e-4")
        key, eq, value = tok[2:].partition("=")
        key = key.replace("-", "_")
        if key not in valid:
            raise ConfigError(_unknown_key_message(key, list(valid)))
        tp = valid[key]
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or (nxt.startswith("--") and len(nxt) > 2 and not _is_number(nxt)):
                if tp is not bool:
                    raise ConfigError(f"--{key} needs a value ({_type_name(tp)})")
                value = "true"
            else:
                value, i = nxt, i + 1
        out[key] = _coerce(value, tp, key, text=True)
        i += 1
    return out


def apply_overrides(cfg: Config, overrides: Dict[str, Any]) -> Config:
    """Set dotted keys in place (values already typed, e.g. from :func:`parse_overrides`), then validate."""
    leaves = {key: (obj, name) for key, obj, name, _ in _leaves(cfg)}
    for key, value in overrides.items():
        if key not in leaves:
            raise ConfigError(_unknown_key_message(key, list(leaves)))
        setattr(*leaves[key], value)
    validate(cfg)
    return cfg


# ----- (De)serialisation: config.json and the copy inside each checkpoint ---------------------
def config_to_dict(cfg: Config) -> Dict[str, Any]:
    """Nested dict of JSON values (tuples become lists); ``model_class`` names the model config."""
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists
    d["model_class"] = type(cfg.model).__name__
    return d


def _from_dict(cls, d: Any, where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    hints = _hints(cls)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)} for {cls.__name__}")
    # A field added after the file was written keeps its default.
    kwargs = {k: _coerce(v, hints.get(k, Any), f"{where}.{k}", text=False) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def config_from_dict(d: Dict[str, Any]) -> Config:
    """Inverse of :func:`config_to_dict` (for config.json and checkpoints); ``ConfigError`` on bad content."""
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
    d = dict(d)
    name = d.pop("model_class", "ModelConfig")
    if name == "NCSNppConfig":
        from .models.ncsnpp import NCSNppConfig as model_cls
    elif name == "ModelConfig":
        model_cls = ModelConfig
    else:
        raise ConfigError(f"unknown model config class {name!r} (expected ModelConfig or NCSNppConfig)")
    preset = d.get("preset", "custom")
    if not isinstance(preset, str):
        raise ConfigError(f"preset must be a string, got {preset!r}")
    sections = {"model": model_cls, "sde": SDEConfig, "data": DataConfig, "train": TrainConfig,
                "sample": SampleConfig}
    return Config(preset=preset, **{k: _from_dict(cls, d.get(k, {}), k) for k, cls in sections.items()})


def describe(cfg: Config) -> str:
    """Every override key with its type, current value and help text (``--help-config``)."""
    helps = {f"{section}.{k}": v for section in ("model", "sde", "data", "train", "sample")
             for k, v in field_help(type(getattr(cfg, section))).items()}
    lines = [f"Options of preset {cfg.preset} (override any with --key value):", ""]
    for key, obj, name, tp in _leaves(cfg):
        if key == "preset":
            continue
        lines.append(f"  --{key} {_type_name(tp)} = {getattr(obj, name)!r}")
        if key in helps:
            lines.append(f"      {helps[key]}")
    return "\n".join(lines)
