"""NCSN++ / DDPM++ (minisgm.models.ncsnpp): sizes, wiring, parametrisation and numerics.

The paper presets are built on the meta device (no memory) and their parameter counts are
checked against Song et al. (2021), table 3. The exact counts below were also matched, and
the outputs compared to 1e-6 with weights copied over, against score_sde_pytorch's
implementation in a one-off check (that code is not vendored here).
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from minisgm.models import ncsnpp as nn_
from minisgm.models.ncsnpp import NCSNpp, NCSNppConfig, count_parameters
from minisgm.sde import SubVPSDE, VESDE, VPSDE


def tiny(base: NCSNppConfig = None, **kw) -> NCSNppConfig:
    """A 3-level 8x8 model: every code path of the big one at a few thousand parameters."""
    base = nn_.ncsnpp_cifar10() if base is None else base
    small = dict(nf=16, ch_mult=(1, 2, 2), num_res_blocks=1, image_size=8, attn_resolutions=(4,),
                 dropout=0.0, init_scale=1.0)
    small.update(kw)
    return dataclasses.replace(base, **small)


def build(cfg: NCSNppConfig, sde=None, dtype=torch.float64, seed: int = 0) -> NCSNpp:
    torch.manual_seed(seed)
    return NCSNpp(cfg, sde).to(dtype).eval()


def batch(cfg: NCSNppConfig, B: int = 3, dtype=torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g, dtype=dtype)
    t = torch.rand(B, generator=g, dtype=dtype) * 0.9 + 0.05
    return x, t


# ------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------

# preset -> (millions in Song et al. 2021 table 3, exact count of score_sde_pytorch's model,
# trainable parameters; its 128 fixed Fourier frequencies are a buffer here)
PAPER = {
    "ncsnpp_cifar10": (62.8, 62_758_787),
    "ddpmpp_cifar10": (61.8, 61_804_419),
    "ncsnpp_deep_cifar10": (107.6, 107_586_947),
    "ddpmpp_deep_cifar10": (106.6, 106_632_579),
}


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_paper_parameter_counts(preset):
    millions, exact = PAPER[preset]
    with torch.device("meta"):
        model = NCSNpp(getattr(nn_, preset)())
    n = count_parameters(model)
    assert abs(n / 1e6 - millions) <= 0.05, f"{preset}: {n / 1e6:.3f}M, paper {millions}M"
    assert n == exact
    assert next(model.parameters()).device.type == "meta"


def test_score_forward_runs_on_the_meta_device():
    # Shapes only: the input checks must not read values there, so FLOPs of the whole score
    # s(x, t) (not only the raw network) can be counted without memory.
    from torch.utils.flop_counter import FlopCounterMode

    from minisgm.sde import VESDE

    cfg = nn_.ncsnpp_small()
    with torch.device("meta"):
        model = NCSNpp(cfg, VESDE(exact_variance=False))
        x, t = torch.zeros(2, 3, 32, 32), torch.full((2,), 0.5)
    with FlopCounterMode(display=False) as counter:
        score = model(x, t)
    assert score.device.type == "meta" and score.shape == x.shape
    with torch.device("meta"):
        raw = NCSNpp(cfg)
        with FlopCounterMode(display=False) as counter_raw:
            raw.network(x, torch.zeros(2))
    assert counter.get_total_flops() == counter_raw.get_total_flops() > 0
    # A Python t is still checked (for free); tensor values in debug mode (test_bad_inputs...).
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1"):
        NCSNpp(cfg, VESDE())(torch.zeros(1, 3, 32, 32), 2.0)


@pytest.mark.parametrize("preset", ["ncsnpp_small", "ddpmpp_small"])
def test_small_presets_are_small(preset):
    with torch.device("meta"):
        n = count_parameters(NCSNpp(getattr(nn_, preset)()))
    assert 2e6 <= n <= 6e6


def test_deep_presets_differ_only_in_depth():
    for a, b in [("ncsnpp_cifar10", "ncsnpp_deep_cifar10"), ("ddpmpp_cifar10", "ddpmpp_deep_cifar10")]:
        ca, cb = getattr(nn_, a)(), getattr(nn_, b)()
        assert (ca.num_res_blocks, cb.num_res_blocks) == (4, 8)
        assert dataclasses.replace(ca, num_res_blocks=8) == cb


# ------------------------------------------------------------------------------------------
# Forward: shapes, dtypes, parametrisation
# ------------------------------------------------------------------------------------------

VARIANTS = {
    "ncsnpp": tiny(),
    "ddpmpp": tiny(nn_.ddpmpp_cifar10()),
    "skip_paths_cat": tiny(progressive="output_skip", progressive_input="input_skip",
                           progressive_combine="cat"),
    "skip_paths_nofir": tiny(fir=False, progressive="output_skip", progressive_input="input_skip"),
    "residual_paths": tiny(nn_.ddpmpp_cifar10(), progressive="residual", progressive_input="residual"),
    "residual_paths_fir": tiny(progressive="residual"),
    "ddpm_blocks": tiny(nn_.ddpmpp_cifar10(), resblock_type="ddpm"),
    "ddpm_blocks_fir": tiny(resblock_type="ddpm", skip_rescale=False),
    "ddpm_blocks_noconv": tiny(nn_.ddpmpp_cifar10(), resblock_type="ddpm", resamp_with_conv=False),
    "conv5_1channel": tiny(conv_size=5, num_channels=1),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_shape_dtype_and_gradients_reach_every_parameter(name, dtype):
    cfg = VARIANTS[name]
    model = build(cfg, VESDE() if cfg.scale_by_sigma else VPSDE(), dtype)
    x, t = batch(cfg, dtype=dtype)
    score = model(x, t)
    assert score.shape == x.shape and score.dtype == dtype
    assert torch.isfinite(score).all()
    score.square().sum().backward()
    # Every trainable tensor is wired into the output (a module built but never used fails).
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_vp_output_is_minus_noise_prediction_over_std():
    """DDPM++: score(x, t) = -F(x, 999 t) / s(t), s(t) the VP marginal std (closed form)."""
    cfg = tiny(nn_.ddpmpp_cifar10())
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    model = build(cfg, sde)
    x, t = batch(cfg)
    log_m = -0.25 * t**2 * (sde.beta_max - sde.beta_min) - 0.5 * t * sde.beta_min
    std = torch.sqrt(1 - torch.exp(2 * log_m))
    with torch.no_grad():
        eps_pred = model.network(x, 999 * t)
        expected = -eps_pred / std[:, None, None, None]
        torch.testing.assert_close(model(x, t), expected, rtol=1e-12, atol=0)
        # The same network with the sub-VP SDE divides by the sub-VP std instead.
        sub = NCSNpp(cfg, SubVPSDE()).to(torch.float64).eval()
        sub.load_state_dict(model.state_dict())
        std_sub = 1 - torch.exp(2 * log_m)
        torch.testing.assert_close(sub(x, t), -eps_pred / std_sub[:, None, None, None])


def test_ve_output_is_network_over_sigma_conditioned_on_log_sigma():
    """NCSN++: score(x, t) = F(x, log s(t)) / s(t), s(t)^2 = sigma(t)^2 - sigma_min^2."""
    cfg = tiny()
    sde = VESDE(sigma_min=0.01, sigma_max=50.0)
    model = build(cfg, sde)
    x, t = batch(cfg)
    sigma = 0.01 * (50.0 / 0.01) ** t
    std = torch.sqrt(sigma**2 - 0.01**2)
    with torch.no_grad():
        expected = model.network(x, torch.log(std)) / std[:, None, None, None]
        torch.testing.assert_close(model(x, t), expected, rtol=1e-12, atol=0)
    # A callable marginal std is used as given.
    model_fn = NCSNpp(cfg, lambda tt: 0.01 * (50.0 / 0.01) ** tt).to(torch.float64).eval()
    model_fn.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model_fn(x, t), model.network(x, torch.log(sigma)) / sigma[:, None, None, None])


def test_uncentered_input_is_mapped_to_minus_one_one():
    cfg_u = tiny(centered=False)
    cfg_c = tiny(centered=True)
    mu, mc = build(cfg_u), build(cfg_c)
    mc.load_state_dict(mu.state_dict())
    x, t = batch(cfg_u)
    with torch.no_grad():
        torch.testing.assert_close(mu.network(x, t), mc.network(2 * x - 1, t))


def test_noise_level_changes_output_and_dropout_only_in_training():
    cfg = tiny(dropout=0.3)
    model = build(cfg, VESDE())
    x, t = batch(cfg)
    with torch.no_grad():
        a, b = model.network(x, torch.zeros(3, dtype=x.dtype)), model.network(x, torch.ones(3, dtype=x.dtype))
        assert (a - b).abs().max() > 1e-3  # the conditioning reaches the output
        torch.testing.assert_close(model(x, t), model(x, t))  # eval: deterministic
        model.train()
        assert not torch.equal(model(x, t), model(x, t))


def test_class_conditioning(debug_mode):
    cfg = tiny(num_classes=10)
    model = build(cfg, VESDE())
    x, t = batch(cfg)
    with torch.no_grad():
        y0 = torch.zeros(3, dtype=torch.long)
        y1 = torch.full((3,), 7, dtype=torch.long)
        s0, s1 = model(x, t, y0), model(x, t, y1)
    assert s0.shape == x.shape and (s0 - s1).abs().max() > 1e-3
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match=r"lie in \[0, 9\]"):
        model(x, t, torch.full((3,), 10, dtype=torch.long))
    with pytest.raises(ValueError, match="long tensor"):
        model(x, t, torch.zeros(3))
    with pytest.raises(ValueError, match="unconditional"):
        build(tiny(), VESDE())(x, t, y0)


def test_zero_init_scale_starts_every_block_as_identity():
    """init_scale = 0: each block's last layer starts at ~0, so blocks pass the skip through.

    Then the whole network's output (its last conv also uses init_scale) is ~0 at init, the
    score starts at 0, and with skip_rescale the features keep unit scale.
    """
    cfg = tiny(init_scale=0.0)
    model = build(cfg, VESDE())
    x, t = batch(cfg)
    with torch.no_grad():
        assert model.network(x, t).abs().max() < 1e-3
        block = model.down[0].blocks[0]
        h = torch.randn(2, 16, 8, 8, dtype=torch.float64)
        temb = torch.randn(2, 64, dtype=torch.float64)
        torch.testing.assert_close(block(h, temb), h / math.sqrt(2), atol=1e-3, rtol=0)


def test_state_dict_round_trip_weights_only_and_deepcopy(tmp_path):
    import copy

    cfg = tiny()
    model = build(cfg, VESDE())
    keys = model.state_dict().keys()
    assert "fourier.W" in keys  # the random frequencies are part of the model
    assert not any(k.endswith("kernel") for k in keys)  # FIR taps come from the config
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    other = build(cfg, VESDE(), seed=123)
    other.load_state_dict(torch.load(path, weights_only=True))
    ema = copy.deepcopy(model)  # what an EMA copy does
    x, t = batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(other(x, t), model(x, t), rtol=0, atol=0)
        torch.testing.assert_close(ema(x, t), model(x, t), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# Layers against independent references
# ------------------------------------------------------------------------------------------


def test_attention_block_equals_naive_softmax_attention():
    torch.manual_seed(0)
    C, H, W = 32, 4, 5
    block = nn_.AttentionBlock(C, skip_rescale=True, init_scale=1.0).double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, C, H, W, dtype=torch.float64)

    # softmax(Q K^T / sqrt(d)) V over the H*W pixels, written out with einsum.
    h = F.group_norm(x, block.norm.num_groups, block.norm.weight, block.norm.bias, block.norm.eps)
    Wqkv, bqkv = block.qkv.weight[:, :, 0, 0], block.qkv.bias
    qkv = torch.einsum("oc,bchw->bohw", Wqkv, h) + bqkv[None, :, None, None]
    q, k, v = (z.reshape(2, C, H * W) for z in qkv.chunk(3, dim=1))
    logits = torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C)
    weights = torch.exp(logits - logits.max(-1, keepdim=True).values)
    weights = weights / weights.sum(-1, keepdim=True)
    a = torch.einsum("bij,bcj->bci", weights, v).reshape(2, C, H, W)
    out = torch.einsum("oc,bchw->bohw", block.proj.weight[:, :, 0, 0], a) + block.proj.bias[None, :, None, None]
    expected = (x + out) / math.sqrt(2)

    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-12)


def test_attention_init_matches_three_separate_layers():
    """q, k, v start like three C x C layers of DDPM's init (variance 0.1 / C each)."""
    torch.manual_seed(0)
    C = 128
    block = nn_.AttentionBlock(C)
    for w in block.qkv.weight.detach().chunk(3):
        bound = math.sqrt(3 * 0.1 / C)
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound


def test_fir_resampling_of_a_constant_is_constant_inside_and_mean_preserving():
    k = nn_.fir_kernel_2d((1, 3, 3, 1))
    x = torch.full((2, 3, 8, 8), 2.5, dtype=torch.float64)
    up = nn_.fir_upsample_2d(x, k)
    down = nn_.fir_downsample_2d(x, k)
    assert up.shape == (2, 3, 16, 16) and down.shape == (2, 3, 4, 4)
    # Outside the image the signal is zero (StyleGAN2 convention), so only the border row and
    # column feel the padding.
    torch.testing.assert_close(up[..., 1:-1, 1:-1], torch.full_like(up[..., 1:-1, 1:-1], 2.5))
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.full_like(down[..., 1:-1, 1:-1], 2.5))
    # Each input pixel spreads mass 4 (up) / 1/4 (down) in total: sums are preserved up to
    # the resolution change.
    g = torch.Generator().manual_seed(0)
    z = torch.zeros(1, 1, 12, 12, dtype=torch.float64)
    z[..., 3:9, 3:9] = torch.rand(6, 6, generator=g, dtype=torch.float64)  # away from the border
    torch.testing.assert_close(nn_.fir_upsample_2d(z, k).sum(), 4 * z.sum())
    torch.testing.assert_close(nn_.fir_downsample_2d(z, k).sum(), z.sum() / 4)


def _upfirdn_1d_axis(x: torch.Tensor, k: list, up: int, down: int, pad: tuple, axis: int) -> torch.Tensor:
    """StyleGAN2's upfirdn along one axis, literally: zero-insert, pad, convolve, subsample."""
    import numpy as np

    a = np.moveaxis(x.numpy(), axis, -1)
    n = a.shape[-1]
    u = np.zeros(a.shape[:-1] + (n * up,))
    u[..., ::up] = a
    u = np.concatenate([np.zeros(a.shape[:-1] + (pad[0],)), u, np.zeros(a.shape[:-1] + (pad[1],))], -1)
    out = np.apply_along_axis(lambda r: np.convolve(r, np.asarray(k, float), mode="valid"), -1, u)
    return torch.from_numpy(np.moveaxis(out[..., ::down], -1, axis).copy())


@pytest.mark.parametrize("taps", [(1, 3, 3, 1), (1, 2), (2, 1, 0, 3)])
def test_fir_resampling_equals_upfirdn_definition(taps):
    """Asymmetric taps pin down the orientation (convolution, not correlation) and alignment."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    k = nn_.fir_kernel_2d(taps)
    k1 = [v / sum(taps) for v in taps]
    p = len(taps) - 2
    up = x
    for axis in (2, 3):  # separable: filter rows, then columns (gain 2 per axis = 4 in total)
        up = _upfirdn_1d_axis(up, [2 * v for v in k1], 2, 1, ((p + 1) // 2 + 1, p // 2), axis)
    torch.testing.assert_close(nn_.fir_upsample_2d(x, k), up)
    down = x
    for axis in (2, 3):
        down = _upfirdn_1d_axis(down, k1, 1, 2, ((p + 1) // 2, p // 2), axis)
    torch.testing.assert_close(nn_.fir_downsample_2d(x, k), down)


def test_fir_1331_is_bilinear_resampling_inside():
    """[1, 3, 3, 1] up = bilinear interpolation, down = antialiased bilinear (interior pixels)."""
    k = nn_.fir_kernel_2d((1, 3, 3, 1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 10, generator=g, dtype=torch.float64)
    up = nn_.fir_upsample_2d(x, k)
    ref_up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up[..., 1:-1, 1:-1], ref_up[..., 1:-1, 1:-1])
    down = nn_.fir_downsample_2d(x, k)
    ref_down = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(down[..., 1:-1, 1:-1], ref_down[..., 1:-1, 1:-1])


@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1), (1, 5, 10, 10, 5, 1)])
@pytest.mark.parametrize("conv_size", [1, 3, 5])
def test_fused_fir_conv_equals_separate_resample_then_conv_inside(taps, conv_size):
    """StyleGAN2's fused layers = FIR up then conv / conv then FIR down, away from the border."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 32, 32, dtype=torch.float64)
    kw = dict(with_conv=True, fir=True, fir_kernel=taps, conv_size=conv_size)
    up = nn_.Resample("up", 4, 6, **kw).double()
    down = nn_.Resample("down", 4, 6, **kw).double()
    k, p, r = up.kernel.double(), conv_size // 2, len(taps) + conv_size
    with torch.no_grad():
        for m in (up, down):
            m.conv.bias.normal_()
        a = up(x)
        b = F.conv2d(nn_.fir_upsample_2d(x, k), up.conv.weight, up.conv.bias, padding=p)
        assert a.shape == b.shape == (2, 6, 64, 64)
        torch.testing.assert_close(a[..., r:-r, r:-r], b[..., r:-r, r:-r])
        a = down(x)
        b = nn_.fir_downsample_2d(F.conv2d(x, down.conv.weight, down.conv.bias, padding=p), k)
        assert a.shape == b.shape == (2, 6, 16, 16)
        q = r // 2 + 1
        assert a[..., q:-q, q:-q].numel() > 0
        torch.testing.assert_close(a[..., q:-q, q:-q], b[..., q:-q, q:-q])


def test_ddpm_sinusoidal_embedding_frequencies():
    s = torch.tensor([0.0, 1.0, 999.0], dtype=torch.float64)
    emb = nn_.ddpm_sinusoidal_embedding(s, 8)
    freqs = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 3)  # 1 ... 1e-4
    torch.testing.assert_close(emb, torch.cat([torch.sin(s[:, None] * freqs), torch.cos(s[:, None] * freqs)], 1))


# ------------------------------------------------------------------------------------------
# Memory format and mixed precision
# ------------------------------------------------------------------------------------------


def test_channels_last_gives_the_same_output():
    cfg = VARIANTS["ncsnpp"]
    model = build(cfg, VESDE(), torch.float32)
    x, t = batch(cfg, dtype=torch.float32)
    with torch.no_grad():
        ref = model(x, t)
        out_input = model(x.to(memory_format=torch.channels_last), t)
        model = model.to(memory_format=torch.channels_last)
        out_both = model(x.to(memory_format=torch.channels_last), t)
    # float32 sums taken in another order (channels-last convolution kernels, thread count, CPU): the
    # outputs (up to ~10: NCSN++ divides by sigma) differ by ~1e-6 of their size, 1.3e-5 at most seen;
    # a layout mistake would differ by O(1). Tolerance relative to the output's scale.
    atol = 2e-5 * ref.abs().max().item()
    torch.testing.assert_close(out_input, ref, rtol=1e-5, atol=atol)
    torch.testing.assert_close(out_both, ref, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("name", ["ncsnpp", "ddpmpp"])
def test_bf16_autocast_on_cpu_is_close_to_fp32(name):
    cfg = VARIANTS[name]
    model = build(cfg, VESDE() if cfg.scale_by_sigma else VPSDE(), torch.float32)
    x, t = batch(cfg, dtype=torch.float32)
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
    assert out.dtype == torch.float32  # the score comes back in x's dtype
    rel = (out - ref).norm() / ref.norm()
    assert rel < 3e-2, rel  # bf16 has an 8-bit mantissa: ~0.4% per op, a few ops deep


@pytest.mark.slow
def test_torch_compile_matches_eager():
    cfg = VARIANTS["ncsnpp"]
    model = build(cfg, VESDE(), torch.float32)
    x, t = batch(cfg, dtype=torch.float32)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), model(x, t), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["ncsnpp", "ddpmpp"])
def test_cuda_fp32_and_bf16_match_cpu_float64(name):
    cfg = VARIANTS[name]
    sde = VESDE() if cfg.scale_by_sigma else VPSDE()
    ref_model = build(cfg, sde, torch.float64)
    x, t = batch(cfg, dtype=torch.float64)
    with torch.no_grad():
        ref = ref_model(x, t)
        model = build(cfg, sde, torch.float32).cuda().to(memory_format=torch.channels_last)
        xc = x.float().cuda().contiguous(memory_format=torch.channels_last)
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            out = model(xc, t.float().cuda()).double().cpu()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out16 = model(xc, t.float().cuda()).double().cpu()
    assert (out16 - ref).norm() / ref.norm() < 3e-2


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, match", [
    (dict(resblock_type="resnet"), "resblock_type"),
    (dict(progressive="skip"), "progressive"),
    (dict(embedding_type="learned"), "embedding_type"),
    (dict(attn_resolutions=(12,)), "match no level"),
    (dict(fir_kernel=(1, 2, 1)), "even number of taps"),
    (dict(image_size=30), "divisible"),
    (dict(dropout=1.5), "dropout"),
    (dict(conv_size=4), "odd"),
    (dict(nf=18), "GroupNorm"),
    (dict(ch_mult=()), "must not be empty"),
    (dict(fir=1), "bool"),
    (dict(num_classes=0), "num_classes"),
])
def test_bad_configs_are_rejected(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        dataclasses.replace(nn_.ncsnpp_cifar10(), **change)


def test_lists_from_json_become_tuples():
    cfg = dataclasses.replace(nn_.ncsnpp_cifar10(), ch_mult=[1, 2, 2, 2], attn_resolutions=[16])
    assert cfg.ch_mult == (1, 2, 2, 2) and cfg.attn_resolutions == (16,)
    assert cfg == nn_.ncsnpp_cifar10()


def test_bad_inputs_are_rejected(debug_mode):
    cfg = tiny()
    model = build(cfg, VESDE())
    x, t = batch(cfg)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 3, 8, 8\]"):
        model(x[:, :2], t)
    with pytest.raises(ValueError, match="t must"):
        model(x, t[:2])
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1"):
        model(x, t + 1)
    with pytest.raises(ValueError, match="positive"):
        model(x, torch.zeros_like(t))  # VE: s(0) = 0, the score is undefined
    with pytest.raises(ValueError, match="marginal std"):
        build(cfg)(x, t)
    with pytest.raises(TypeError, match="NCSNppConfig"):
        NCSNpp({"nf": 16})
