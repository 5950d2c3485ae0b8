"""Fast samplers (DDIM, DPM-Solver++, EDM) against analytic oracles on a 2-D Gaussian mixture.

The probability-flow ODE of a mixture has an exact score, so every solver is compared with a
tight dopri5 solution of the same ODE from the same starting points: the slope of its error
against the step count is its order of convergence. Book: chapter 8 (sec-fast-sampling).
"""

import math

import pytest
import torch

from minisgm import samplers as S
from minisgm.data import GaussianMixture, exact_score_fn
from minisgm.metrics import energy_distance
from minisgm.score_matching import flow_matching_loss
from minisgm.sde import RectifiedFlowSDE, SubVPSDE, VESDE, VPSDE

F64 = torch.float64
SDES = {"VE": VESDE, "VP": VPSDE, "subVP": SubVPSDE}


def gmm():
    return GaussianMixture([[-1.0, 0.5], [1.0, 0.5], [0.0, -1.0]], [0.25, 0.25, 0.3], [0.3, 0.3, 0.4])


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----- order of convergence against a tight reference ------------------------------------------
SOLVERS = {  # name: (call, expected order, NFE per step)
    "ddim": (lambda sf, sde, n, x: S.ddim_sample(sf, sde, x.shape, n, x_init=x), 1),
    "edm_euler": (lambda sf, sde, n, x: S.edm_sample(sf, sde, x.shape, n, order=1, x_init=x), 1),
    "edm_heun": (lambda sf, sde, n, x: S.edm_sample(sf, sde, x.shape, n, x_init=x), 2),
    "dpm_2m": (lambda sf, sde, n, x: S.dpm_solver_sample(sf, sde, x.shape, n, order=2, x_init=x), 2),
    "dpm_2s": (lambda sf, sde, n, x: S.dpm_solver_sample(sf, sde, x.shape, n, order=2, multistep=False,
                                                         lower_order_final=False, x_init=x), 2),
    "dpm_3m": (lambda sf, sde, n, x: S.dpm_solver_sample(sf, sde, x.shape, n, order=3, x_init=x), 3),
    "dpm_3s": (lambda sf, sde, n, x: S.dpm_solver_sample(sf, sde, x.shape, n, order=3, multistep=False,
                                                         lower_order_final=False, x_init=x), 3),
    # the corrector (UniPC's UniC) raises a multistep method's order by one
    "dpm_1m_corrected": (lambda sf, sde, n, x: S.dpm_solver_sample(sf, sde, x.shape, n, order=1, corrector=True,
                                                                   x_init=x), 2),
    "dpm_2m_corrected": (lambda sf, sde, n, x: S.dpm_solver_sample(sf, sde, x.shape, n, order=2, corrector=True,
                                                                   x_init=x), 3),
}


@pytest.fixture(scope="module")
def references():
    """Per SDE: exact score, 64 prior draws and their dopri5 solution at tolerance 1e-10."""
    out = {}
    for name, make in SDES.items():
        sde = make()
        sf = exact_score_fn(gmm(), sde)
        x_T = sde.prior_sample((64, 2), generator=gen(0), dtype=F64)
        ref, _ = S.ode_sample(sf, sde, x_T.shape, x_init=x_T, rtol=1e-10, atol=1e-10)
        out[name] = (sde, sf, x_T, ref)
    return out


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_empirical_order(references, sde_name, solver):
    sde, sf, x_T, ref = references[sde_name]
    f, order = SOLVERS[solver]
    steps = (40, 80)
    errs = [float((f(sf, sde, n, x_T)[0] - ref).norm(dim=1).mean()) for n in steps]
    slope = math.log(errs[0] / errs[1]) / math.log(steps[1] / steps[0])
    assert abs(slope - order) < 0.4, (solver, sde_name, errs, slope)


@pytest.mark.parametrize("n_steps, last_order", [(9, 1), (10, 1), (14, 1), (15, 3), (40, 3)])
def test_multistep_last_step_order(references, n_steps, last_order):
    """Below 15 steps the multistep solver's last step is first order (below 10 the last two
    are lowered, as the official code does); from 15 steps on the method keeps its order."""
    sde, sf, x_T, _ = references["VE"]
    x, _ = S.dpm_solver_sample(sf, sde, x_T.shape, n_steps, order=3, x_init=x_T)
    orders = [3] * n_steps
    if n_steps < 10:
        orders[-2] = 2
    orders[-1] = last_order
    y, _ = S.dpm_solver_sample(sf, sde, x_T.shape, n_steps, order=orders, x_init=x_T)
    torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_first_order_last_step_is_closer_at_10_steps(references):
    """The last of 10 steps spans the grid's whole low-noise tail: a third-order step extrapolates
    the previous, much shorter steps' D over it and lands further from the exact solution."""
    for name in ("VE", "subVP"):
        sde, sf, x_T, ref = references[name]
        err = {lof: float((S.dpm_solver_sample(sf, sde, x_T.shape, 10, lower_order_final=lof,
                                                x_init=x_T)[0] - ref).norm(dim=1).mean()) for lof in (True, False)}
        assert err[True] < 0.5 * err[False], (name, err)


@pytest.mark.parametrize("n_steps, sigma_min, sigma_max", [(5, 0.03, 60.0), (14, 0.03, 60.0), (15, 0.002, 80.0), (40, 0.002, 80.0)])
def test_default_grid_range(n_steps, sigma_min, sigma_max):
    """DDIM's default grid is uniform in lambda on [0.03, 60] below 15 steps, else on [0.002, 80];
    DPM-Solver++'s too below 15 steps and with an explicit order (or ``gaussian_std=0``), and from
    15 steps by default :func:`soft_lambda_grid`."""
    def seen(f, **kw):
        out = []
        f(lambda x, t: -x, VESDE(), (1, 2), n_steps, callback=lambda i, t, x: out.append(float(t)), **kw)
        return out
    ts = S.lambda_time_grid(VESDE(), n_steps, sigma_min=sigma_min, sigma_max=sigma_max, dtype=F64).tolist()[1:]
    assert seen(S.ddim_sample) == pytest.approx(ts, rel=1e-12)
    assert seen(S.dpm_solver_sample, order=3) == pytest.approx(ts, rel=1e-12)
    assert seen(S.dpm_solver_sample, gaussian_std=0.0) == pytest.approx(ts, rel=1e-12)
    soft = S.soft_lambda_grid(VESDE(), n_steps, dtype=F64).tolist()[1:]
    assert seen(S.dpm_solver_sample) == pytest.approx(ts if n_steps < 15 else soft, rel=1e-12)


@pytest.mark.parametrize("sde_name", ["VE", "VP", "subVP"])
def test_soft_lambda_grid(sde_name):
    """Uniform in -log sqrt(sigma^2 + c^2) from sigma_max = 80 down to sigma(eps), with the points
    above 80 (VP, sub-VP) ten times sparser: steps of equal length in lambda well above c, the points
    thinning out below c."""
    sde = SDES[sde_name]()
    ts = S.soft_lambda_grid(sde, 40, sigma_soft=0.03, dtype=F64)
    assert ts[0] == sde.T and ts[-1] == S._eps(sde, None) and bool((ts.diff() < 0).all())
    a, s = sde.marginal_coeffs(ts)
    nsr = s / a
    log_q = 0.5 * torch.log(nsr**2 + 0.03**2)
    steps = -log_q[1:].diff()  # all but the first, which starts at T
    assert float(steps.max() - steps.min()) < 1e-9 * float(steps.mean())
    assert float(nsr[1]) < 80.0 < float(nsr[0]) or float(nsr[0]) <= 80.0
    lam_steps = -torch.log(nsr).diff()
    high = (nsr[:-1] > 5.0) & (nsr[1:] > 5.0)  # far above c: equal steps in lambda too (but the first)
    high[0] = False
    assert float(lam_steps[high].std() / lam_steps[high].mean()) < 2e-3
    assert float(lam_steps[-1]) == float(lam_steps.max())  # below c the points thin out: the last step is the longest


def test_short_grid_range_beats_the_wider_one_at_10_steps():
    """With 10 steps, the uniform part on [0.03, 60] instead of [0.01, 80] brings every SDE closer to
    the exact solution on the narrow-mode mixture and cuts its log-density error to under 40%."""
    mix = GaussianMixture([[-0.8, -0.4], [0.8, -0.4], [0.0, 1.6]], [0.35, 0.35, 0.05], [0.45, 0.45, 0.1])
    for name, make in SDES.items():
        sde = make()
        sf = exact_score_fn(mix, sde)
        x_T = sde.prior_sample((200, 2), generator=gen(7), dtype=F64)
        ref, _ = S.ode_sample(sf, sde, x_T.shape, x_init=x_T, rtol=1e-10, atol=1e-10)
        wider = S.lambda_time_grid(sde, 10, sigma_min=0.01, sigma_max=80.0, dtype=F64)
        err = {}  # mean distance to the exact solution, mean log-density error
        for k, ts in (("default", None), ("wider", wider)):
            x, _ = S.dpm_solver_sample(sf, sde, x_T.shape, 10, ts=ts, x_init=x_T)
            err[k] = (float((x - ref).norm(dim=1).mean()), float(mix.log_prob(x).mean() - mix.log_prob(ref).mean()))
        # measured: distance 0.043 -> 0.031 (VP), 0.043 -> 0.034 (sub-VP), 0.032 -> 0.026 (VE);
        # log p error -0.21 -> -0.02, -0.28 -> -0.10, -0.26 -> -0.06
        assert err["default"][0] < 0.85 * err["wider"][0], (name, err)
        assert abs(err["default"][1]) < 0.4 * abs(err["wider"][1]), (name, err)


@pytest.mark.parametrize("n_steps", [9, 10, 14, 20, 40])
@pytest.mark.parametrize("sde_name", ["VE", "VP"])
def test_default_order_is_second_above_noise_to_signal_3(references, sde_name, n_steps):
    """The default multistep orders: 2M below 10 steps; from 10 steps, third order where the step
    starts at sigma/alpha <= 3 and second order above (first-order last step below 15 steps); with
    the corrector from 20 steps."""
    sde, sf, x_T, _ = references[sde_name]
    x, _ = S.dpm_solver_sample(sf, sde, x_T.shape, n_steps, x_init=x_T)
    ts = (S.lambda_time_grid(sde, n_steps, sigma_min=0.03, sigma_max=60.0, dtype=F64) if n_steps < 15
          else S.soft_lambda_grid(sde, n_steps, dtype=F64))
    alpha, sigma = sde.marginal_coeffs(ts)
    nsr = (sigma / alpha).tolist()
    if n_steps < 10:
        orders = [2] * (n_steps - 1) + [1]
    else:
        orders = [3 if v <= 3.0 else 2 for v in nsr[:-1]]
        if n_steps < 15:
            orders[-1] = 1
    assert 2 in orders[2:] and (n_steps < 10 or 3 in orders)  # both orders occur
    y, _ = S.dpm_solver_sample(sf, sde, x_T.shape, n_steps, order=orders, corrector=n_steps >= 15,
                               gaussian_std=0.1 if n_steps >= 15 else 0.0, x_init=x_T)
    torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("n_steps, on", [(10, False), (14, False), (15, True), (40, True)])
def test_corrector_and_linear_part_are_part_of_the_default_from_15_steps(references, n_steps, on):
    """``corrector=None`` and ``gaussian_std=None``: on from 15 steps with the default order (0.1);
    an explicit order is DPM-Solver++ as published (uncorrected, ``gaussian_std=0``) unless asked."""
    sde, sf, x_T, _ = references["VP"]
    run = lambda **kw: S.dpm_solver_sample(sf, sde, x_T.shape, n_steps, x_init=x_T, **kw)[0]  # noqa: E731
    torch.testing.assert_close(run(), run(corrector=on), rtol=0, atol=0)
    torch.testing.assert_close(run(), run(gaussian_std=0.1 if on else 0.0), rtol=0, atol=0)
    assert not torch.equal(run(), run(corrector=not on))
    assert not torch.equal(run(), run(gaussian_std=0.0 if on else 0.1))
    torch.testing.assert_close(run(order=3), run(order=3, corrector=False, gaussian_std=0.0), rtol=0, atol=0)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("std, order, corrector", [(0.1, None, None), (0.25, 2, False), (0.25, 3, True), (0.4, 1, False)])
def test_gaussian_linear_part_is_exact_for_gaussian_data(sde_name, std, order, corrector):
    """With ``gaussian_std`` equal to the std of Gaussian data, the integrator's linear part is the
    whole probability-flow ODE: every order, with or without the corrector, lands on the exact
    solution (to rounding) at 15 steps, where ``gaussian_std=0`` (DPM-Solver++) is far off."""
    sde = SDES[sde_name]()
    data = GaussianMixture([[0.5, -0.2]], [std], [1.0])
    sf = exact_score_fn(data, sde)
    x_T = sde.prior_sample((200, 2), generator=gen(3), dtype=F64)
    ref, _ = S.ode_sample(sf, sde, x_T.shape, x_init=x_T, rtol=1e-10, atol=1e-10)
    x, nfe = S.dpm_solver_sample(sf, sde, x_T.shape, 15, order=order, corrector=corrector,
                                 gaussian_std=std if order is not None else None, x_init=x_T)
    y, _ = S.dpm_solver_sample(sf, sde, x_T.shape, 15, order=order, corrector=corrector, gaussian_std=0.0,
                               ts=S.soft_lambda_grid(sde, 15, dtype=F64), x_init=x_T)
    assert nfe == 15
    assert float((x - ref).norm(dim=1).max()) < 1e-8
    assert float((y - ref).norm(dim=1).max()) > 1e-4


@pytest.mark.parametrize("sde_name", ["VP", "subVP"])  # sigma(T) = 152 > 80: the grid's upper tail matters
def test_gaussian_linear_part_keeps_the_order(references, sde_name):
    """With the linear part on the soft grid, 3M stays third order and the default (with the corrector)
    above it up to 320 steps: every step of the grid shrinks like 1/N, the first (from sigma = 152) too."""
    sde, sf, x_T, ref = references[sde_name]
    for kw, lo, hi in [(dict(order=3, gaussian_std=0.1), 2.5, 3.5), ({}, 3.2, 4.5)]:
        errs = [float((S.dpm_solver_sample(sf, sde, x_T.shape, n, x_init=x_T, **kw)[0] - ref).norm(dim=1).mean())
                for n in (160, 320)]
        slope = math.log2(errs[0] / errs[1])
        assert lo < slope < hi, (kw, errs, slope)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_default_at_20_steps_is_closer_than_dpm_solver_pp(references, sde_name):
    """The default (linear part of std 0.1, soft grid, corrector) against the same multistep solver
    with ``gaussian_std=0`` on the [0.002, 80] grid (the default before) on the 3-mode mixture at 20 NFE:
    closer to the exact solution (benchmarks/paired_bias.py, 32000 samples: 2.8, 7.9 and 7.4 times for
    VP, sub-VP, VE)."""
    sde, sf, x_T, ref = references[sde_name]
    err = {}
    for k, std in (("new", None), ("before", 0.0)):
        x, _ = S.dpm_solver_sample(sf, sde, x_T.shape, 20, gaussian_std=std, x_init=x_T)
        err[k] = float((x - ref).norm(dim=1).mean())
    assert err["new"] < 0.5 * err["before"], err


@pytest.mark.parametrize("sde_name", list(SDES))
def test_corrector_brings_40_steps_closer_to_the_exact_solution(references, sde_name):
    """With exact scores the corrected default is several times closer to a tight ODE solution at
    40 steps (measured: 0.20 to 0.29 times the uncorrected error), at the same NFE."""
    sde, sf, x_T, ref = references[sde_name]
    err, nfe = {}, {}
    for corrector in (False, True):
        x, nfe[corrector] = S.dpm_solver_sample(sf, sde, x_T.shape, 40, corrector=corrector, x_init=x_T)
        err[corrector] = float((x - ref).norm(dim=1).mean())
    assert nfe[True] == nfe[False] == 40
    assert err[True] < 0.4 * err[False], err


def test_exponential_weights_integrate_polynomials_exactly():
    """The corrector's weights: the variation-of-constants integral of the interpolating polynomial,
    equal to 3M's weights on 3M's nodes and exact for a cubic on four nodes."""
    from scipy.integrate import quad

    h, h1, h2 = 0.45, 0.5, 0.55
    torch.testing.assert_close(torch.tensor(S._exponential_weights([0.0, -h1, -h1 - h2], h)),
                               torch.tensor(S._multistep_weights(3, h, h1, h2)), rtol=1e-13, atol=1e-15)
    nodes = [h, 0.0, -h1, -h1 - h2]
    p = lambda tau: 0.3 - 1.2 * tau + 0.7 * tau**2 + 2.0 * tau**3  # noqa: E731
    exact = quad(lambda tau: math.exp(tau - h) * p(tau), 0.0, h, epsabs=1e-15, epsrel=1e-14)[0]
    got = sum(w * p(v) for w, v in zip(S._exponential_weights(nodes, h), nodes))
    assert abs(got - exact) < 1e-14, (got, exact)


def test_default_order_beats_3m_on_a_learned_score():
    """A briefly trained 2-D VP score model (chapter 8's): the default, second order above
    sigma/alpha = 3, lands closer to the model's own ODE solution than 3M throughout."""
    from minisgm.models import ScoreMLP
    from minisgm.score_matching import sde_loss

    sde, mix = VPSDE(), gmm()
    torch.manual_seed(12)
    model = ScoreMLP(2, hidden=128, n_layers=3, marginal_std=lambda t: sde.marginal_coeffs(t)[1])
    opt, g = torch.optim.Adam(model.parameters(), lr=2e-3), gen(12)
    for _ in range(800):
        loss = sde_loss(model, sde, mix.sample(256, generator=g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    score = lambda x, t: model(x.float(), t.float()).to(x.dtype)  # noqa: E731
    x_T = sde.prior_sample((1000, 2), generator=gen(13), dtype=F64)
    with torch.no_grad():
        ref, _ = S.ode_sample(score, sde, x_T.shape, x_init=x_T, rtol=1e-6, atol=1e-6)
        for n in (10, 20):
            err = {order: float((S.dpm_solver_sample(score, sde, x_T.shape, n, order=order, corrector=False,
                                                     x_init=x_T)[0] - ref).norm(dim=1).mean()) for order in (None, 3)}
            # measured (2000 draws): 0.090 against 0.137 at 10 steps, 0.032 against 0.049 at 20
            assert err[None] < 0.8 * err[3], (n, err)
        # and the corrector, the default from 20 steps: measured 0.022 against 0.032 at 20 steps
        corrected = float((S.dpm_solver_sample(score, sde, x_T.shape, 20, x_init=x_T)[0] - ref).norm(dim=1).mean())
        assert corrected < 0.8 * err[None], (corrected, err)


# ----- DDIM = Euler in (x / alpha, sigma / alpha) = DPM-Solver++ of order 1 -------------------
@pytest.mark.parametrize("sde_name", list(SDES))
def test_ddim_step_is_euler_in_scaled_variables(sde_name):
    sde = SDES[sde_name]()
    sf = exact_score_fn(gmm(), sde)
    s, t = 0.6, 0.35  # one step from s down to t
    x = sde.marginal(gmm().sample(16, gen(1), dtype=F64), s)[0] + 0.3 * torch.randn(16, 2, generator=gen(2), dtype=F64)
    (a_s, a_t), (sig_s, sig_t) = (v.tolist() for v in sde.marginal_coeffs(torch.tensor([s, t], dtype=F64)))
    D = (x + sig_s**2 * sf(x, torch.full((16,), s, dtype=F64))) / a_s  # Tweedie's x0_hat
    # Euler for dy/dsigma = (y - D)/sigma with y = x/alpha, sigma = sigma_t/alpha_t
    y, nsr_s, nsr_t = x / a_s, sig_s / a_s, sig_t / a_t
    x_euler = a_t * (y + (nsr_t - nsr_s) * (y - D) / nsr_s)
    # DDIM's eq. 12 (eta = 0): alpha_t x0_hat + sigma_t eps_hat
    x_ddim_eq = a_t * D + sig_t * (x - a_s * D) / sig_s
    x_pkg, nfe = S.ddim_sample(sf, sde, x.shape, 1, ts=[s, t], x_init=x)
    x_dpm1, _ = S.dpm_solver_sample(sf, sde, x.shape, 1, order=1, ts=[s, t], x_init=x)
    x_edm1, _ = S.edm_sample(sf, sde, x.shape, 1, order=1, ts=[s, t], x_init=x)
    assert nfe == 1
    for other in (x_ddim_eq, x_pkg, x_dpm1, x_edm1):
        torch.testing.assert_close(other, x_euler, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_ddim_equals_dpm_solver_order_1_and_edm_euler_on_a_whole_grid(sde_name):
    sde = SDES[sde_name]()
    sf = exact_score_fn(gmm(), sde)
    x_T = sde.prior_sample((32, 2), generator=gen(3), dtype=F64)
    a, _ = S.ddim_sample(sf, sde, x_T.shape, 12, x_init=x_T)
    b, _ = S.dpm_solver_sample(sf, sde, x_T.shape, 12, order=1, x_init=x_T)
    c, _ = S.edm_sample(sf, sde, x_T.shape, 12, order=1, x_init=x_T, ts=S.lambda_time_grid(
        sde, 12, sigma_min=0.03, sigma_max=60.0, dtype=F64))  # the fast samplers' grid below 15 steps
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sde_name", ["VE", "VP"])
def test_ddim_eta_1_is_ancestral_sampling(sde_name):
    # eta = 1 draws x_t from the posterior q(x_t | x_s, x_0 = x0_hat): the DDPM / SMLD step.
    sde = SDES[sde_name]()
    sf = exact_score_fn(gmm(), sde)
    a, _ = S.ddim_sample(sf, sde, (64, 2), 20, eta=1.0, ts=S.time_grid(sde, 20, dtype=F64), generator=gen(4), dtype=F64)
    b, _ = S.ancestral_sample(sf, sde, (64, 2), 20, generator=gen(4), dtype=F64, denoise=False)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_multistep_weights_integrate_quadratics_exactly():
    # DPM-Solver++(3M) integrates exp(tau - h) P(tau) over [0, h] exactly for the quadratic P
    # through the three nodes: a test of the phi_3 coefficient (half of it gives order 2).
    h, h1, h2 = 0.7, 0.5, 0.9
    w = S._multistep_weights(3, h, h1, h2)
    nodes = [0.0, -h1, -h1 - h2]
    for P in (lambda u: 1.0 + 0 * u, lambda u: u, lambda u: u**2 - 0.3 * u):
        tau = torch.linspace(0, h, 200_001, dtype=F64)
        exact = torch.trapezoid(torch.exp(tau - h) * P(tau), tau)
        assert abs(sum(wj * P(torch.tensor(n, dtype=F64)) for wj, n in zip(w, nodes)) - exact) < 1e-9


# ----- samples match the mixture for every SDE --------------------------------------------------
@pytest.fixture(scope="module")
def reference_samples():
    g = gen(1234)
    y = gmm().sample(2000, g, dtype=F64)
    floors = [float(energy_distance(gmm().sample(2000, g, dtype=F64), y)) for _ in range(5)]
    return y, sum(floors) / len(floors)


FAST = {
    "ddim": lambda sf, sde, g: S.ddim_sample(sf, sde, (2000, 2), 100, generator=g, dtype=F64),
    "ddim_eta": lambda sf, sde, g: S.ddim_sample(sf, sde, (2000, 2), 100, eta=0.5, generator=g, dtype=F64),
    "dpm_solver": lambda sf, sde, g: S.dpm_solver_sample(sf, sde, (2000, 2), 20, generator=g, dtype=F64),
    "dpm_solver_3s": lambda sf, sde, g: S.dpm_solver_sample(
        sf, sde, (2000, 2), 7, order=S.dpm_solver_orders(20, 3), multistep=False, generator=g, dtype=F64),
    "edm": lambda sf, sde, g: S.edm_sample(sf, sde, (2000, 2), 25, generator=g, dtype=F64),
    "edm_churn": lambda sf, sde, g: S.edm_sample(sf, sde, (2000, 2), 50, S_churn=5.0, generator=g, dtype=F64),
}


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("sampler", list(FAST))
def test_samples_match_mixture(reference_samples, sde_name, sampler):
    y, floor = reference_samples
    sde = SDES[sde_name]()
    x, nfe = FAST[sampler](exact_score_fn(gmm(), sde), sde, gen(8))
    assert x.shape == (2000, 2) and x.dtype == F64
    assert float(energy_distance(x, y)) < 3 * floor, sampler


def test_wrong_score_is_detected(reference_samples):
    y, floor = reference_samples
    sde = VPSDE()
    other = GaussianMixture(gmm().means, gmm().stds, [0.6, 0.3, 0.1])
    x, _ = S.dpm_solver_sample(exact_score_fn(other, sde), sde, (2000, 2), 20, generator=gen(8), dtype=F64)
    assert float(energy_distance(x, y)) > 5 * floor


# ----- NFE, reproducibility, dtype, callback -----------------------------------------------------
@pytest.mark.parametrize("call,nfe", [
    (lambda sf, sde: S.ddim_sample(sf, sde, (8, 2), 7), 7),
    (lambda sf, sde: S.ddim_sample(sf, sde, (8, 2), 7, denoise=True), 8),
    (lambda sf, sde: S.dpm_solver_sample(sf, sde, (8, 2), 7), 7),
    (lambda sf, sde: S.dpm_solver_sample(sf, sde, (8, 2), 7, denoise=True), 8),
    (lambda sf, sde: S.dpm_solver_sample(sf, sde, (8, 2), 7, corrector=True), 7),
    (lambda sf, sde: S.dpm_solver_sample(sf, sde, (8, 2), 20), 20),
    (lambda sf, sde: S.dpm_solver_sample(sf, sde, (8, 2), 4, order=3, multistep=False, lower_order_final=False), 12),
    (lambda sf, sde: S.dpm_solver_sample(sf, sde, (8, 2), 4, order=3, multistep=False), 3 + 3 + 2 + 1),
    (lambda sf, sde: S.dpm_solver_sample(sf, sde, (8, 2), 10, order=3, multistep=False), 30),
    (lambda sf, sde: S.dpm_solver_sample(sf, sde, (8, 2), 4, order=S.dpm_solver_orders(10, 3), multistep=False), 10),
    (lambda sf, sde: S.dpm_solver_sample(sf, sde, (8, 2), 5, order=2, multistep=False, lower_order_final=False), 10),
    (lambda sf, sde: S.edm_sample(sf, sde, (8, 2), 7), 14),
    (lambda sf, sde: S.edm_sample(sf, sde, (8, 2), 7, order=1), 7),
    (lambda sf, sde: S.edm_sample(sf, sde, (8, 2), 7, denoise=True, S_churn=5.0), 15),
])
def test_nfe_is_exact(call, nfe):
    sde = VPSDE()
    calls = []

    def counting_score(x, t):
        calls.append(1)
        return exact_score_fn(gmm(), sde)(x, t)

    _, reported = call(counting_score, sde)
    assert reported == nfe == len(calls)


@pytest.mark.parametrize("nfe", range(1, 16))
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_orders_spend_the_budget(nfe, order):
    orders = S.dpm_solver_orders(nfe, order)
    assert sum(orders) == nfe and max(orders) <= order and all(k >= 1 for k in orders)


STOCHASTIC = {
    "ddim_eta": lambda sf, sde, **k: S.ddim_sample(sf, sde, (16, 2), 6, eta=0.7, **k),
    "edm_churn": lambda sf, sde, **k: S.edm_sample(sf, sde, (16, 2), 6, S_churn=20.0, **k),
}


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_reproducible_with_a_generator(name):
    sde = VESDE()
    sf = exact_score_fn(gmm(), sde)
    f = STOCHASTIC[name]
    a, _ = f(sf, sde, generator=gen(5))
    b, _ = f(sf, sde, generator=gen(5))
    c, _ = f(sf, sde, generator=gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    x_T = sde.prior_sample((16, 2), generator=gen(7))
    d, _ = f(sf, sde, generator=gen(5), x_init=x_T)  # noise after the start: differs from c
    e, _ = f(sf, sde, generator=gen(5), x_init=x_T)
    assert torch.equal(d, e)


@pytest.mark.parametrize("f", [S.ddim_sample, S.dpm_solver_sample, S.edm_sample])
def test_dtype(f):
    sde = VPSDE()
    sf = exact_score_fn(gmm(), sde)
    x32, _ = f(sf, sde, (16, 2), 8, generator=gen(5))
    assert x32.dtype == torch.float32
    x_T = sde.prior_sample((16, 2), generator=gen(5), dtype=F64)
    x64, _ = f(sf, sde, (16, 2), 8, x_init=x_T)  # x_init's dtype wins
    x32b, _ = f(sf, sde, (16, 2), 8, x_init=x_T.float())
    assert x64.dtype == F64 and x32b.dtype == torch.float32
    torch.testing.assert_close(x32b.double(), x64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("f", [S.ddim_sample, S.dpm_solver_sample, S.edm_sample])
def test_callback_sees_every_step(f):
    sde = SubVPSDE()
    seen = []
    ts = S.lambda_time_grid(sde, 5, dtype=F64)
    x, _ = f(exact_score_fn(gmm(), sde), sde, (4, 2), 5, ts=ts, generator=gen(0), dtype=F64,
             callback=lambda i, t, x: seen.append((i, t, x.clone())))
    assert [i for i, _, _ in seen] == list(range(5))
    assert [t for _, t, _ in seen] == pytest.approx(ts[1:].tolist())
    assert torch.equal(seen[-1][2], x)


@pytest.mark.parametrize("call,match", [
    (lambda sf, sde: S.ddim_sample(sf, sde, (4, 2), 5, eta=-0.1), "eta"),
    (lambda sf, sde: S.dpm_solver_sample(sf, sde, (4, 2), 5, order=4), "order"),
    (lambda sf, sde: S.dpm_solver_sample(sf, sde, (4, 2), 5, order=[3, 3]), "n_steps=5"),
    (lambda sf, sde: S.dpm_solver_sample(sf, sde, (4, 2), 5, corrector=True, multistep=False), "corrector"),
    (lambda sf, sde: S.dpm_solver_sample(sf, sde, (4, 2), 5, corrector="yes"), "corrector"),
    (lambda sf, sde: S.dpm_solver_sample(sf, sde, (4, 2), 5, gaussian_std=-0.1), "gaussian_std"),
    (lambda sf, sde: S.dpm_solver_sample(sf, sde, (4, 2), 5, gaussian_std=0.1, multistep=False), "gaussian_std"),
    (lambda sf, sde: S.soft_lambda_grid(sde, 5, sigma_max=1e-4), "sigma_max"),
    (lambda sf, sde: S.soft_lambda_grid(sde, 5, sigma_soft=-1.0), "sigma_soft"),
    (lambda sf, sde: S.edm_sample(sf, sde, (4, 2), 5, order=3), "order"),
    (lambda sf, sde: S.edm_sample(sf, sde, (4, 2), 5, S_churn=-1.0), "S_churn"),
    (lambda sf, sde: S.edm_sample(sf, sde, (4, 2), 5, S_tmin=2.0, S_tmax=1.0), "S_tmin"),
    (lambda sf, sde: S.ddim_sample(sf, sde, (4, 2), 5, ts=[1.0, 0.5, 0.1]), "n_steps \\+ 1"),
    (lambda sf, sde: S.dpm_solver_sample(sf, sde, (4, 2), 0), "n_steps"),
    (lambda sf, sde: S.lambda_time_grid(sde, 5, sigma_min=1.0, sigma_max=0.5), "sigma_max > sigma_min"),
    (lambda sf, sde: S.lambda_time_grid(sde, 5, sigma_min=500.0), "overlap"),
])
def test_bad_options_give_clear_errors(call, match):
    sde = VPSDE()
    with pytest.raises(ValueError, match=match):
        call(exact_score_fn(gmm(), sde), sde)


# ----- no host reads inside the loop -------------------------------------------------------------
HOST_READS = ("item", "__bool__", "__float__", "__int__", "tolist")


@pytest.mark.parametrize("name,f", [
    ("ddim", lambda sf, sde, n, g: S.ddim_sample(sf, sde, (8, 2), n, eta=0.5, generator=g)),
    ("dpm_3m", lambda sf, sde, n, g: S.dpm_solver_sample(sf, sde, (8, 2), n, generator=g)),
    ("dpm_3s", lambda sf, sde, n, g: S.dpm_solver_sample(sf, sde, (8, 2), n, multistep=False, generator=g)),
    ("dpm_corrected", lambda sf, sde, n, g: S.dpm_solver_sample(sf, sde, (8, 2), n, corrector=True, generator=g)),
    ("edm", lambda sf, sde, n, g: S.edm_sample(sf, sde, (8, 2), n, S_churn=5.0, generator=g)),
])
def test_no_host_reads_in_the_loop(monkeypatch, name, f):
    counts = {k: 0 for k in HOST_READS}
    for k in HOST_READS:
        original = getattr(torch.Tensor, k)

        def counted(self, *args, _k=k, _f=original, **kwargs):
            counts[_k] += 1
            return _f(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, k, counted)
    sde = VESDE()
    sf = exact_score_fn(gmm(), sde)
    totals = []
    for n in (4, 16):
        for k in counts:
            counts[k] = 0
        f(sf, sde, n, gen(0))
        totals.append(dict(counts))
    assert totals[0] == totals[1], totals  # constant: set-up and the final check, not per step
    assert sum(totals[0].values()) <= 8, totals


# ----- grids -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sde_name", list(SDES))
def test_lambda_time_grid(sde_name):
    sde = SDES[sde_name]()
    ts = S.lambda_time_grid(sde, 10, dtype=F64)
    assert ts[0] == sde.T and ts[-1] == sde.eps and (ts.diff() < 0).all()
    alpha, sigma = sde.marginal_coeffs(ts)
    lam = (alpha / sigma).log()
    torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(10), rtol=1e-9, atol=0)
    # concentrated on EDM's range: uniform in log sigma inside [0.002, 80], 10x sparser outside
    ts = S.lambda_time_grid(sde, 200, sigma_min=0.002, sigma_max=80.0, dtype=F64)
    alpha, sigma = sde.marginal_coeffs(ts)
    log_nsr = (sigma / alpha).log()
    steps = -log_nsr.diff()
    inside = (log_nsr[:-1] <= math.log(80.0)) & (log_nsr[1:] >= math.log(0.002))
    outside = (log_nsr[1:] >= math.log(80.0)) | (log_nsr[:-1] <= math.log(0.002))
    torch.testing.assert_close(steps[inside], steps[inside].mean().expand(int(inside.sum())), rtol=1e-9, atol=0)
    if outside.any():
        torch.testing.assert_close(steps[outside] / steps[inside].mean(),
                                   torch.full((int(outside.sum()),), 10.0, dtype=F64), rtol=1e-9, atol=0)
    assert ts[0] == sde.T and ts[-1] == sde.eps and (ts.diff() < 0).all()
    # tail_density = 0: the range's ends are moved onto T and eps (one step covers each tail)
    ts0 = S.lambda_time_grid(sde, 10, sigma_min=0.002, sigma_max=80.0, tail_density=0.0, dtype=F64)
    alpha, sigma = sde.marginal_coeffs(ts0)
    nsr = sigma / alpha
    hi, lo = min(80.0, float(nsr[0])), max(0.002, float(nsr[-1]))
    expected = torch.logspace(math.log10(hi), math.log10(lo), 11, dtype=F64)
    torch.testing.assert_close(nsr[1:-1], expected[1:-1], rtol=1e-9, atol=0)


# ----- flow matching: the same ODE -----------------------------------------------------------------
def test_rectified_flow_velocity_is_the_conditional_expectation():
    # E[z - x_0 | x_t = x] computed from the mixture's posterior, without the score
    sde, mix, t = RectifiedFlowSDE(), gmm(), 0.37
    x = torch.randn(64, 2, generator=gen(9), dtype=F64)
    var = (1 - t) ** 2 * mix.stds**2 + t**2  # [K]
    diff = x[:, None] - (1 - t) * mix.means  # [B, K, 2]
    logw = mix.weights.log() - diff.pow(2).sum(-1) / (2 * var) - torch.log(2 * math.pi * var)
    r = torch.softmax(logw, 1)[..., None]
    e_x0 = mix.means + ((1 - t) * mix.stds**2 / var)[:, None] * diff
    e_z = (t / var)[:, None] * diff
    v = (r * (e_z - e_x0)).sum(1)
    torch.testing.assert_close(sde.ode_drift(exact_score_fn(mix, sde), x, t), v, rtol=1e-12, atol=1e-12)
    # and the marginals are those of the interpolant
    a, s = sde.marginal_coeffs(torch.tensor([t], dtype=F64))
    assert float(a) == pytest.approx(1 - t) and float(s) == pytest.approx(t)


def test_rectified_flow_euler_in_t_is_ddim():
    sde = RectifiedFlowSDE()
    sf = exact_score_fn(gmm(), sde)
    x = sde.prior_sample((32, 2), generator=gen(1), dtype=F64)
    ts = S.time_grid(sde, 8, dtype=F64).tolist()
    y = x
    for t, t_next in zip(ts[:-1], ts[1:]):
        y = y + (t_next - t) * sde.ode_drift(sf, y, t)
    ddim, _ = S.ddim_sample(sf, sde, x.shape, 8, ts=ts, x_init=x)
    torch.testing.assert_close(ddim, y, rtol=1e-10, atol=1e-10)


def test_flow_matching_loss_is_minimised_by_the_exact_velocity():
    sde, mix = RectifiedFlowSDE(T=1.0 - 1e-6), gmm()
    x0 = mix.sample(200_000, gen(2), dtype=F64)
    sf = exact_score_fn(mix, sde)
    exact = lambda x, t: sde.ode_drift(sf, x, t)  # noqa: E731
    shifted = lambda x, t: exact(x, t) + 0.1  # noqa: E731
    l_exact = flow_matching_loss(exact, x0, T=0.99, generator=gen(3))
    l_shift = flow_matching_loss(shifted, x0, T=0.99, generator=gen(3))
    # same draws: the loss of v + c exceeds that of v by |c|^2 (the cross term has mean 0)
    assert float(l_shift - l_exact) == pytest.approx(2 * 0.1**2, rel=0.1)
    with pytest.raises(ValueError, match="T must"):
        flow_matching_loss(exact, x0, T=1.5)
