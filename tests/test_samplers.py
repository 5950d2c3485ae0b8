"""Samplers checked against an exact oracle: a 2-D Gaussian mixture whose noised scores are known."""

import functools
import math

import pytest
import torch

from minisgm import samplers as S
from minisgm.data import GaussianMixture, exact_score_fn
from minisgm.metrics import energy_distance
from minisgm.sde import SubVPSDE, VESDE, VPSDE

F64 = torch.float64
N_SAMPLES = 2000


def gmm():
    # Modes well inside the VP prior's range, unequal weights and widths.
    return GaussianMixture([[-1.0, 0.5], [1.0, 0.5], [0.0, -1.0]], [0.25, 0.25, 0.3], [0.3, 0.3, 0.4])


SDES = {"VE": VESDE, "VP": VPSDE, "subVP": SubVPSDE}


@pytest.fixture(scope="module")
def reference():
    """True samples and the sample-vs-sample floor of the energy distance."""
    g = torch.Generator().manual_seed(1234)
    y = gmm().sample(N_SAMPLES, g, dtype=F64)
    # The floor is measured exactly as the test statistic: fresh true samples against the same y.
    floors = [float(energy_distance(gmm().sample(N_SAMPLES, g, dtype=F64), y)) for _ in range(5)]
    return y, sum(floors) / len(floors)


def _corrector_only(score_fn, sde, shape, n_steps, **kw):
    return S.pc_sample(score_fn, sde, shape, n_steps, predictor=None, n_corrector_steps=5, **kw)


def _pc_ancestral(score_fn, sde, shape, n_steps, **kw):
    return S.pc_sample(score_fn, sde, shape, n_steps, predictor=S.ancestral_step, **kw)


def _ode(score_fn, sde, shape, n_steps, **kw):
    kw.pop("denoise", None)
    return S.ode_sample(score_fn, sde, shape, **kw)


SAMPLERS = {
    "euler_maruyama": (S.euler_maruyama_sample, 500),
    "reverse_diffusion": (S.reverse_diffusion_sample, 500),
    "ancestral": (S.ancestral_sample, 500),
    "pc": (S.pc_sample, 250),
    "pc_ancestral": (_pc_ancestral, 250),
    "ode_rk45": (_ode, None),
    "heun": (S.heun_sample, 50),
}


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_samples_match_mixture(reference, sde_name, sampler):
    # Under the null the ratio ED/floor spreads over about 0.5-2 (seed to seed), hence 3x.
    y, floor = reference
    sde = SDES[sde_name]()
    f, n_steps = SAMPLERS[sampler]
    x, nfe = f(exact_score_fn(gmm(), sde), sde, (N_SAMPLES, 2), n_steps, generator=torch.Generator().manual_seed(8), dtype=F64)
    assert x.shape == (N_SAMPLES, 2) and x.dtype == F64 and torch.isfinite(x).all()
    ed = float(energy_distance(x, y))
    assert ed < 3 * floor, f"{sampler}/{sde_name}: energy distance {ed:.2e} vs floor {floor:.2e}"


def test_corrector_only_is_annealed_langevin(reference):
    y, floor = reference
    sde = VPSDE()
    x, nfe = _corrector_only(exact_score_fn(gmm(), sde), sde, (N_SAMPLES, 2), 250, generator=torch.Generator().manual_seed(7), dtype=F64)
    assert nfe == 250 * 5
    assert float(energy_distance(x, y)) < 3 * floor


def test_sampler_is_wrong_with_a_wrong_score(reference):
    # The quality test can fail: the score of a different mixture gives far-off samples.
    y, floor = reference
    sde = VPSDE()
    other = GaussianMixture([[-1.0, 0.5], [1.0, 0.5], [0.0, -1.0]], [0.25, 0.25, 0.3], [0.6, 0.3, 0.1])
    x, _ = S.reverse_diffusion_sample(exact_score_fn(other, sde), sde, (N_SAMPLES, 2), 200, generator=torch.Generator().manual_seed(7), dtype=F64)
    assert float(energy_distance(x, y)) > 5 * floor


# ----- steps against closed-form DDPM / SMLD formulas ----------------------------------------
def _state(B=16):
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, 2, generator=g, dtype=F64)


@pytest.mark.parametrize("t,dt", [(0.5, 1e-2), (0.9, 0.1), (0.01, 0.005)])
def test_ancestral_step_equals_ddpm_for_vp(t, dt):
    sde = VPSDE()
    score_fn = exact_score_fn(gmm(), sde)
    x = _state()
    tt = torch.full((x.shape[0],), t, dtype=F64)
    x_new, x_mean = S.ancestral_step(score_fn, sde, x, tt, dt, generator=torch.Generator().manual_seed(5))
    # DDPM (Ho et al. 2020, eq. 11 with the eps -> score substitution) for the same two times.
    abar_t = math.exp(2 * float(sde.log_mean_coeff(torch.tensor(t, dtype=F64))))
    abar_s = math.exp(2 * float(sde.log_mean_coeff(torch.tensor(t - dt, dtype=F64))))
    beta = 1 - abar_t / abar_s
    s = score_fn(x, tt)
    ddpm_mean = (x + beta * s) / math.sqrt(1 - beta)
    ddpm_std = math.sqrt(beta * (1 - abar_s) / (1 - abar_t))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    torch.testing.assert_close(x_mean, ddpm_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_new, ddpm_mean + ddpm_std * z, rtol=1e-12, atol=1e-12)


def test_ancestral_step_equals_smld_for_ve():
    sde = VESDE()
    score_fn = exact_score_fn(gmm(), sde)
    x, t, dt = _state() * 5, 0.7, 0.05
    x_new, x_mean = S.ancestral_step(score_fn, sde, x, t, dt, generator=torch.Generator().manual_seed(5))
    var_t = sde.sigma(torch.tensor(t, dtype=F64)) ** 2 - sde.sigma_min**2
    var_s = sde.sigma(torch.tensor(t - dt, dtype=F64)) ** 2 - sde.sigma_min**2
    smld_mean = x + (var_t - var_s) * score_fn(x, torch.full((16,), t, dtype=F64))  # Song et al. eq. 47
    smld_std = ((var_t - var_s) * var_s / var_t).sqrt()
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    torch.testing.assert_close(x_mean, smld_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_new, smld_mean + smld_std * z, rtol=1e-12, atol=1e-12)


def test_reverse_diffusion_step_is_ddpm_to_first_order():
    sde = VPSDE()
    score_fn = exact_score_fn(gmm(), sde)
    x, t = _state(), 0.5
    s = score_fn(x, torch.full((16,), t, dtype=F64))
    gaps = []
    for dt in (1e-2, 5e-3):
        _, x_mean = S.reverse_diffusion_step(score_fn, sde, x, t, dt)
        abar = lambda u: math.exp(2 * float(sde.log_mean_coeff(torch.tensor(u, dtype=F64))))  # noqa: E731
        beta = 1 - abar(t) / abar(t - dt)
        # exact form of eq. 45 for VP, and its distance to DDPM's ancestral mean: O(beta^2)
        torch.testing.assert_close(x_mean, (2 - math.sqrt(1 - beta)) * x + beta * s, rtol=1e-12, atol=1e-12)
        gaps.append(float((x_mean - (x + beta * s) / math.sqrt(1 - beta)).abs().max()) / beta**2)
    assert gaps[0] < 1.0 and abs(gaps[0] / gaps[1] - 1) < 0.1  # the gap scales as beta^2


def test_euler_maruyama_step_formula():
    sde = VESDE()
    score_fn = exact_score_fn(gmm(), sde)
    x, t, dt = _state(), 0.3, 0.01
    tt = torch.full((16,), t, dtype=F64)
    x_new, x_mean = S.euler_maruyama_step(score_fn, sde, x, t, dt, generator=torch.Generator().manual_seed(5))
    g = sde.diffusion(tt)[:, None]
    torch.testing.assert_close(x_mean, x + g**2 * score_fn(x, tt) * dt)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    torch.testing.assert_close(x_new, x_mean + g * math.sqrt(dt) * z)


def test_langevin_corrector_snr():
    sde = VPSDE()
    score_fn = exact_score_fn(gmm(), sde)
    x, t, snr = _state(), 0.2, 0.1
    tt = torch.full((16,), t, dtype=F64)
    s = score_fn(x, tt)
    for per_sample in (False, True):
        x_new, x_mean = S.langevin_corrector_step(score_fn, sde, x, t, snr=snr, generator=torch.Generator().manual_seed(5), per_sample=per_sample)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
        step = (x_mean - x)[:, 0] / s[:, 0]
        if per_sample:
            torch.testing.assert_close(step, 2 * (snr * z.norm(dim=1) / s.norm(dim=1)) ** 2)
        else:
            torch.testing.assert_close(step, (2 * (snr * z.norm(dim=1).mean() / s.norm(dim=1).mean()) ** 2).expand(16))
        torch.testing.assert_close(x_new, x_mean + (2 * step)[:, None].sqrt() * z)


# ----- ODE samplers ------------------------------------------------------------------------
def test_heun_is_second_order():
    sde = VPSDE()
    score_fn = exact_score_fn(gmm(), sde)
    x_T = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref, _ = S.ode_sample(score_fn, sde, (200, 2), x_init=x_T, rtol=1e-9, atol=1e-9)
    errs = [float((S.heun_sample(score_fn, sde, (200, 2), n, x_init=x_T)[0] - ref).abs().max()) for n in (25, 50, 100)]
    assert errs[0] / errs[1] > 3 and errs[1] / errs[2] > 3, errs


@pytest.mark.parametrize("sde_name", ["VE", "VP", "subVP"])
def test_edm_time_grid_follows_karras_schedule(sde_name):
    sde = SDES[sde_name]()
    n, rho = 12, 7.0
    ts = S.edm_time_grid(sde, n, rho=rho, dtype=F64)
    assert ts.shape == (n + 1,) and ts[0] == sde.T and ts[-1] == sde.eps
    assert (ts[1:] < ts[:-1]).all()
    m, s = sde.marginal_coeffs(ts)
    sigma = s / m
    i = torch.arange(n + 1, dtype=F64) / n
    expected = (sigma[0] ** (1 / rho) + i * (sigma[-1] ** (1 / rho) - sigma[0] ** (1 / rho))) ** rho
    torch.testing.assert_close(sigma, expected, rtol=1e-9, atol=0)
    # rho = 1 is uniform in sigma
    m1, s1 = sde.marginal_coeffs(S.edm_time_grid(sde, n, rho=1.0, dtype=F64))
    steps = (s1 / m1).diff()
    torch.testing.assert_close(steps, steps.mean().expand(n), rtol=1e-7, atol=0)


def test_heun_on_the_edm_grid_beats_the_uniform_grid_for_ve():
    """At equal NFE the Karras grid puts steps where the VE ODE bends (small sigma)."""
    sde = VESDE()
    score_fn = exact_score_fn(gmm(), sde)
    x_T = sde.prior_sample((300, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    ref, _ = S.ode_sample(score_fn, sde, (300, 2), x_init=x_T, rtol=1e-9, atol=1e-9)
    for n in (5, 10, 20):
        uni, nfe_u = S.heun_sample(score_fn, sde, (300, 2), n, x_init=x_T)
        edm, nfe_e = S.heun_sample(score_fn, sde, (300, 2), n, x_init=x_T, ts=S.edm_time_grid(sde, n))
        assert nfe_u == nfe_e == 2 * n
        err_u = float((uni - ref).norm(dim=1).mean())
        err_e = float((edm - ref).norm(dim=1).mean())
        assert err_e < 0.8 * err_u, (n, err_e, err_u)


@pytest.mark.parametrize(
    "ts, match",
    [
        ([1.0, 0.5, 0.5, 1e-3], "decrease strictly"),
        ([1.0, 0.5, 1e-3], "n_steps \\+ 1 = 4"),
        ([1.5, 0.5, 0.1, 1e-3], "decrease strictly from at most T"),
        ([1.0, 0.5, 0.1, 1e-6], "to at least eps"),
    ],
)
def test_heun_rejects_bad_grids(ts, match):
    sde = VPSDE()
    with pytest.raises(ValueError, match=match):
        S.heun_sample(lambda x, t: -x, sde, (4, 2), 3, ts=ts)
    with pytest.raises(ValueError, match="rho must be a positive"):
        S.edm_time_grid(sde, 3, rho=0.0)


@pytest.mark.parametrize("sde_name", ["VE", "VP"])
def test_ode_encode_then_sample_round_trips(sde_name):
    sde = SDES[sde_name]()
    score_fn = exact_score_fn(gmm(), sde)
    x = gmm().sample(256, torch.Generator().manual_seed(0), dtype=F64)
    z, nfe_enc = S.ode_encode(score_fn, sde, x, rtol=1e-7, atol=1e-7)
    assert z.shape == x.shape and nfe_enc > 0
    # the latent is distributed as the prior (loosely: mean 0, std prior_std)
    assert abs(float(z.std()) / sde.prior_std() - 1) < 0.15 and abs(float(z.mean())) < 0.15 * sde.prior_std()
    x_rec, _ = S.ode_sample(score_fn, sde, x.shape, x_init=z, rtol=1e-7, atol=1e-7)
    assert float((x_rec - x).abs().max()) < 1e-3


# ----- NFE, reproducibility, dtype, callback ------------------------------------------------
def _counting(score_fn):
    calls = [0]

    def f(x, t):
        calls[0] += 1
        return score_fn(x, t)

    return f, calls


@pytest.mark.parametrize(
    "f,kw,expected",
    [
        (S.euler_maruyama_sample, {}, 10),
        (S.reverse_diffusion_sample, {}, 10),
        (S.ancestral_sample, {}, 10),
        (S.pc_sample, {}, 20),
        (S.pc_sample, {"n_corrector_steps": 3}, 40),
        (S.pc_sample, {"corrector": None}, 10),
        (S.pc_sample, {"predictor": None, "n_corrector_steps": 2}, 20),
        (S.heun_sample, {}, 20),
    ],
)
def test_nfe_counts(f, kw, expected):
    sde = VPSDE()
    score_fn, calls = _counting(exact_score_fn(gmm(), sde))
    _, nfe = f(score_fn, sde, (8, 2), 10, **kw)
    assert nfe == expected == calls[0]


def test_ode_nfe_counts_score_calls():
    sde = VPSDE()
    score_fn, calls = _counting(exact_score_fn(gmm(), sde))
    _, nfe = S.ode_sample(score_fn, sde, (8, 2), rtol=1e-3, atol=1e-3)
    assert nfe == calls[0] > 6
    _, nfe_tight = S.ode_sample(score_fn, sde, (8, 2), rtol=1e-7, atol=1e-7)
    assert nfe_tight > nfe  # tighter tolerance, more evaluations


ALL = [S.euler_maruyama_sample, S.reverse_diffusion_sample, S.ancestral_sample, S.pc_sample, S.heun_sample, _ode]


@pytest.mark.parametrize("f", ALL)
def test_same_seed_same_samples(f):
    sde = VESDE()
    score_fn = exact_score_fn(gmm(), sde)
    run = lambda seed: f(score_fn, sde, (16, 2), 20, generator=torch.Generator().manual_seed(seed))[0]  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("f", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_dtype_and_callback(f, dtype):
    sde = VPSDE()
    score_fn = exact_score_fn(gmm(), sde)
    seen = []
    x, nfe = f(score_fn, sde, (4, 2), 5, dtype=dtype, callback=lambda i, t, x: seen.append((i, t, x.dtype)))
    assert x.dtype == dtype and x.shape == (4, 2) and x.device.type == "cpu"
    assert all(d == dtype for _, _, d in seen) and len(seen) > 0
    if f is not _ode:
        assert [i for i, _, _ in seen] == list(range(5))
        assert seen[-1][1] == pytest.approx(sde.eps)
        assert all(t1 > t2 for (_, t1, _), (_, t2, _) in zip(seen, seen[1:]))


def test_x_init_dtype_wins_and_shape_checked():
    sde = VESDE()
    score_fn = exact_score_fn(gmm(), sde)
    x0 = torch.randn(4, 2, dtype=F64)
    x, _ = S.euler_maruyama_sample(score_fn, sde, (4, 2), 3, x_init=x0)
    assert x.dtype == F64
    with pytest.raises(ValueError, match="x_init"):
        S.euler_maruyama_sample(score_fn, sde, (5, 2), 3, x_init=x0)


def test_denoise_drops_last_noise():
    sde = VPSDE()
    score_fn = exact_score_fn(gmm(), sde)
    kw = dict(generator=torch.Generator().manual_seed(0))
    x_d, _ = S.ancestral_sample(score_fn, sde, (8, 2), 4, denoise=True, **kw)
    kw = dict(generator=torch.Generator().manual_seed(0))
    x_n, _ = S.ancestral_sample(score_fn, sde, (8, 2), 4, denoise=False, **kw)
    assert not torch.equal(x_d, x_n)
    assert float((x_d - x_n).abs().max()) < 0.2  # only the (small) last posterior noise differs


def test_time_grid():
    sde = VPSDE()
    ts = S.time_grid(sde, 4, dtype=F64)
    assert ts.shape == (5,) and ts[0] == 1.0 and ts[-1] == sde.eps
    torch.testing.assert_close(ts.diff(), torch.full((4,), -(1 - sde.eps) / 4, dtype=F64))


# ----- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [5, (0, 2), (4, -1), (4, 2.0), (), "ab", (True, 2)])
def test_bad_shape(shape):
    sde = VPSDE()
    with pytest.raises((ValueError, TypeError), match="shape"):
        S.euler_maruyama_sample(exact_score_fn(gmm(), sde), sde, shape, 3)


@pytest.mark.parametrize("n_steps", [0, -3, 2.5, True])
def test_bad_n_steps(n_steps):
    sde = VPSDE()
    for f in (S.euler_maruyama_sample, S.pc_sample, S.heun_sample):
        with pytest.raises(ValueError, match="n_steps"):
            f(exact_score_fn(gmm(), sde), sde, (4, 2), n_steps)


def test_bad_options():
    sde = VPSDE()
    score_fn = exact_score_fn(gmm(), sde)
    with pytest.raises(ValueError, match="dopri5"):
        S.ode_sample(score_fn, sde, (4, 2), method="rk45")
    with pytest.raises(ValueError, match="rtol"):
        S.ode_sample(score_fn, sde, (4, 2), rtol=0.0)
    with pytest.raises(ValueError, match="eps"):
        S.ancestral_sample(score_fn, sde, (4, 2), 3, eps=1.5)
    with pytest.raises(ValueError, match="predictor"):
        S.pc_sample(score_fn, sde, (4, 2), 3, predictor=None, corrector=None)
    with pytest.raises(ValueError, match="snr"):
        S.pc_sample(score_fn, sde, (4, 2), 3, snr=-1.0)
    with pytest.raises(ValueError, match="n_corrector_steps"):
        S.pc_sample(score_fn, sde, (4, 2), 3, n_corrector_steps=0)
    with pytest.raises(TypeError, match="score_fn"):
        S.heun_sample("not a function", sde, (4, 2), 3)


@pytest.mark.parametrize("f", ALL + [lambda s, sde, shape, n: S.ode_encode(s, sde, torch.zeros(shape))])
def test_score_shape_mismatch_is_clear(f):
    sde = VPSDE()
    bad = lambda x, t: x[:, :1]  # noqa: E731
    with pytest.raises(ValueError, match="shaped like x"):
        f(bad, sde, (4, 2), 3)


def test_per_sample_snr_available_via_partial():
    sde = VPSDE()
    corr = functools.partial(S.langevin_corrector_step, per_sample=True)
    x, nfe = S.pc_sample(exact_score_fn(gmm(), sde), sde, (4, 2), 3, corrector=corr)
    assert nfe == 6 and torch.isfinite(x).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("f", ALL)
def test_cuda_with_cpu_generator(f):
    sde = VPSDE()
    score_fn = exact_score_fn(gmm(), sde)
    a = f(score_fn, sde, (16, 2), 5, device="cuda", generator=torch.Generator().manual_seed(0))[0]
    b = f(score_fn, sde, (16, 2), 5, device="cuda", generator=torch.Generator().manual_seed(0))[0]
    assert a.device.type == "cuda" and torch.equal(a, b)
