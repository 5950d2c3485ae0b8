"""The deterministic part of a fast sampler's log-density error, without the sampling noise.

``samplers_vs_nfe.py`` compares ``mean log p(x)`` of a sampler's samples with ``E_p[log p]``: its
standard error over 8 seeds of 4000 samples is about 0.007 nats, and an error of 0.02 nats reads
as "off the floor" or "at the floor" depending on the draw. Here each sampler starts from the
same prior draws as a reference solution of the same ODE (dopri5, ``rtol = atol = 1e-9``), and
the measure is the paired difference ``mean log p_0(x) - mean log p_0(x_ref)`` (the mixture's
own density, as in ``samplers_vs_nfe.py``) and the mean distance ``E|x - x_ref|``: the sampling
noise cancels, standard errors are about 0.0005 nats. Negative: the sampler leaves the samples
more spread than the ODE does.

Variants: the default (from 15 steps the linear part of Gaussian data of std 0.1 on
``soft_lambda_grid``, with the corrector) with and without the corrector; and the default before
it (no linear part, ``lambda`` uniform on ``[0.002, 80]``, the corrector from 20 steps), with and
without the corrector, each with its third-order last step and with a first-order (DDIM) one.
Also printed, for that grid: the length in ``lambda = log(alpha/sigma)`` of its last step. VE and
sub-VP end at ``sigma/alpha`` of about 1e-4, far below the range ``[0.002, 80]``, and the range's
sparse tail fits inside one step: their last step is about six times longer than the others,
and the polynomial of a third-order step is extrapolated across it. With the corrector, the
``D`` it extrapolates were evaluated at predicted states that the corrector then moved, and
their differences carry those moves; a first-order last step holds ``D`` constant across the
tail, where it barely changes. Last, a prototype, not in the package, on that grid: a cubic
(four-node) predictor below ``sigma/alpha = 3`` with the corrector one node higher and a
first-order last step.

    python benchmarks/paired_bias.py [--seeds 8] [--n 4000] [--sweep]

``--sweep``: the default's two numbers instead, the std ``s`` of the linear part (0.05 to 0.5) and
the soft grid's ``c`` (0.02 to 0.05), at 15, 20 and 25 NFE.

About 3 min of one core (4 with ``--sweep``).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from exact_measures import mixtures
from minisgm import samplers as S
from minisgm.data import exact_score_fn
from minisgm.sde import SubVPSDE, VESDE, VPSDE

F64 = torch.float64
NFES = (15, 20, 25, 30)


def multistep_nodes_sample(score_fn, sde, shape, n_steps, *, nodes=4, first_order_last=True, x_init=None):
    """Prototype: the default's multistep form with up to ``nodes`` nodes in the predictor below
    ``sigma/alpha = 3`` (two above), the corrector one node higher, from ``nodes = 3`` the package's
    default at 20 steps and more (but for ``first_order_last``): the package's weights up to three
    nodes, ``S._exponential_weights`` for four."""
    grid = S._default_lambda_grid(sde, n_steps, dtype=F64).tolist()
    alpha, sigma = S._marginals(sde, grid)
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    orders = [min(2 if s / a > S._THIRD_ORDER_NSR else nodes, i + 1) for i, (a, s) in enumerate(zip(alpha, sigma))][:n_steps]
    if first_order_last:
        orders[-1] = 1
    score = S.CountedScore(score_fn)
    D = S._data_prediction(score, sde)
    x, history, x_start = x_init, [], None
    for i in range(n_steps):
        history.insert(0, D(x, grid[i], alpha[i], sigma[i]))
        if i >= 1:  # correct x_i with the D just evaluated there, one node more than the predictor had
            k = min(orders[i - 1] + 1, i + 1, nodes + 1)
            w = S._exponential_weights([lam[i - j] - lam[i - 1] for j in range(k)], lam[i] - lam[i - 1])
            x = sigma[i] / sigma[i - 1] * x_start + sum(alpha[i] * wj * Dj for wj, Dj in zip(w, history))
        del history[nodes + 1:]
        x_start = x
        h = [lam[i + 1] - lam[i]] + [lam[i - j] - lam[i - j - 1] if i - j >= 1 else 0.0 for j in range(2)]
        w = (S._multistep_weights(orders[i], *h) if orders[i] <= 3 else  # the package's, or the cubic's exact
             S._exponential_weights([lam[i - j] - lam[i] for j in range(orders[i])], h[0]))
        x = sigma[i + 1] / sigma[i] * x + sum(alpha[i + 1] * wj * Dj for wj, Dj in zip(w, history))
    return x, score.nfe


def variants():
    def last_first_order(sf, sde, sh, n, x0, corrector=None):
        orders = S._solver_orders(None, n, True, True, [s / a for a, s in zip(*S._marginals(
            sde, S._default_lambda_grid(sde, n, dtype=F64).tolist()))])
        corrector = n >= 20 if corrector is None else corrector  # the default before: from 20 steps
        return S.dpm_solver_sample(sf, sde, sh, n, order=orders[:-1] + [1], corrector=corrector, x_init=x0, dtype=F64)
    return {
        "default (dpm_solver_sample: linear part of std 0.1, soft grid, corrector)": lambda sf, sde, sh, n, x0: S.dpm_solver_sample(
            sf, sde, sh, n, x_init=x0, dtype=F64),
        "default without the corrector": lambda sf, sde, sh, n, x0: S.dpm_solver_sample(
            sf, sde, sh, n, corrector=False, x_init=x0, dtype=F64),
        "before (no linear part, [0.002, 80], corrector from 20)": lambda sf, sde, sh, n, x0: S.dpm_solver_sample(
            sf, sde, sh, n, gaussian_std=0.0, corrector=n >= 20, x_init=x0, dtype=F64),
        "before, first-order last step": last_first_order,
        "before without the corrector": lambda sf, sde, sh, n, x0: S.dpm_solver_sample(
            sf, sde, sh, n, gaussian_std=0.0, corrector=False, x_init=x0, dtype=F64),
        "before without the corrector, first-order last step": lambda sf, sde, sh, n, x0: last_first_order(
            sf, sde, sh, n, x0, corrector=False),
        "prototype: cubic predictor + corrector, first-order last step": lambda sf, sde, sh, n, x0: multistep_nodes_sample(
            sf, sde, sh, n, x_init=x0),
    }


def sweep():
    """The default's two numbers: the linear part's std ``s`` (``gaussian_std``) and the soft grid's
    ``c`` (``soft_lambda_grid(sigma_soft=c)``), the rest as the default (corrector from 15 steps)."""
    return {f"s = {s}, c = {c}": (lambda s, c: lambda sf, sde, sh, n, x0: S.dpm_solver_sample(
        sf, sde, sh, n, gaussian_std=s, ts=S.soft_lambda_grid(sde, n, sigma_soft=c, dtype=F64), x_init=x0, dtype=F64))(s, c)
        for s in (0.05, 0.1, 0.15, 0.25, 0.5) for c in (0.02, 0.03, 0.05)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--sweep", action="store_true", help="the default's s and c instead (15, 20, 25 NFE; 4 min)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    sdes = {"VP": VPSDE, "sub-VP": SubVPSDE, "VE": VESDE}
    def steps(sde, n):  # the default grid's steps in lambda
        return np.diff([math.log(a / s) for a, s in zip(*S._marginals(sde, S._default_lambda_grid(sde, n, dtype=F64).tolist()))])
    print("Last step of the 20-step grid before (lambda on [0.002, 80]), in lambda (the others): "
          + "; ".join(f"{name} {h[-1]:.2f} ({h[-2]:.2f})" for name, make in sdes.items() for h in [steps(make(), 20)]))
    print("Last step / the one before, by the number of steps: " + "; ".join(
        f"{name} " + ", ".join(f"{n}: {h[-1] / h[-2]:.1f}" for n in (15, 20, 25, 30, 35, 38, 39, 40, 45) for h in [steps(make(), n)])
        for name, make in sdes.items()) + "\n")
    print(f"Paired log-density error mean log p(x) - mean log p(x_ref) in nats (± standard error over {args.seeds} seeds of "
          f"n = {args.n}) and E|x - x_ref|, x_ref: dopri5 at 1e-9 from the same prior draws\n")
    cases = [(m, s) for m in mixtures() for s in sdes]
    print("| sampler | NFE | " + " | ".join(f"{m}, {s}" for m, s in cases) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in cases) + " |")
    setup, refs = {}, {}  # (mixture, SDE, exact score) per case; (x_T, x_ref, mean log p(x_ref)) per case and seed
    for m, s in cases:
        gmm, sde = mixtures()[m], sdes[s]()
        setup[m, s] = gmm, sde, exact_score_fn(gmm, sde)
        for k in range(args.seeds):
            x0 = S._initial_state(sde, (args.n, 2), None, torch.Generator().manual_seed(k), None, F64)
            x_ref = S.ode_sample(setup[m, s][2], sde, x0.shape, x_init=x0, rtol=1e-9, atol=1e-9, dtype=F64)[0]
            refs[m, s, k] = x0, x_ref, float(gmm.log_prob(x_ref).mean())
    for name, run in (sweep() if args.sweep else variants()).items():
        for nfe in (NFES[:3] if args.sweep else NFES):
            cells = []
            for m, s in cases:
                gmm, sde, sf = setup[m, s]
                d, e = [], []
                for k in range(args.seeds):
                    x0, x_ref, logp_ref = refs[m, s, k]
                    x, used = run(sf, sde, x0.shape, nfe, x0)
                    assert used == nfe, (name, used, nfe)
                    d.append(float(gmm.log_prob(x).mean()) - logp_ref)
                    e.append(float((x - x_ref).norm(dim=1).mean()))
                cells.append(f"{np.mean(d):+.4f} ± {np.std(d, ddof=1) / math.sqrt(len(d)):.4f}, {np.mean(e):.4f}")
            print(f"| {name} | {nfe} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nruntime: {time.process_time() - cpu_start:.0f} s of CPU time, "
          f"{time.perf_counter() - t_start:.0f} s of wall-clock time")


if __name__ == "__main__":
    main()
