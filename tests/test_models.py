"""Tests of the score networks, embeddings and noise-conditional classifiers (minisgm.models).

Parameter counts and CPU timings (forward + backward, batch 128 of 8x8 digits, one thread,
measured on the project's 2-core machine while ~8 other jobs ran; expect 2-3x faster idle):

    SmallUNet()                           431,585 params   ~0.45 s
    SmallUNet(attention=False)            414,817 params   ~0.33 s
    SmallUNet(num_classes=10)             432,993 params   ~0.45 s
    SmallUNet(channel_mults=(1, 2, 2))    715,425 params   ~0.45 s
    ScoreMLP(2)                            91,522 params
    TimeConditionedClassifier((1, 8, 8), 10)  149,546 params
    TimeConditionedClassifier(2, 8)            92,296 params

Only sanity ranges of the counts are asserted.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minisgm.models import (
    MLP,
    GaussianFourierProjection,
    ScoreMLP,
    SinusoidalEmbedding,
    SmallUNet,
    TimeConditionedClassifier,
)
from minisgm.models.unet import AttentionBlock
from minisgm.sde import VESDE, VPSDE

DTYPES = [torch.float32, torch.float64]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----- embeddings ---------------------------------------------------------------------------
def test_sinusoidal_known_values():
    emb = SinusoidalEmbedding(4, max_positions=10000)
    c = torch.tensor([0.0, 1.0, -2.5], dtype=torch.float64)
    out = emb(c)
    w = torch.tensor([1.0, 10000 ** -0.5], dtype=torch.float64)  # w_i = 10000^(-i / half)
    expected = torch.cat([torch.sin(c[:, None] * w), torch.cos(c[:, None] * w)], dim=1)
    assert torch.allclose(out, expected, atol=1e-15)
    assert torch.equal(out[0], torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    assert out.dtype == torch.float64 and emb(c.float()).dtype == torch.float32
    assert len(list(emb.parameters())) == 0 and "freqs" not in emb.state_dict()


def test_sinusoidal_inner_product_depends_only_on_difference():
    emb = SinusoidalEmbedding(64)
    a = torch.tensor([3.0, 100.0, 512.0], dtype=torch.float64)
    b = torch.tensor([7.0, 90.0, 0.0], dtype=torch.float64)
    ea, eb = emb(a), emb(b)
    dot = (ea * eb).sum(1)
    # sin x sin y + cos x cos y = cos(x - y)
    assert torch.allclose(dot, torch.cos((a - b)[:, None] * emb.freqs).sum(1), atol=1e-12)
    shift = torch.tensor(41.0, dtype=torch.float64)
    assert torch.allclose((emb(a + shift) * emb(b + shift)).sum(1), dot, atol=1e-10)
    assert torch.allclose(ea.pow(2).sum(1), torch.full((3,), 32.0, dtype=torch.float64))
    # Different positions get distinguishable codes; identical ones coincide.
    assert (dot < 32 - 1e-3).all()


def test_fourier_features_unit_pairs_and_scale():
    g = torch.Generator().manual_seed(0)
    proj = GaussianFourierProjection(4096, scale=16.0, generator=g)
    c = torch.linspace(-5, 5, 7, dtype=torch.float64)
    out = proj.double()(c)
    assert out.shape == (7, 4096) and out.dtype == torch.float64
    sin, cos = out[:, :2048], out[:, 2048:]
    assert torch.allclose(sin**2 + cos**2, torch.ones_like(sin), atol=1e-12)
    assert torch.allclose(out[3], torch.cat([torch.zeros(2048), torch.ones(2048)]).double())  # c = 0
    assert torch.allclose(sin, torch.sin(2 * math.pi * c[:, None] * proj.W), atol=1e-12)
    assert abs(proj.W.std().item() / 16.0 - 1) < 0.05  # W ~ N(0, scale^2)
    # W is a fixed buffer: saved with the model, not trained, reproducible from the generator.
    assert "W" in proj.state_dict() and len(list(proj.parameters())) == 0
    again = GaussianFourierProjection(4096, scale=16.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.W.double(), proj.W)


@pytest.mark.parametrize("cls", [SinusoidalEmbedding, GaussianFourierProjection])
def test_embedding_bad_input(cls):
    with pytest.raises(ValueError, match="even"):
        cls(7)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        cls(8)(torch.zeros(2, 1))
    with pytest.raises(TypeError):
        cls(8)([0.0, 1.0])


# ----- MLPs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("embedding", ["fourier", "sinusoidal"])
def test_score_mlp_shapes(dtype, embedding):
    torch.manual_seed(0)
    model = ScoreMLP(3, hidden=32, n_layers=3, embed_dim=16, embedding=embedding).to(dtype)
    x = torch.randn(5, 3, dtype=dtype)
    t = torch.rand(5, dtype=dtype)
    out = model(x, t)
    assert out.shape == (5, 3) and out.dtype == dtype and torch.isfinite(out).all()
    # A scalar time is broadcast to the batch.
    assert torch.allclose(model(x, 0.3), model(x, torch.full((5,), 0.3, dtype=dtype)))
    # The output depends on t (the embedding is wired in).
    assert not torch.allclose(model(x, 0.1), model(x, 0.9))


def test_score_mlp_rows_are_independent():
    torch.manual_seed(0)
    model = ScoreMLP(2, hidden=32, embed_dim=16).double()
    x, t = torch.randn(6, 2, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    full = model(x, t)
    for i in range(6):
        assert torch.allclose(full[i], model(x[i : i + 1], t[i : i + 1])[0], atol=1e-12)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_marginal_std_is_exact_division(sde):
    torch.manual_seed(0)
    marginal_std = lambda t: sde.marginal_coeffs(t)[1]  # noqa: E731
    plain = ScoreMLP(2, hidden=32, embed_dim=16).double()
    scaled = ScoreMLP(2, hidden=32, embed_dim=16, marginal_std=marginal_std).double()
    scaled.load_state_dict(plain.state_dict())  # the callable is not part of the state
    x = torch.randn(8, 2, dtype=torch.float64)
    t = torch.linspace(0.01, 1.0, 8, dtype=torch.float64)
    std = sde.marginal_coeffs(t)[1]
    assert torch.equal(scaled(x, t), plain(x, t) / std[:, None])


def test_noise_level_conditioning(debug_mode):
    torch.manual_seed(0)
    sigmas = torch.tensor([0.01, 0.1, 1.0, 10.0], dtype=torch.float64)
    model = ScoreMLP(2, hidden=32, embed_dim=16, cond="sigma", marginal_std=lambda s: s).double()
    plain = ScoreMLP(2, hidden=32, embed_dim=16, cond="sigma").double()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 2, dtype=torch.float64)
    assert torch.equal(model(x, sigmas), plain(x, sigmas) / sigmas[:, None])
    # cond="sigma" embeds log sigma: the same features as cond="t" fed with log sigma.
    as_t = ScoreMLP(2, hidden=32, embed_dim=16, cond="t").double()
    as_t.load_state_dict(plain.state_dict())
    assert torch.allclose(plain(x, sigmas), as_t(x, sigmas.log()), atol=1e-12)
    with pytest.raises(ValueError, match="sigma must be positive"):
        model(x, torch.tensor([0.1, 0.0, 1.0, 2.0], dtype=torch.float64))


def test_marginal_std_bad_output(debug_mode):
    model = ScoreMLP(2, hidden=8, embed_dim=8, marginal_std=lambda t: t)
    with pytest.raises(ValueError, match="positive"):
        model(torch.randn(3, 2), torch.tensor([0.0, 0.5, 1.0]))
    model = ScoreMLP(2, hidden=8, embed_dim=8, marginal_std=lambda t: t[:1])
    with pytest.raises(ValueError, match=r"\[B\]=\[3\]"):
        model(torch.randn(3, 2), torch.rand(3))


def test_score_mlp_class_conditioning(debug_mode):
    torch.manual_seed(0)
    model = ScoreMLP(2, hidden=32, embed_dim=16, num_classes=3).double()
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    y0, y1 = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    assert not torch.allclose(model(x, t, y0), model(x, t, y1))
    null = torch.full((4,), 3, dtype=torch.long)
    assert torch.equal(model(x, t), model(x, t, null))
    with pytest.raises(ValueError, match="0..3"):
        model(x, t, torch.full((4,), 4))
    with pytest.raises(ValueError, match="num_classes=None"):
        ScoreMLP(2, hidden=8, embed_dim=8)(x.float(), t.float(), y0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=0), "dim"),
        (dict(dim=2, n_layers=0), "n_layers"),
        (dict(dim=2, embedding="learned"), "embedding"),
        (dict(dim=2, cond="time"), "cond"),
        (dict(dim=2, embed_dim=9), "even"),
        (dict(dim=2, num_classes=0), "num_classes"),
    ],
)
def test_score_mlp_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScoreMLP(**kwargs)


def test_score_mlp_bad_input():
    model = ScoreMLP(2, hidden=8, embed_dim=8)
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        model(torch.randn(3, 3), torch.rand(3))
    with pytest.raises(ValueError, match=r"\[B\]=\[3\]"):
        model(torch.randn(3, 2), torch.rand(4))
    with pytest.raises(TypeError, match="callable"):
        ScoreMLP(2, marginal_std=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_score_and_energy(dtype):
    torch.manual_seed(0)
    score = MLP(3, hidden=16, n_layers=2).to(dtype)
    x = torch.randn(4, 3, dtype=dtype)
    assert score(x).shape == (4, 3) and score(x).dtype == dtype
    energy = MLP(2, hidden=16, n_layers=2, out_dim=1).to(dtype)
    assert energy(x[:, :2]).shape == (4, 1)
    # SiLU keeps second derivatives alive (a ReLU energy would have a zero Hessian a.e.),
    # which ISM on an energy model and Langevin on -grad E rely on.
    hess = torch.autograd.functional.hessian(lambda v: energy(v[None])[0, 0], x[0, :2])
    assert hess.abs().max() > 1e-4
    assert torch.allclose(hess, hess.T, atol=1e-6 if dtype == torch.float32 else 1e-12)
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        score(torch.randn(4, 2, dtype=dtype))


# ----- U-Net --------------------------------------------------------------------------------
def test_unet_default_size():
    """Default SmallUNet(): 431,585 parameters; asserted only to lie in the intended range."""
    n = n_params(SmallUNet())
    print("SmallUNet() parameters:", n)
    assert 100_000 <= n <= 500_000


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kwargs, hw",
    [
        (dict(base_channels=8, embed_dim=16), 8),
        (dict(base_channels=8, embed_dim=16, channel_mults=(1, 2, 2), num_res_blocks=2), 8),
        (dict(base_channels=8, embed_dim=16, in_channels=3, attention=False, embedding="fourier"), 16),
    ],
)
def test_unet_shapes(dtype, kwargs, hw):
    torch.manual_seed(0)
    model = SmallUNet(**kwargs).to(dtype)
    c = kwargs.get("in_channels", 1)
    x = torch.randn(3, c, hw, hw, dtype=dtype)
    out = model(x, torch.rand(3, dtype=dtype))
    assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert not torch.allclose(model(x, 0.1), model(x, 0.9))


def test_unet_rows_are_independent():
    # GroupNorm and attention act within one image: no information may leak across the batch.
    torch.manual_seed(0)
    model = SmallUNet(base_channels=8, embed_dim=16).double().eval()
    x, t = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    full = model(x, t)
    for i in range(4):
        assert torch.allclose(full[i], model(x[i : i + 1], t[i : i + 1])[0], atol=1e-12)


def test_unet_marginal_std_and_classes(debug_mode):
    torch.manual_seed(0)
    sde = VPSDE()
    marginal_std = lambda t: sde.marginal_coeffs(t)[1]  # noqa: E731
    plain = SmallUNet(base_channels=8, embed_dim=16, num_classes=10).double()
    scaled = SmallUNet(base_channels=8, embed_dim=16, num_classes=10, marginal_std=marginal_std).double()
    scaled.load_state_dict(plain.state_dict())
    x, t = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.rand(4, dtype=torch.float64) * 0.9 + 0.1
    y = torch.tensor([0, 3, 9, 10])
    std = sde.marginal_coeffs(t)[1]
    assert torch.equal(scaled(x, t, y), plain(x, t, y) / std[:, None, None, None])
    # Labels change the output; y=None is the null class 10.
    assert not torch.allclose(plain(x, t, y), plain(x, t, torch.zeros(4, dtype=torch.long)))
    assert torch.equal(plain(x, t), plain(x, t, torch.full((4,), 10)))
    with pytest.raises(ValueError, match="0..10"):
        plain(x, t, torch.tensor([0, 1, 2, 11]))
    with pytest.raises(TypeError, match="integer"):
        plain(x, t, torch.zeros(4))
    with pytest.raises(ValueError, match="num_classes=None"):
        SmallUNet(base_channels=8, embed_dim=16)(x.float(), t.float(), y)


def test_unet_bad_input():
    model = SmallUNet(base_channels=8, embed_dim=16, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(2, 1, 6, 6), torch.rand(2))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        model(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match="channel_mults"):
        SmallUNet(channel_mults=())
    with pytest.raises(ValueError, match="dropout"):
        SmallUNet(dropout=1.0)


def test_attention_block_matches_explicit_softmax():
    torch.manual_seed(0)
    block = AttentionBlock(16, num_heads=2).double()
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    B, C, H, W = x.shape
    q, k, v = block.qkv(block.norm(x)).reshape(B, 3, 2, C // 2, H * W).unbind(1)  # [B, heads, d, N]
    weights = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(C // 2), dim=-1)  # [B, heads, N, N]
    out = (weights @ v.transpose(-1, -2)).transpose(-1, -2).reshape(B, C, H, W)
    assert torch.allclose(block(x), x + block.proj(out), atol=1e-12)
    # Attention is equivariant to permuting pixels (no positional information of its own).
    perm = torch.randperm(H * W)
    xp = x.reshape(B, C, -1)[..., perm].reshape(B, C, H, W)
    assert torch.allclose(block(xp).reshape(B, C, -1), block(x).reshape(B, C, -1)[..., perm], atol=1e-12)


def test_half_precision_attention_runs_on_any_cpu_in_float32():
    # PyTorch 2.13's CPU bf16 attention kernel needs AVX-512: with the generic or AVX2 kernels
    # (make test's second pass, an AVX2 CPU) it raises. dot_product_attention computes CPU
    # half-precision attention in float32, under autocast as with bf16 tensors.
    from minisgm.models.embeddings import dot_product_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, 64, 16, generator=g) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = dot_product_attention(qb, kb, vb)
    exact = torch.softmax(qb.float() @ kb.float().transpose(-1, -2) / 4.0, dim=-1) @ vb.float()
    assert out.dtype == torch.bfloat16  # computed in float32, rounded once to bf16:
    assert torch.allclose(out.float(), exact, rtol=2**-8, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dot_product_attention(q, k, v)
    assert torch.allclose(out.float(), ref, atol=1e-6)  # float32 inputs stay float32 inside
    block = AttentionBlock(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(torch.randn(2, 16, 8, 8, generator=g))
    assert y.shape == (2, 16, 8, 8) and torch.isfinite(y).all()


# ----- classifiers --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_shape", [2, (1, 8, 8)], ids=["mlp", "conv"])
def test_classifier(dtype, in_shape):
    torch.manual_seed(0)
    clf = TimeConditionedClassifier(in_shape, num_classes=5, hidden=16, base_channels=8, embed_dim=16).to(dtype)
    shape = (in_shape,) if isinstance(in_shape, int) else in_shape
    x = torch.randn(4, *shape, dtype=dtype)
    t = torch.rand(4, dtype=dtype)
    logits = clf(x, t)
    assert logits.shape == (4, 5) and logits.dtype == dtype
    assert not torch.allclose(clf(x, 0.1), clf(x, 0.9))
    # Guidance needs grad_x log p(y | x, t): it exists and has x's shape.
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.log_softmax(clf(xg, t), dim=1)[:, 2].sum(), xg)
    assert g.shape == x.shape and g.abs().sum() > 0
    clf.eval()
    assert torch.allclose(clf(x, t)[1], clf(x[1:2], t[1:2])[0], atol=1e-5 if dtype == torch.float32 else 1e-12)
    with pytest.raises(ValueError, match="shape"):
        clf(torch.randn(4, 3, dtype=dtype), t)


def test_classifier_bad_config():
    with pytest.raises(ValueError, match="in_shape"):
        TimeConditionedClassifier((1, 8), 3)
    with pytest.raises(ValueError, match="num_classes"):
        TimeConditionedClassifier(2, 1)
    with pytest.raises(ValueError, match="even"):
        TimeConditionedClassifier((1, 7, 7), 3)


# ----- training signal ----------------------------------------------------------------------
def _dsm_loss_fixed_noise(model, sde, x, seed: int = 0):
    """Continuous-time DSM with a fixed draw of (t, z), so the loss is a function of theta only."""
    from minisgm.score_matching import sde_loss

    return sde_loss(model, sde, x, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "make_model, x",
    [
        (lambda sde: ScoreMLP(2, hidden=64, embed_dim=32, marginal_std=lambda t: sde.marginal_coeffs(t)[1]),
         torch.randn(64, 2, generator=torch.Generator().manual_seed(1))),
        (lambda sde: SmallUNet(base_channels=16, embed_dim=32, marginal_std=lambda t: sde.marginal_coeffs(t)[1]),
         torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1),
    ],
    ids=["ScoreMLP", "SmallUNet"],
)
def test_dsm_steps_decrease_loss(make_model, x):
    torch.manual_seed(0)
    sde = VPSDE()
    model = make_model(sde)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with torch.no_grad():
        start = _dsm_loss_fixed_noise(model, sde, x).item()
    for _ in range(15):
        opt.zero_grad()
        _dsm_loss_fixed_noise(model, sde, x).backward()
        opt.step()
    with torch.no_grad():
        end = _dsm_loss_fixed_noise(model, sde, x).item()
        fresh = _dsm_loss_fixed_noise(model, sde, x, seed=123).item()
    assert end < 0.8 * start, (start, end)
    # The trivial predictor (zero noise estimate) scores 1/2 E|z|^2 = d / 2 per sample.
    assert fresh < 0.5 * x[0].numel()


@pytest.mark.slow
def test_score_mlp_learns_eight_gaussians_score():
    """A trained ScoreMLP approaches the exact score of the noised eight-Gaussians mixture."""
    from minisgm.data import eight_gaussians_mixture, exact_score_fn

    torch.manual_seed(0)
    sde = VPSDE()
    gmm = eight_gaussians_mixture()
    model = ScoreMLP(2, hidden=128, marginal_std=lambda t: sde.marginal_coeffs(t)[1])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    from minisgm.score_matching import sde_loss

    for _ in range(3000):
        x = gmm.sample(512, generator=g)
        opt.zero_grad()
        sde_loss(model, sde, x, generator=g).backward()
        opt.step()
    exact = exact_score_fn(gmm, sde)
    t = torch.full((4000,), 0.3)
    x0 = gmm.sample(4000, generator=g)
    xt, _, std = sde.perturb(x0, t, generator=g)
    with torch.no_grad():
        err = ((model(xt, t) - exact(xt, t)) * std[:, None]).pow(2).sum(1).mean()
        ref = (exact(xt, t) * std[:, None]).pow(2).sum(1).mean()
    assert err < 0.05 * ref, (err.item(), ref.item())
