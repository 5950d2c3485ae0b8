"""Write the score_sde_pytorch fixtures of tests/test_convert.py (run by hand, never by the tests).

Needs a checkout of https://github.com/yang-song/score_sde_pytorch (Apache-2.0); nothing of it
is stored here. For each case, a small network of the official code (its own config file,
shrunk to nf=8, ch_mult=(1, 2), one residual block per level, attention at 16x16; one case
with the pyramids of its high-resolution models) gets random
weights, takes two training steps with the official loss, Adam and EMA, and is saved in the
format of the official ``utils.save_checkpoint`` (``{"optimizer", "model", "ema", "step"}``)
as ``score_sde_<case>.pth``. Beside it, ``score_sde_<case>_expected.pt`` holds a batch
``x``, times ``t`` and the official ``get_score_fn`` scores with the raw and with the EMA
weights: the oracle the converted minisgm model must reproduce.

    python tests/data/make_score_sde_fixtures.py --ref ../score_sde_pytorch
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))
from vs_score_sde import load_reference, randomize_weights, reference_sde  # noqa: E402

SHRINK = {"nf": 8, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (16,)}
# The layout of the official high-resolution models (CelebA-HQ, FFHQ, LSUN): output and input
# pyramids with skip connections instead of the CIFAR-10 models' residual input pyramid.
SKIP = {**SHRINK, "progressive": "output_skip", "progressive_input": "input_skip"}
CASES = {  # case -> (the official config file, minisgm preset it corresponds to, model fields set in both)
    "ve_ncsnpp": ("configs/ve/cifar10_ncsnpp_continuous.py", "cifar10_ncsnpp_ve", SHRINK),
    "vp_ddpmpp": ("configs/vp/cifar10_ddpmpp_continuous.py", "cifar10_ddpmpp_vp", SHRINK),
    "subvp_ddpmpp": ("configs/subvp/cifar10_ddpmpp_continuous.py", "cifar10_ddpmpp_subvp", SHRINK),
    "ve_ncsnpp_skip": ("configs/ve/cifar10_ncsnpp_continuous.py", "cifar10_ncsnpp_ve", SKIP),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, type=Path)
    args = parser.parse_args()
    ref = args.ref.resolve()
    mods, _ = load_reference(ref, "native")
    import importlib.util

    for case, (cfg_file, preset, fields) in CASES.items():
        spec = importlib.util.spec_from_file_location(f"cfg_{case}", ref / cfg_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        config.device = torch.device("cpu")
        for k, v in fields.items():
            setattr(config.model, k, v)
        config.model.ema_rate = 0.5  # so that EMA and raw weights differ clearly after two steps
        config.optim.warmup = 0
        config.optim.lr = 1e-2
        torch.manual_seed(0)
        model = mods["models.utils"].create_model(config)
        g = torch.Generator().manual_seed(1)
        randomize_weights(model, g)  # the published init zeroes some convs
        ema = mods["models.ema"].ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
        optimizer = mods["losses"].get_optimizer(config, model.parameters())
        state = dict(optimizer=optimizer, model=model, ema=ema, step=0)
        sde = reference_sde(mods, config)
        step_fn = mods["losses"].get_step_fn(sde, train=True, optimize_fn=mods["losses"].optimization_manager(config),
                                             reduce_mean=config.training.reduce_mean, continuous=True)
        x = torch.rand(4, 3, 32, 32, generator=g)
        for _ in range(2):
            step_fn(state, x * 2 - 1 if config.data.centered else x)
        torch.save({"optimizer": optimizer.state_dict(), "model": model.state_dict(), "ema": ema.state_dict(),
                    "step": state["step"]}, HERE / f"score_sde_{case}.pth")

        xb = torch.randn(3, 3, 32, 32, generator=g)
        t = torch.tensor([0.02, 0.4, 0.9])
        score_fn = mods["models.utils"].get_score_fn(sde, model, train=False, continuous=True)
        with torch.no_grad():
            raw = score_fn(xb, t)
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
            smooth = score_fn(xb, t)
            ema.restore(model.parameters())
        torch.save({"preset": preset, "model": {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
                    "x": xb, "t": t, "score_model": raw, "score_ema": smooth},
                   HERE / f"score_sde_{case}_expected.pt")
        print(case, "->", HERE / f"score_sde_{case}.pth")


if __name__ == "__main__":
    main()
