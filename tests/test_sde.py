"""SDE objects against closed forms, ODEs for the moments, and Euler–Maruyama simulation."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from minisgm.sde import SubVPSDE, VESDE, VPSDE, batch_time

D64 = torch.float64
SDES = [VESDE(0.01, 10.0), VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0)]
IDS = ["ve", "vp", "subvp"]


def test_closed_forms_of_the_papers():
    t = torch.linspace(0, 1, 11, dtype=D64)
    ve = VESDE(0.01, 50.0)
    m, s = ve.marginal_coeffs(t)
    torch.testing.assert_close(m, torch.ones_like(t))
    torch.testing.assert_close(s**2, (0.01 * 5000**t) ** 2 - 0.01**2)
    vp = VPSDE(0.1, 20.0)
    m, s = vp.marginal_coeffs(t)
    log_m = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
    torch.testing.assert_close(m, log_m.exp())
    torch.testing.assert_close(s, (1 - (2 * log_m).exp()).sqrt())
    m2, s2 = SubVPSDE(0.1, 20.0).marginal_coeffs(t)
    torch.testing.assert_close(m2, m)
    torch.testing.assert_close(s2, 1 - (2 * log_m).exp())
    assert (s2 <= s + 1e-15).all()  # sub-VP: variance below VP's at every t


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_marginal_coeffs_solve_the_moment_odes(sde):
    """For dx = -a(t) x dt + g dw: dm/dt = -a m, d(s^2)/dt = -2 a s^2 + g^2 (a from the drift)."""

    def rhs(t, y):
        tt = torch.tensor([t], dtype=D64)
        a = -sde.drift(torch.ones(1, 1, dtype=D64), tt)[0, 0].item()  # drift is linear: f = -a x
        g2 = sde.diffusion(tt).item() ** 2
        return [-a * y[0], -2 * a * y[1] + g2]

    ts = np.linspace(0, 1, 21)
    sol = solve_ivp(rhs, (0, 1), [1.0, 0.0], t_eval=ts, rtol=1e-11, atol=1e-13, method="DOP853")
    m, s = sde.marginal_coeffs(torch.tensor(ts, dtype=D64))
    np.testing.assert_allclose(m.numpy(), sol.y[0], rtol=1e-7)
    np.testing.assert_allclose((s**2).numpy(), sol.y[1], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_marginal_against_long_euler_maruyama_simulation(sde):
    gen = torch.Generator().manual_seed(0)
    n_paths, n_steps = 20_000, 1000
    x0 = torch.tensor([[1.5, -0.5]], dtype=D64).expand(n_paths, 2)
    x = x0.clone()
    dt = 1.0 / n_steps
    checkpoints = {250: None, 500: None, 1000: None}
    for i in range(n_steps):
        t = torch.full((n_paths,), i * dt, dtype=D64)
        g = sde.diffusion(t)[:, None]
        x = x + sde.drift(x, t) * dt + g * math.sqrt(dt) * torch.randn(x.shape, generator=gen, dtype=D64)
        if i + 1 in checkpoints:
            checkpoints[i + 1] = x.clone()
    for k, xs in checkpoints.items():
        t = torch.full((n_paths,), k * dt, dtype=D64)
        mean, std = sde.marginal(x0, t)
        se = std[0] / math.sqrt(n_paths)
        assert (xs.mean(0) - mean[0]).abs().max() < 5 * se + 2e-3
        rel = (xs.std(0) / std[0] - 1).abs().max()
        assert rel < 0.03, f"t={k * dt}: empirical std differs from s(t) by {rel:.3f}"


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_discretize_composes_to_the_exact_marginal(sde):
    """Chaining the one-step transitions x -> a x + G z over any grid gives p(x_t | x_0) exactly."""
    grid = torch.tensor([0.0, 0.013, 0.1, 0.37, 0.5, 0.81, 1.0], dtype=D64)
    coef, var = torch.ones(1, dtype=D64), torch.zeros(1, dtype=D64)
    for t_prev, t in zip(grid[:-1], grid[1:]):
        x = torch.ones(1, 1, dtype=D64)
        f, G = sde.discretize(x, t.reshape(1), (t - t_prev).item())
        a = (f + x)[0, 0]
        coef, var = a * coef, a * a * var + G**2
        m, s = sde.marginal_coeffs(t.reshape(1))
        torch.testing.assert_close(coef, m)
        torch.testing.assert_close(var, s**2)


def test_vp_discretisation_is_the_ddpm_recursion():
    """x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z with 1 - beta_i = alpha_bar_i / alpha_bar_{i-1}."""
    sde, N = VPSDE(0.1, 20.0), 1000
    t = torch.arange(1, N + 1, dtype=D64) / N
    x = torch.randn(N, 3, dtype=D64)
    f, G = sde.discretize(x, t, 1.0 / N)
    alpha_bar = sde.marginal_coeffs(t)[0] ** 2
    alpha_bar_prev = sde.marginal_coeffs(t - 1.0 / N)[0] ** 2
    beta = 1 - alpha_bar / alpha_bar_prev
    torch.testing.assert_close(x + f, (1 - beta).sqrt()[:, None] * x)
    torch.testing.assert_close(G, beta.sqrt())
    # and those betas are Ho et al.'s linear schedule 1e-4 ... 0.02 up to O(1/N)
    ddpm = sde.ddpm_betas(N)
    assert abs(ddpm[0].item() - 1e-4) < 1e-12 and abs(ddpm[-1].item() - 0.02) < 1e-12
    assert (beta - ddpm).abs().max() < 2.5e-4  # 1% of beta_max: O(beta^2 / N^2) and half a grid step
    assert abs(beta.sum() / ddpm.sum() - 1) < 0.01


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_prior_logp_matches_torch_distributions(sde):
    z = sde.prior_sample((7, 3, 2, 2), generator=torch.Generator().manual_seed(1), dtype=D64)
    ref = torch.distributions.Normal(0.0, sde.prior_std()).log_prob(z).sum((1, 2, 3))
    torch.testing.assert_close(sde.prior_logp(z), ref)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_prior_matches_marginal_at_T(sde):
    """p_T is close to the prior: for VP/sub-VP m(1) ~ 0 and s(1) ~ 1; for VE s(1) ~ sigma_max."""
    m, s = sde.marginal_coeffs(torch.ones(1, dtype=D64))
    assert m.item() < 0.01 or isinstance(sde, VESDE)
    assert abs(s.item() / sde.prior_std() - 1) < 1e-2


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtypes_and_perturb(sde, dtype):
    x0 = torch.randn(5, 1, 4, 4, dtype=dtype)
    t = torch.rand(5, dtype=dtype)
    mean, std = sde.marginal(x0, t)
    assert mean.shape == x0.shape and std.shape == (5,) and mean.dtype == dtype
    xt, z, s = sde.perturb(x0, t, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(xt, mean + s[:, None, None, None] * z)
    assert sde.drift(x0, t).shape == x0.shape and sde.diffusion(t).shape == (5,)
    f, G = sde.discretize(x0, t.clamp(min=0.1), 0.01)
    assert f.shape == x0.shape and G.shape == (5,)
    ts = sde.sample_time(1000, generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert ts.min() >= sde.eps and ts.max() <= 1.0


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_reverse_drift_and_probability_flow(sde):
    score = lambda x, t: -x  # any score will do: the formulas are what is checked
    x = torch.randn(4, 2, dtype=D64)
    t = torch.full((4,), 0.3, dtype=D64)
    g2 = sde.diffusion(t)[:, None] ** 2
    torch.testing.assert_close(sde.reverse_drift(score, x, t), sde.drift(x, t) - g2 * score(x, t))
    torch.testing.assert_close(sde.ode_drift(score, x, t), sde.drift(x, t) - 0.5 * g2 * score(x, t))
    # discretize is the exact transition of transition_coeffs: x_t = a x + sqrt(v) z
    a, v = sde.transition_coeffs(t, 0.01)
    f, G = sde.discretize(x, t, 0.01)
    torch.testing.assert_close(f, (a[:, None] - 1) * x)
    torch.testing.assert_close(G, v.sqrt())
    (m1, s1), (m0, s0) = sde.marginal_coeffs(t), sde.marginal_coeffs(t - 0.01)
    torch.testing.assert_close(a, m1 / m0)
    torch.testing.assert_close(v, s1**2 - (m1 / m0) ** 2 * s0**2)


def test_scalar_time_is_broadcast():
    x = torch.randn(3, 2)
    assert batch_time(0.5, x).shape == (3,)
    mean, std = VPSDE().marginal(x, 0.5)
    assert std.shape == (3,)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: VESDE(sigma_min=-1.0), ValueError, "sigma_min must be a positive"),
        (lambda: VESDE(sigma_min=1.0, sigma_max=0.5), ValueError, "sigma_max > sigma_min"),
        (lambda: VPSDE(beta_min=0.0), ValueError, "beta_min must be a positive"),
        (lambda: VPSDE(beta_max="20"), ValueError, "beta_max must be a positive"),
        (lambda: VPSDE().marginal(torch.zeros(3, 2), 1.5), ValueError, r"t must lie in \[0, 1"),
        (lambda: VPSDE().marginal(torch.zeros(3, 2), -0.1), ValueError, r"t must lie in \[0, 1"),
        (lambda: VPSDE().marginal(torch.zeros(3, 2), float("nan")), ValueError, r"t must lie in \[0, 1"),
        (lambda: VPSDE().marginal(torch.zeros(3, 2), "0.5"), TypeError, "t must be a number or a tensor"),
        (lambda: VPSDE().marginal(torch.zeros(3, 2, dtype=torch.long), 0.5), TypeError, "x must be a floating-point"),
        (lambda: VPSDE().marginal(torch.zeros(3, 2), torch.zeros(4)), ValueError, r"t must be a scalar or have shape \[B\]=\[3\]"),
        (lambda: VESDE().discretize(torch.zeros(3, 2), 0.5, 0.0), ValueError, "dt must be a positive"),
        (lambda: VPSDE().prior_logp(torch.tensor(1.0)), ValueError, r"z must have at least 1 dimension"),
        (lambda: VPSDE().sample_time(8, eps=2.0), ValueError, r"eps must be a finite number in \[0, 1\)"),
        (lambda: VPSDE(eps=0.0), ValueError, r"eps must be a finite number in \(0, 1\)"),
    ],
)
def test_bad_input_raises_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("t", [[0.1, 0.2, 1.5], [-0.1, 0.2, 0.5], [0.1, float("nan"), 0.5]])
def test_tensor_times_are_checked_in_debug_mode_only(t, debug_mode):
    """Reading a tensor's values costs a host sync, so only debug mode checks them."""
    x, t = torch.zeros(3, 2), torch.tensor(t)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1"):
        VPSDE().marginal(x, t)
    debug_mode(False)
    VPSDE().marginal(x, t)  # no check, no sync


def test_eps_is_an_instance_setting():
    assert VPSDE().eps == 1e-3 and VESDE().eps == 1e-5
    sde = VPSDE(eps=0.05)
    assert sde.eps == 0.05 and VPSDE().eps == 1e-3  # the class default is untouched
    assert float(sde.sample_time(10_000, generator=torch.Generator().manual_seed(0)).min()) >= 0.05


def test_ve_score_sde_convention_is_the_same_sde_started_from_smoothed_data():
    """exact_variance=False: s(t) = sigma(t), i.e. the moment ODE started from variance sigma_min^2."""
    exact, approx = VESDE(0.01, 50.0), VESDE(0.01, 50.0, exact_variance=False)
    t = torch.linspace(0, 1, 21, dtype=D64)
    m, s = approx.marginal_coeffs(t)
    torch.testing.assert_close(m, torch.ones_like(t))
    torch.testing.assert_close(s, 0.01 * 5000**t)
    sol = solve_ivp(lambda tt, y: [approx.diffusion(torch.tensor([tt], dtype=D64)).item() ** 2], (0, 1), [0.01**2],
                    t_eval=t.numpy(), rtol=1e-11, atol=1e-14, method="DOP853")
    np.testing.assert_allclose((s**2).numpy(), sol.y[0], rtol=1e-7)
    # Same SDE: the same drift, diffusion and one-step transitions; only p_0 differs.
    x = torch.randn(5, 3, dtype=D64)
    for tt in (0.3, 0.9):
        fa, Ga = approx.discretize(x, tt, 0.01)
        fe, Ge = exact.discretize(x, tt, 0.01)
        torch.testing.assert_close(fa, fe)
        torch.testing.assert_close(Ga, Ge)
    assert float(exact.marginal_coeffs(torch.tensor([1e-5], dtype=D64))[1]) < 2e-4 < float(s[0])
    with pytest.raises(TypeError, match="exact_variance must be a bool"):
        VESDE(exact_variance=1)
