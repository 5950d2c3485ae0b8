"""NCSN++ and DDPM++: the CIFAR-10 score networks of Song et al. (2021), in plain PyTorch.

Song et al. (2021), "Score-Based Generative Modeling through Stochastic Differential Equations",
ICLR, section 4.4 and appendix H. Book: :ref:`sec-ncsnpp`. The DDPM U-Net with BigGAN residual
blocks, sqrt(2) skip rescaling, FIR resampling (StyleGAN2), a progressive input path and 16 x 16
self-attention. The layer layout follows score_sde_pytorch (parameter counts agree), with no
custom CUDA kernels: FIR filters are depthwise (transposed) convolutions.

Convention: ``t`` is the SDE time in [0, 1]; sigma_t is the SDE's marginal std (for
:class:`minisgm.sde.VESDE` the exact sqrt(sigma(t)^2 - sigma_min^2)). NCSN++ (VE) embeds
log sigma_t and its output is sigma_t * score; DDPM++ (VP, sub-VP) embeds 999 t and predicts
the noise z of x_t = alpha_t x_0 + sigma_t z, so score = -output / sigma_t.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minisgm.models.embeddings import GaussianFourierProjection, check_marginal_std, dot_product_attention
from minisgm.checks import check_values
from minisgm.sde import batch_time

__all__ = ["NCSNppConfig", "NCSNpp", "ncsnpp_cifar10", "ddpmpp_cifar10", "ncsnpp_deep_cifar10",
           "ddpmpp_deep_cifar10", "ncsnpp_small", "ddpmpp_small", "ddpm_sinusoidal_embedding",
           "count_parameters", "fir_kernel_2d", "fir_upsample_2d", "fir_downsample_2d",
           "AttentionBlock", "ResnetBlockBigGAN", "ResnetBlockDDPM"]

_SQRT2 = math.sqrt(2.0)


# ----- Configuration --------------------------------------------------------------------------
@dataclass
class NCSNppConfig:
    """Hyper-parameters of an NCSN++ / DDPM++ U-Net (Song et al. 2021, appendix H).

    The defaults are DDPM++ cont.; presets: :func:`ncsnpp_cifar10`, :func:`ddpmpp_cifar10`, ``*_deep_*``.
    """

    nf: int = 128  # base width: level i has nf * ch_mult[i] channels
    ch_mult: Tuple[int, ...] = (1, 2, 2, 2)  # width multiplier per resolution (32, 16, 8, 4 px)
    num_res_blocks: int = 4  # residual blocks per level going down (num_res_blocks + 1 going up)
    attn_resolutions: Tuple[int, ...] = (16,)  # feature-map sizes that get self-attention
    dropout: float = 0.1  # dropout before the second conv of every residual block
    resamp_with_conv: bool = True  # "ddpm" blocks only: resampling layers carry a 3x3 conv
    fir: bool = False  # FIR (anti-aliased, StyleGAN2) resampling instead of nearest / avg-pool
    fir_kernel: Tuple[int, ...] = (1, 3, 3, 1)  # 1-D FIR taps; the 2-D kernel is their outer product
    skip_rescale: bool = True  # divide every residual sum by sqrt(2) (keeps the variance)
    resblock_type: str = "biggan"  # "biggan" (blocks resample) or "ddpm" (separate resampling layers)
    progressive: str = "none"  # output path: "none", "output_skip" or "residual"
    progressive_input: str = "none"  # progressive input path: "none", "input_skip" (image pyramid, 1x1 convs) or "residual" (features carried level to level, 3x3 convs)
    progressive_combine: str = "sum"  # how "input_skip" merges the pyramid: "sum" or "cat"
    embedding_type: str = "positional"  # "fourier" on log sigma(t) (VE) or "positional" on 999 t (VP)
    fourier_scale: float = 16.0  # std of the random Fourier frequencies W
    init_scale: float = 0.0  # init variance scale of each block's last layer (0: blocks start as identity)
    conv_size: int = 3  # kernel size of the (odd-sized) convolutions
    image_size: int = 32  # input height = width, in pixels
    num_channels: int = 3  # image channels
    centered: bool = True  # True: data in [-1, 1]; False: data in [0, 1], mapped by 2x - 1 first
    num_classes: Optional[int] = None  # class-conditional model with this many classes (None: off)
    scale_by_sigma: bool = False  # True: score = out / sigma(t) (NCSN++); False: score = -out / sigma(t)

    def __post_init__(self) -> None:
        # Configs read back from JSON/CLI hold lists; keep the fields hashable tuples.
        for name in ("ch_mult", "attn_resolutions", "fir_kernel"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, tuple(value))
        _validate_config(self)

    @property
    def resolutions(self) -> Tuple[int, ...]:
        """Feature-map size of each level: image_size / 2^i."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"NCSNppConfig.{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"NCSNppConfig.{name} must be >= {minimum}, got {value}")


def _check_int_tuple(name: str, value: Any, minimum: int, allow_empty: bool) -> None:
    if not isinstance(value, tuple):
        raise TypeError(f"NCSNppConfig.{name} must be a tuple of ints, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"NCSNppConfig.{name} must not be empty")
    for v in value:
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ValueError(f"NCSNppConfig.{name} must hold ints >= {minimum}, got {value}")


def _validate_config(c: NCSNppConfig) -> None:
    _check_int("nf", c.nf, 1)
    _check_int_tuple("ch_mult", c.ch_mult, 1, allow_empty=False)
    _check_int("num_res_blocks", c.num_res_blocks, 1)
    _check_int_tuple("attn_resolutions", c.attn_resolutions, 1, allow_empty=True)
    _check_int_tuple("fir_kernel", c.fir_kernel, 0, allow_empty=False)
    _check_int("conv_size", c.conv_size, 1)
    _check_int("image_size", c.image_size, 1)
    _check_int("num_channels", c.num_channels, 1)
    for name in ("resamp_with_conv", "fir", "skip_rescale", "centered", "scale_by_sigma"):
        if not isinstance(getattr(c, name), bool):
            raise TypeError(f"NCSNppConfig.{name} must be a bool, got {getattr(c, name)!r}")
    for name in ("dropout", "fourier_scale", "init_scale"):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise TypeError(f"NCSNppConfig.{name} must be a finite number, got {v!r}")
    if not 0.0 <= c.dropout < 1.0:
        raise ValueError(f"NCSNppConfig.dropout must lie in [0, 1), got {c.dropout}")
    if c.fourier_scale <= 0:
        raise ValueError(f"NCSNppConfig.fourier_scale must be positive, got {c.fourier_scale}")
    if c.init_scale < 0:
        raise ValueError(f"NCSNppConfig.init_scale must be >= 0, got {c.init_scale}")
    if c.conv_size % 2 != 1:
        raise ValueError(f"NCSNppConfig.conv_size must be odd ('same' padding), got {c.conv_size}")
    if len(c.fir_kernel) % 2 != 0 or sum(c.fir_kernel) <= 0:
        raise ValueError(f"NCSNppConfig.fir_kernel must have an even number of taps with a positive "
                         f"sum (factor-2 resampling keeps the grid aligned only then), got {c.fir_kernel}")
    for name, choices in (("resblock_type", ("biggan", "ddpm")),
                          ("progressive", ("none", "output_skip", "residual")),
                          ("progressive_input", ("none", "input_skip", "residual")),
                          ("progressive_combine", ("sum", "cat")),
                          ("embedding_type", ("fourier", "positional"))):
        if (value := getattr(c, name)) not in choices:
            raise ValueError(f"NCSNppConfig.{name} must be one of {list(choices)}, got {value!r}")
    if c.num_classes is not None:
        _check_int("num_classes", c.num_classes, 1)
    n_down = len(c.ch_mult) - 1
    if c.image_size % 2**n_down != 0:
        raise ValueError(f"NCSNppConfig.image_size={c.image_size} must be divisible by 2^(len(ch_mult)-1)"
                         f"={2**n_down}")
    unused = sorted(set(c.attn_resolutions) - set(c.resolutions))
    if unused:
        raise ValueError(f"NCSNppConfig.attn_resolutions {unused} match no level; the levels have sizes "
                         f"{list(c.resolutions)}")
    if c.embedding_type == "positional" and c.nf < 4:
        raise ValueError("NCSNppConfig.nf must be >= 4 for the sinusoidal embedding")
    for mult in c.ch_mult:
        _check_group_norm_channels(c.nf * mult, "nf * ch_mult")


def _group_norm_groups(ch: int) -> int:
    # score_sde's rule: 32 groups, fewer for thin layers (at least 4 channels per group).
    return min(ch // 4, 32)


def _check_group_norm_channels(ch: int, what: str) -> None:
    g = _group_norm_groups(ch)
    if g < 1 or ch % g != 0:
        raise ValueError(f"{what} = {ch} channels cannot be split into GroupNorm groups of "
                         f"min(C // 4, 32) = {g}; use a multiple of 4 (at most 128) or of 32")


# ----- Presets (Song et al. 2021, table 3 / appendix H; score_sde configs for CIFAR-10) -------
def ncsnpp_cifar10() -> NCSNppConfig:
    """NCSN++ cont. for the VE SDE on CIFAR-10: 4 levels x 4 BigGAN blocks, FIR, residual progressive input path."""
    # The defaults are DDPM++ cont.; NCSN++ differs in resampling, input path, embedding and output.
    return NCSNppConfig(fir=True, progressive_input="residual", embedding_type="fourier",
                        centered=False,  # the VE configs feed data in [0, 1]
                        scale_by_sigma=True)


def ddpmpp_cifar10() -> NCSNppConfig:
    """DDPM++ cont. for the VP and sub-VP SDEs on CIFAR-10: no FIR, no progressive input, noise prediction."""
    return NCSNppConfig()  # the defaults


def ncsnpp_deep_cifar10() -> NCSNppConfig:
    """NCSN++ cont. (deep): :func:`ncsnpp_cifar10` with 8 residual blocks per level."""
    return dataclasses.replace(ncsnpp_cifar10(), num_res_blocks=8)


def ddpmpp_deep_cifar10() -> NCSNppConfig:
    """DDPM++ cont. (deep): :func:`ddpmpp_cifar10` with 8 residual blocks per level."""
    return dataclasses.replace(ddpmpp_cifar10(), num_res_blocks=8)


def ncsnpp_small() -> NCSNppConfig:
    """A small, fast NCSN++ for the VE SDE on CIFAR-10 (4.8M parameters, 2.1 GFLOP per image).

    :func:`ncsnpp_cifar10` on 3 levels of 64, 64, 128 channels x 2 blocks: hours on one GPU.
    """
    return dataclasses.replace(ncsnpp_cifar10(), nf=64, ch_mult=(1, 1, 2), num_res_blocks=2)


def ddpmpp_small() -> NCSNppConfig:
    """A small, fast DDPM++ for the VP / sub-VP SDEs (same sizes as :func:`ncsnpp_small`)."""
    return dataclasses.replace(ddpmpp_cifar10(), nf=64, ch_mult=(1, 1, 2), num_res_blocks=2)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; works on the meta device, where nothing is allocated."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----- Building blocks ------------------------------------------------------------------------
def _variance_scaling_(weight: Tensor, scale: float) -> Tensor:
    """DDPM's initialiser: Glorot-uniform with gain sqrt(scale), i.e. variance scale / fan_avg.

    ``scale = 0`` becomes 1e-10: the layer starts (almost) at zero but gets gradients in every direction.
    """
    scale = 1e-10 if scale == 0 else scale
    return nn.init.xavier_uniform_(weight, gain=math.sqrt(scale))


def _conv(in_ch: int, out_ch: int, kernel_size: int, init_scale: float = 1.0, stride: int = 1,
          padding: Optional[int] = None) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride,
                     padding=kernel_size // 2 if padding is None else padding)
    _variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _linear(in_features: int, out_features: int, init_scale: float = 1.0) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    _variance_scaling_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


def _group_norm(ch: int) -> nn.GroupNorm:
    # Concatenated skips give sums such as 96 + 48 = 144 that the config check cannot see.
    _check_group_norm_channels(ch, "NCSNpp: a GroupNorm input (e.g. features + concatenated skip)")
    return nn.GroupNorm(_group_norm_groups(ch), ch, eps=1e-6)


def fir_kernel_2d(taps: Sequence[float]) -> Tensor:
    """Separable 2-D FIR kernel ``k k^T / sum(k)^2`` (sums to one), ``[n, n]`` float64 for n taps."""
    k = torch.tensor([float(v) for v in taps], dtype=torch.float64)
    k2 = torch.outer(k, k)
    return k2 / k2.sum()


def fir_upsample_2d(x: Tensor, kernel: Tensor) -> Tensor:
    """Upsample by 2 with a FIR filter: insert zeros between pixels, then filter with 4 k.

    ``x [B, C, H, W] -> [B, C, 2H, 2W]``; ``kernel [n, n]`` (n even) from :func:`fir_kernel_2d`.
    For k = [1, 3, 3, 1] / 8 this is bilinear interpolation (half-pixel centres) away from the
    border; outside the image the signal is taken as zero (as in StyleGAN2 / score_sde).
    """
    C, n = x.shape[1], kernel.shape[-1]
    # A transposed convolution with stride 2 is exactly "zero-insertion then convolve": it
    # scatters x[i] * k[j] to 2i + j, a true convolution, so k is not flipped. The factor 4
    # restores the mean lost to the inserted zeros.
    w = (4.0 * kernel).to(dtype=x.dtype, device=x.device).expand(C, 1, n, n)
    return F.conv_transpose2d(x, w, stride=2, padding=(n - 2) // 2, groups=C)


def fir_downsample_2d(x: Tensor, kernel: Tensor) -> Tensor:
    """Downsample by 2 with a FIR filter: filter with k, keep every other pixel.

    ``x [B, C, H, W]`` (H, W even) ``-> [B, C, H/2, W/2]``; ``kernel [n, n]`` (n even) from
    :func:`fir_kernel_2d`. For k = [1, 3, 3, 1] / 8 this equals antialiased bilinear
    downsampling away from the border.
    """
    C, n = x.shape[1], kernel.shape[-1]
    # conv2d correlates; flipping the kernel makes it the convolution of the definition.
    w = kernel.flip(0, 1).to(dtype=x.dtype, device=x.device).expand(C, 1, n, n)
    return F.conv2d(x, w, stride=2, padding=(n - 2) // 2, groups=C)


class Resample(nn.Module):
    """Factor-2 up- or down-sampling, optionally fused with a learned conv (DDPM/StyleGAN2 layer).

    * ``fir=False``: nearest-neighbour up / 2x2 average-pool down; with a conv, the conv follows
      the upsampling, or is a stride-2 conv for downsampling (TensorFlow "SAME" padding).
    * ``fir=True``: FIR resampling; with a conv, the FIR filter and the conv are fused as in
      StyleGAN2 (padding applied once, the conv run at the low resolution when downsampling).
    """

    def __init__(self, mode: str, in_ch: int, out_ch: Optional[int] = None, with_conv: bool = False,
                 fir: bool = False, fir_kernel: Sequence[int] = (1, 3, 3, 1), conv_size: int = 3):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"mode must be 'up' or 'down', got {mode!r}")
        out_ch = in_ch if out_ch is None else out_ch
        if not with_conv and out_ch != in_ch:
            raise ValueError("changing the channel count needs with_conv=True")
        self.mode, self.with_conv, self.fir = mode, with_conv, fir
        self.conv_size = conv_size
        self.register_buffer("kernel", fir_kernel_2d(fir_kernel).float(), persistent=False)
        if with_conv:
            # Stride-2 'SAME' conv (non-FIR down) pads on the right/bottom only.
            padding = 0 if (mode == "down" or fir) else conv_size // 2
            stride = 2 if (mode == "down" and not fir) else 1
            self.conv = _conv(in_ch, out_ch, conv_size, stride=stride, padding=padding)

    def forward(self, x: Tensor, temb: Optional[Tensor] = None) -> Tensor:
        """``x [B, C, H, W] -> [B, out_ch, 2H, 2W]`` (up) or ``[B, out_ch, H/2, W/2]`` (down)."""
        up = self.mode == "up"
        if not self.fir and up:
            h = F.interpolate(x, scale_factor=2.0, mode="nearest")
            return self.conv(h) if self.with_conv else h
        if not self.fir:
            return self.conv(F.pad(x, (0, 1, 0, 1))) if self.with_conv else F.avg_pool2d(x, 2)
        if not self.with_conv:
            return fir_upsample_2d(x, self.kernel) if up else fir_downsample_2d(x, self.kernel)
        fused = _upsample_conv_2d if up else _conv_downsample_2d
        return fused(x, self.conv.weight, self.conv.bias, self.kernel)


def _fir_filter(x: Tensor, kernel: Tensor, gain: float, padding: int) -> Tensor:
    C, n = x.shape[1], kernel.shape[-1]
    w = (gain * kernel.flip(0, 1)).to(dtype=x.dtype, device=x.device).expand(C, 1, n, n)
    return F.conv2d(x, w, padding=padding, groups=C)


def _conv_downsample_2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], kernel: Tensor) -> Tensor:
    """Conv followed by FIR downsampling, fused: filter once with enough padding, stride-2 conv.

    Both steps are linear and shift-invariant, so their order is free; filtering first lets the
    (expensive) conv run on the output grid only.
    """
    n, ks = kernel.shape[-1], weight.shape[-1]
    h = _fir_filter(x, kernel, 1.0, padding=((n - 2) + (ks - 1)) // 2)
    return F.conv2d(h, weight, bias, stride=2)


def _upsample_conv_2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], kernel: Tensor) -> Tensor:
    """FIR upsampling followed by a conv, fused: a stride-2 transposed conv, then the FIR filter.

    Away from the border this equals ``conv2d(fir_upsample_2d(x), weight, padding=ks // 2)``.
    """
    n, ks = kernel.shape[-1], weight.shape[-1]
    # conv_transpose2d wants [in, out, kh, kw] and scatters without flipping, so flip the
    # weight to obtain "zero-insertion then correlation with weight".
    h = F.conv_transpose2d(x, weight.transpose(0, 1).flip(2, 3), stride=2)
    # h has the full size 2H + ks - 2; filtering with (n - 1 - ks) / 2 + 1 zeros of padding per
    # side (n even, ks odd) brings it back to 2H, centred like the 'same' conv.
    pad = (n - 1 - ks) // 2 + 1
    if pad < 0:  # a conv wider than the FIR filter: crop instead of padding
        h = h[..., -pad:pad, -pad:pad]
    h = _fir_filter(h, kernel, 4.0, padding=max(pad, 0))
    return h if bias is None else h + bias.view(1, -1, 1, 1)


def ddpm_sinusoidal_embedding(s: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """DDPM's sinusoidal embedding ``[sin(s w_j), cos(s w_j)]``, ``s [B] -> [B, dim]`` (Ho et al. 2020).

    ``w_j = max_period^(-j / (h - 1))``, ``h = dim // 2`` (zero-padded when dim is odd). DDPM's
    ``h - 1`` differs from the ``h`` of :class:`SinusoidalEmbedding`; DDPM++ keeps it to match
    the published models.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / (half - 1) * torch.arange(half, dtype=s.dtype, device=s.device))
    arg = s[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels, ``[B, C, H, W] -> [B, C, H, W]``, residual.

    ``q, k, v`` are 1x1 convs of ``GroupNorm(x)``; ``out = x + W_o softmax(q^T k / sqrt(C)) v``
    (divided by sqrt(2) with ``skip_rescale``), computed by
    :func:`~minisgm.models.embeddings.dot_product_attention`.
    """

    def __init__(self, ch: int, skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        self.norm = _group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        # Initialise q, k, v like three separate C x C layers (DDPM's NIN, scale 0.1).
        for w in self.qkv.weight.data.chunk(3, dim=0):
            _variance_scaling_(w, 0.1)
        nn.init.zeros_(self.qkv.bias)
        self.proj = _conv(ch, ch, 1, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2)  # [B, HW, 3C]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # [B, 1 head, HW, C] each
        a = dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = self.proj(a.squeeze(1).transpose(1, 2).reshape(B, C, H, W))
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


class ResnetBlockBigGAN(nn.Module):
    """BigGAN residual block with time conditioning (Brock et al. 2019; Song et al. 2021, app. H).

    ``h = Conv(up/down(SiLU(GN(x)))) + Dense(SiLU(temb))``, ``h = Conv(Dropout(SiLU(GN(h))))``,
    ``out = (skip(up/down(x)) + h) / sqrt(2)``; ``skip`` is a 1x1 conv when the shape changes.
    Shapes: ``x [B, in_ch, H, W], temb [B, temb_dim] -> [B, out_ch, H', W']``.
    """

    def __init__(self, in_ch: int, out_ch: Optional[int], temb_dim: int, dropout: float = 0.1,
                 skip_rescale: bool = True, init_scale: float = 0.0, up: bool = False, down: bool = False,
                 fir: bool = False, fir_kernel: Sequence[int] = (1, 3, 3, 1), conv_size: int = 3):
        super().__init__()
        if up and down:
            raise ValueError("a block cannot both upsample and downsample")
        out_ch = in_ch if out_ch is None else out_ch
        self.up, self.down, self.fir, self.skip_rescale = up, down, fir, skip_rescale
        self.norm0 = _group_norm(in_ch)
        self.conv0 = _conv(in_ch, out_ch, conv_size)
        self.temb_proj = _linear(temb_dim, out_ch)
        self.norm1 = _group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _conv(out_ch, out_ch, conv_size, init_scale=init_scale)
        self.skip = _conv(in_ch, out_ch, 1) if (in_ch != out_ch or up or down) else None
        self.register_buffer("kernel", fir_kernel_2d(fir_kernel).float(), persistent=False)

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return fir_upsample_2d(x, self.kernel) if self.fir else F.interpolate(
                x, scale_factor=2.0, mode="nearest")
        if self.down:
            return fir_downsample_2d(x, self.kernel) if self.fir else F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = F.silu(self.norm0(x))
        h, x = self._resample(h), self._resample(x)
        h = self.conv0(h) + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


class ResnetBlockDDPM(nn.Module):
    """DDPM residual block (Ho et al. 2020) with optional sqrt(2) skip rescaling.

    As :class:`ResnetBlockBigGAN` without resampling; a channel change uses a 1x1 conv shortcut.
    """

    def __init__(self, in_ch: int, out_ch: Optional[int], temb_dim: int, dropout: float = 0.1,
                 skip_rescale: bool = True, init_scale: float = 0.0, conv_size: int = 3):
        super().__init__()
        out_ch = in_ch if out_ch is None else out_ch
        self.skip_rescale = skip_rescale
        self.norm0 = _group_norm(in_ch)
        self.conv0 = _conv(in_ch, out_ch, conv_size)
        self.temb_proj = _linear(temb_dim, out_ch)
        self.norm1 = _group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _conv(out_ch, out_ch, conv_size, init_scale=init_scale)
        self.skip = _conv(in_ch, out_ch, 1, init_scale=0.1) if in_ch != out_ch else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x))) + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


class _Combine(nn.Module):
    """"input_skip": project the image pyramid with a 1x1 conv and add or concatenate it."""

    def __init__(self, pyramid_ch: int, ch: int, method: str):
        super().__init__()
        self.conv = _conv(pyramid_ch, ch, 1)
        self.method = method

    def forward(self, pyramid: Tensor, h: Tensor) -> Tensor:
        p = self.conv(pyramid)
        return torch.cat([p, h], dim=1) if self.method == "cat" else p + h


class _Level(nn.Module):
    """The modules of one resolution of the U-Net (a plain container, run by NCSNpp)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.resample: Optional[nn.Module] = None
        self.pyramid: Optional[nn.Module] = None
        self.pyramid_norm: Optional[nn.Module] = None
        self.pyramid_conv: Optional[nn.Module] = None


# ----- The network ----------------------------------------------------------------------------
MarginalStd = Union[Callable[[Tensor], Tensor], Any]


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ score network ``score(x, t)`` (Song et al. 2021, section 4.4, app. H).

    The raw U-Net ``F(x, c)`` (:meth:`network`; ``c = log sigma_t`` for "fourier", ``999 t`` for
    "positional") gives ``score = F / sigma_t`` with ``scale_by_sigma`` (NCSN++), else
    ``-F / sigma_t`` (DDPM++: F predicts the noise z).

    ``marginal_std``: ``t [B] -> sigma_t [B]``, or an SDE of :mod:`minisgm.sde` (its
    ``marginal_coeffs(t)[1]``); only :meth:`forward` needs it, not :meth:`network`.
    """

    def __init__(self, config: NCSNppConfig, marginal_std: Optional[MarginalStd] = None):
        super().__init__()
        if not isinstance(config, NCSNppConfig):
            raise TypeError(f"config must be an NCSNppConfig, got {type(config).__name__}")
        _validate_config(config)  # the dataclass may have been mutated after construction
        if marginal_std is not None and hasattr(marginal_std, "marginal_coeffs"):
            sde = marginal_std
            marginal_std = lambda t: sde.marginal_coeffs(t)[1]  # noqa: E731
        if marginal_std is not None and not callable(marginal_std):
            raise TypeError("marginal_std must be a callable t -> std or an SDE with marginal_coeffs")
        self.config = config
        self.marginal_std = marginal_std
        c = config
        nf = c.nf
        self.temb_dim = 4 * nf

        # Noise-level embedding, then a 2-layer MLP (shared by all blocks).
        fourier = c.embedding_type == "fourier"
        self.fourier = GaussianFourierProjection(2 * nf, c.fourier_scale) if fourier else None
        embed_dim = 2 * nf if fourier else nf
        self.temb_mlp = nn.Sequential(_linear(embed_dim, self.temb_dim), nn.SiLU(),
                                      _linear(self.temb_dim, self.temb_dim))
        self.class_embed = nn.Embedding(c.num_classes, self.temb_dim) if c.num_classes else None
        skip_channels = self._build_down()
        in_ch = skip_channels[-1]
        self.mid_block1 = self._resblock(in_ch)
        self.mid_attn = self._attention(in_ch)
        self.mid_block2 = self._resblock(in_ch)
        in_ch = self._build_up(skip_channels, in_ch)
        if c.progressive == "output_skip":
            self.pyramid_up = Resample("up", c.num_channels, fir=c.fir, fir_kernel=c.fir_kernel)
            self.norm_out, self.conv_out = None, None
        else:
            self.norm_out = _group_norm(in_ch)
            self.conv_out = _conv(in_ch, c.num_channels, c.conv_size, init_scale=c.init_scale)

    def _resblock(self, in_ch: int, out_ch: Optional[int] = None, up: bool = False, down: bool = False) -> nn.Module:
        c = self.config
        if c.resblock_type == "ddpm":
            return ResnetBlockDDPM(in_ch, out_ch, self.temb_dim, c.dropout, c.skip_rescale, c.init_scale, c.conv_size)
        return ResnetBlockBigGAN(in_ch, out_ch, self.temb_dim, c.dropout, c.skip_rescale, c.init_scale, up=up,
                                 down=down, fir=c.fir, fir_kernel=c.fir_kernel, conv_size=c.conv_size)

    def _attention(self, ch: int) -> nn.Module:
        return AttentionBlock(ch, self.config.skip_rescale, self.config.init_scale)

    def _resample(self, mode: str, in_ch: int, out_ch: Optional[int] = None) -> nn.Module:
        """Resampling of the "ddpm" blocks, or of a pyramid (``out_ch`` given: with a conv)."""
        c = self.config
        with_conv = c.resamp_with_conv if out_ch is None else True
        return Resample(mode, in_ch, out_ch, with_conv=with_conv, fir=c.fir, fir_kernel=c.fir_kernel,
                        conv_size=c.conv_size)

    def _build_down(self) -> list:
        """The down path; returns the channels of every tensor it pushes on the skip stack."""
        c, nf = self.config, self.config.nf
        self.conv_in = _conv(c.num_channels, nf, c.conv_size)
        skip_channels = [nf]
        in_ch, pyramid_ch, n_levels = nf, c.num_channels, len(c.ch_mult)
        self.down = nn.ModuleList()
        for i in range(n_levels):
            level = _Level()
            for _ in range(c.num_res_blocks):
                out_ch = nf * c.ch_mult[i]
                level.blocks.append(self._resblock(in_ch, out_ch))
                in_ch = out_ch
                if c.resolutions[i] in c.attn_resolutions:
                    level.attn.append(self._attention(in_ch))
                skip_channels.append(in_ch)
            if i != n_levels - 1:
                level.resample = self._resample("down", in_ch) if c.resblock_type == "ddpm" else self._resblock(in_ch, down=True)
                if c.progressive_input == "input_skip":
                    level.pyramid = _Combine(pyramid_ch, in_ch, c.progressive_combine)
                    if c.progressive_combine == "cat":
                        in_ch *= 2
                elif c.progressive_input == "residual":
                    level.pyramid = self._resample("down", pyramid_ch, in_ch)
                    pyramid_ch = in_ch
                skip_channels.append(in_ch)
            self.down.append(level)
        if c.progressive_input == "input_skip":
            self.pyramid_down = Resample("down", c.num_channels, fir=c.fir, fir_kernel=c.fir_kernel)
        return skip_channels

    def _build_up(self, skip_channels: list, in_ch: int) -> int:
        """The up path (lowest resolution first), consuming the skip stack; returns its channels."""
        c, nf = self.config, self.config.nf
        n_levels = len(c.ch_mult)
        self.up = nn.ModuleList()
        pyramid_ch = 0
        for i in reversed(range(n_levels)):
            level = _Level()
            for _ in range(c.num_res_blocks + 1):
                out_ch = nf * c.ch_mult[i]
                level.blocks.append(self._resblock(in_ch + skip_channels.pop(), out_ch))
                in_ch = out_ch
            if c.resolutions[i] in c.attn_resolutions:
                level.attn.append(self._attention(in_ch))
            if c.progressive == "output_skip":
                level.pyramid_norm = _group_norm(in_ch)
                level.pyramid_conv = _conv(in_ch, c.num_channels, c.conv_size, init_scale=c.init_scale)
            elif c.progressive == "residual" and i == n_levels - 1:  # the first (coarsest) level
                level.pyramid_norm = _group_norm(in_ch)
                level.pyramid_conv = _conv(in_ch, in_ch, c.conv_size)
                pyramid_ch = in_ch
            elif c.progressive == "residual":
                level.pyramid = self._resample("up", pyramid_ch, in_ch)
                pyramid_ch = in_ch
            if i != 0:
                level.resample = self._resample("up", in_ch) if c.resblock_type == "ddpm" else self._resblock(in_ch, up=True)
            self.up.append(level)
        assert not skip_channels
        return in_ch

    def noise_label(self, t: Tensor, std: Tensor) -> Tensor:
        """The scalar the network is conditioned on: log s(t) (fourier) or 999 t (positional)."""
        return torch.log(std) if self.config.embedding_type == "fourier" else 999.0 * t

    def network(self, x: Tensor, c_noise: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        """The raw U-Net output ``F(x, c_noise)`` like ``x``; ``c_noise [B]`` from :meth:`noise_label`."""
        c = self.config
        self._check_inputs(x, class_labels)
        if c_noise.shape != (x.shape[0],):
            raise ValueError(f"c_noise must have shape [B]=[{x.shape[0]}], got {list(c_noise.shape)}")

        emb = self.fourier(c_noise) if self.fourier is not None else ddpm_sinusoidal_embedding(c_noise, c.nf)
        temb = self.temb_mlp(emb.to(x.dtype))
        if self.class_embed is not None:
            temb = temb + self.class_embed(class_labels)

        if not c.centered:
            x = 2 * x - 1.0  # data in [0, 1] -> [-1, 1]

        pyramid = x if c.progressive_input != "none" else None
        hs = [self.conv_in(x)]
        for level in self.down:
            for j, block in enumerate(level.blocks):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if level.resample is not None:
                h = level.resample(hs[-1], temb)
                if c.progressive_input == "input_skip":
                    pyramid = self.pyramid_down(pyramid)
                    h = level.pyramid(pyramid, h)
                elif c.progressive_input == "residual":
                    pyramid = level.pyramid(pyramid)
                    pyramid = (pyramid + h) / _SQRT2 if c.skip_rescale else pyramid + h
                    h = pyramid
                hs.append(h)

        h = self.mid_block2(self.mid_attn(self.mid_block1(hs[-1], temb)), temb)

        out_pyramid = None
        for k, level in enumerate(self.up):
            for block in level.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
            if len(level.attn):
                h = level.attn[0](h)
            if c.progressive == "output_skip":
                p = level.pyramid_conv(F.silu(level.pyramid_norm(h)))
                out_pyramid = p if out_pyramid is None else self.pyramid_up(out_pyramid) + p
            elif c.progressive == "residual":
                if k == 0:
                    out_pyramid = level.pyramid_conv(F.silu(level.pyramid_norm(h)))
                else:
                    out_pyramid = level.pyramid(out_pyramid)
                    out_pyramid = (out_pyramid + h) / _SQRT2 if c.skip_rescale else out_pyramid + h
                    h = out_pyramid
            if level.resample is not None:
                h = level.resample(h, temb)

        if c.progressive == "output_skip":
            return out_pyramid
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, x: Tensor, t: Union[Tensor, float], class_labels: Optional[Tensor] = None) -> Tensor:
        """The score ``grad_x log p_t(x)`` (Song et al. 2021, eq. 7), shaped and typed like ``x``.

        ``t``: ``[B]`` times in [0, 1] (a scalar is broadcast) with s(t) > 0; ``class_labels``:
        ``[B]`` long, required iff ``config.num_classes`` is set.
        """
        if self.marginal_std is None:
            raise ValueError(
                "NCSNpp.forward needs the marginal std s(t): build the model as "
                "NCSNpp(config, marginal_std=sde) (or a callable t -> s(t)), or call "
                "model.network(x, c_noise) for the raw output"
            )
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        t = batch_time(t, x)
        std = check_marginal_std(self.marginal_std(t), x.shape[0])
        out = self.network(x, self.noise_label(t, std), class_labels).to(x.dtype)
        std = std.to(x.dtype).view(-1, 1, 1, 1)
        return out / std if self.config.scale_by_sigma else -out / std

    def _check_inputs(self, x: Tensor, class_labels: Optional[Tensor]) -> None:
        c = self.config
        expected = (c.num_channels, c.image_size, c.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                             f"got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if self.class_embed is None:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional model (num_classes=None)")
            return
        if class_labels is None:
            raise ValueError(f"this model is class-conditional (num_classes={c.num_classes}): "
                             f"pass class_labels [B]")
        if class_labels.shape != (x.shape[0],) or class_labels.dtype != torch.long:
            raise ValueError(f"class_labels must be a long tensor of shape [{x.shape[0]}], got "
                             f"{class_labels.dtype} {list(class_labels.shape)}")
        check_values(lambda: ((class_labels >= 0) & (class_labels < c.num_classes)).all(),
                     lambda: f"class_labels must lie in [0, {c.num_classes - 1}], got "
                     f"[{int(class_labels.min())}, {int(class_labels.max())}]")
