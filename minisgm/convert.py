"""Import score_sde_pytorch checkpoints (Song et al. 2021) as minisgm runs.

    python -m minisgm.convert checkpoint_26.pth --preset cifar10_ncsnpp_ve --out runs/score-sde-ve
    python -m minisgm.sample --ckpt runs/score-sde-ve --sampler pc --steps 1000 --n 64

The official ``all_modules.K.*`` entries are the modules of :func:`reference_order`, in order; ``NIN``
layers (``y = x W + b``) become 1x1 convolutions of weight ``W^T``, the attention's q, k, v one ``qkv``.
The EMA becomes ``ema``; the optimizer state is not converted (an imported run samples, never resumes).
VE runs get ``sde.exact_variance=false``: those networks condition on ``sigma(t)``, not on the exact
marginal std. Book: :ref:`sec-official-checkpoints`.
"""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .build import build_model, n_classes_of
from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_state_dict_checked, save_checkpoint
from .config import PRESETS, Config, ConfigError, apply_overrides, config_to_dict, get_preset, parse_overrides
from .models.ncsnpp import NCSNpp, NCSNppConfig

__all__ = ["reference_order", "convert_state_dict", "ema_state_dict", "import_checkpoint", "main"]

_KEY = re.compile(r"^(?:module\.)?all_modules\.(\d+)\.(.+)$")


def reference_order(model: NCSNpp) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of the modules of ``model`` in the order of the reference's ``all_modules``."""
    if model.class_embed is not None:
        raise ValueError("score_sde_pytorch's NCSN++ has no class embedding: use an unconditional model")
    units: List[nn.Module] = [model.fourier] if model.fourier is not None else []
    units += [model.temb_mlp[0], model.temb_mlp[2], model.conv_in]
    for level in model.down:
        for j, block in enumerate(level.blocks):
            units += [block] + ([level.attn[j]] if len(level.attn) else [])
        units += [m for m in (level.resample, level.pyramid) if m is not None]
    units += [model.mid_block1, model.mid_attn, model.mid_block2]
    for level in model.up:
        units += list(level.blocks) + list(level.attn)
        units += [m for m in (level.pyramid_norm, level.pyramid_conv, level.pyramid, level.resample) if m is not None]
    units += [m for m in (model.norm_out, model.conv_out) if m is not None]
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(m)], m) for m in units]


def _grouped(ref_state: Mapping[str, Tensor]) -> List[List[Tuple[str, Tensor]]]:
    """The reference's tensors grouped by module index K (``[module.]all_modules.K.name``)."""
    groups: Dict[int, List[Tuple[str, Tensor]]] = {}
    for key, value in ref_state.items():
        m = _KEY.match(key)
        if m:
            groups.setdefault(int(m.group(1)), []).append((m.group(2), value))
    if not groups:
        raise ValueError("no 'all_modules.K.*' entries: not a score_sde_pytorch NCSN++ state dict")
    if sorted(groups) != list(range(len(groups))):
        raise ValueError(f"the reference's module indices are not 0..{len(groups) - 1}: the state dict is incomplete")
    return [groups[k] for k in range(len(groups))]


def convert_state_dict(ref_state: Mapping[str, Tensor], model: NCSNpp) -> Dict[str, Tensor]:
    """A score_sde_pytorch NCSN++ state dict -> the state dict of ``model`` (ValueError: another config)."""
    groups = _grouped(ref_state)
    units = reference_order(model)
    if len(groups) != len(units):
        raise ValueError(f"the checkpoint has {len(groups)} modules, the model {len(units)}: "
                         "they are not the same architecture (another preset or model config?)")
    out: Dict[str, Tensor] = OrderedDict()
    for k, (group, (prefix, module)) in enumerate(zip(groups, units)):
        # NIN layers compute x W + b with W [in, out]: as a 1x1 conv the weight is W^T.
        src = [v.t() if name.endswith("W") and v.dim() == 2 else v for name, v in group]
        dst = module.state_dict()
        if "qkv.weight" in dst and len(src) == 10:  # GroupNorm, q, k, v, out -> norm, qkv, proj
            gw, gb, wq, bq, wk, bk, wv, bv, wo, bo = src
            src = [gw, gb, torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv]), wo, bo]
        if len(src) != len(dst):
            raise ValueError(f"module {k} ({prefix}): the checkpoint has {len(src)} tensors "
                             f"({', '.join(n for n, _ in group)}), the model {len(dst)}")
        for (name, d), v in zip(dst.items(), src):
            if d.numel() != v.numel():
                raise ValueError(f"module {k} ({prefix}.{name}): checkpoint shape {list(v.shape)}, "
                                 f"model {list(d.shape)}: another preset or model config?")
            out[f"{prefix}.{name}" if prefix else name] = v.reshape(d.shape).clone()
    return out


def ema_state_dict(ref_state: Mapping[str, Tensor], shadow_params: Sequence[Tensor], fourier: bool) -> Dict[str, Tensor]:
    """The reference's model state dict with its trainable tensors replaced by the EMA's ``shadow_params``
    (the ``all_modules`` tensors in order, without the fixed Fourier frequencies ``all_modules.0.W``)."""
    keys = [k for k in ref_state if _KEY.match(k)]
    if fourier:
        keys = [k for k in keys if _KEY.match(k).groups() != ("0", "W")]
    if len(keys) != len(shadow_params):
        raise ValueError(f"the EMA holds {len(shadow_params)} tensors but the model has {len(keys)} trainable ones")
    out = dict(ref_state)
    for k, v in zip(keys, shadow_params):
        if tuple(v.shape) != tuple(ref_state[k].shape):
            raise ValueError(f"EMA tensor for {k} has shape {list(v.shape)}, the model {list(ref_state[k].shape)}")
        out[k] = v
    return out


def _load_reference_checkpoint(path: Path) -> Mapping:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read {path} as a weights-only checkpoint ({msg})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), Mapping):
        raise CheckpointError(f"{path} is not a score_sde_pytorch checkpoint (no 'model' state dict)")
    return state


def import_checkpoint(path: str | Path, cfg: Config) -> Dict:
    """Read a score_sde_pytorch checkpoint into a minisgm checkpoint dict for config ``cfg``.

    Returns ``{"step", "config", "model", "ema", "imported_from"}`` for
    :func:`minisgm.checkpoint.save_checkpoint` (EMA = raw weights if the file has none; for VE
    the config has ``sde.exact_variance = False``). Raises ``CheckpointError`` (unreadable file,
    weights that do not fit) or ``ConfigError`` (not an unconditional NCSN++ / DDPM++ config).
    """
    if not isinstance(cfg.model, NCSNppConfig):
        raise ConfigError("score_sde_pytorch checkpoints hold NCSN++/DDPM++ networks: choose a preset with an "
                          "NCSN++ model (e.g. cifar10_ncsnpp_ve, cifar10_ddpmpp_vp)")
    if n_classes_of(cfg.data):
        raise ConfigError("score_sde_pytorch's CIFAR-10 models are unconditional: set --data.class_conditional false")
    cfg = copy.deepcopy(cfg)
    if cfg.sde.kind == "ve":
        cfg.sde.exact_variance = False  # the official networks condition on sigma(t)
    path = Path(path)
    state = _load_reference_checkpoint(path)
    model = build_model(cfg)
    ref_model = {k: v for k, v in state["model"].items() if torch.is_tensor(v)}
    try:
        weights = convert_state_dict(ref_model, model)
        ema = weights
        shadow = state.get("ema", {}).get("shadow_params") if isinstance(state.get("ema"), Mapping) else None
        if shadow is not None:
            ema = convert_state_dict(ema_state_dict(ref_model, shadow, model.fourier is not None), model)
    except ValueError as err:
        raise CheckpointError(f"{path} does not fit the model of preset {cfg.preset}: {err}") from None
    load_state_dict_checked(model, weights, "model")
    load_state_dict_checked(model, ema, "EMA")
    return {"step": int(state.get("step", 0)), "config": config_to_dict(cfg), "model": weights, "ema": ema,
            "imported_from": str(path)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m minisgm.convert``; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="python -m minisgm.convert", allow_abbrev=False, description=__doc__.splitlines()[0],
        epilog="Config fields can be overridden as in minisgm.train (--model.nf 64 ...). "
               f"Presets: {', '.join(PRESETS)}.")
    p.add_argument("checkpoint", help="a score_sde_pytorch checkpoint (e.g. checkpoint_26.pth)")
    p.add_argument("--preset", required=True, help="the minisgm preset of the same model, e.g. cifar10_ncsnpp_ve")
    p.add_argument("--out", required=True, help="run folder to write (config.json, checkpoint.pt)")
    args, rest = p.parse_known_args(argv)
    try:
        cfg = get_preset(args.preset)
        apply_overrides(cfg, parse_overrides(cfg, rest))
        state = import_checkpoint(args.checkpoint, cfg)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if (out / CHECKPOINT_NAME).exists():
        print(f"error: {out / CHECKPOINT_NAME} exists; choose a new --out folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(state["config"], indent=2) + "\n")
    save_checkpoint(state, out / CHECKPOINT_NAME)
    note = " (VE: sde.exact_variance=false, the official sigma(t) convention)" if cfg.sde.kind == "ve" else ""
    print(f"Imported {args.checkpoint} (step {state['step']}) as preset {cfg.preset}{note} -> {out}")
    print(f"Sample: python -m minisgm.sample --ckpt {out} --out {out / 'samples.npz'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
