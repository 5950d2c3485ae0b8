"""Empirical order of convergence of the deterministic samplers against a tight solution of the same ODE.

For each SDE (VP, sub-VP, VE) and each mixture of ``exact_measures.mixtures()``, 500 prior
draws are carried to ``eps`` by the probability-flow ODE with dopri5 at ``rtol = atol = 1e-10``
(``ode_sample``, the reference) and by each fixed-step solver with its default grid at NFE
10 ... 640. The error is the mean distance ``E|x - x_ref|``; the order is minus the slope of
log error against log NFE, fitted to the three largest NFE. Theory: 1 for DDIM (= Euler in
``x / alpha``, ``sigma / alpha``), 2 for Heun, DPM-Solver++(2M) and (2S), 3 for (3M) and (3S); the
corrector adds one (DDIM 2, 2M 3); 3M's first step, first order corrected to second, makes 3M
with the corrector third order in the limit, but with exact scores that step's error is tiny and
the measured slope is near 4 ("3-4"). The linear part of Gaussian data (``gaussian_std``) keeps
the order: 3M with it is third order, the default (from 15 steps 3M below ``sigma/alpha = 3``
with the corrector and the linear part) "3-4".
About 3 min of one core.

    python benchmarks/solver_order.py
"""

from __future__ import annotations

import time

import numpy as np
import torch

from exact_measures import mixtures
from minisgm import samplers as S
from minisgm.data import exact_score_fn
from minisgm.sde import SubVPSDE, VESDE, VPSDE
from samplers_vs_nfe import lms_sample

F64 = torch.float64
NFES = (10, 20, 40, 80, 160, 320, 640)

SOLVERS = {  # name: (theoretical order, NFE per step, run(score, sde, x_T, n_steps))
    "DDIM": (1, 1, lambda sf, sde, x, n: S.ddim_sample(sf, sde, x.shape, n, x_init=x)),
    "Heun in t (heun_sample)": (2, 2, lambda sf, sde, x, n: S.heun_sample(sf, sde, x.shape, n, x_init=x)),
    "EDM Heun": (2, 2, lambda sf, sde, x, n: S.edm_sample(sf, sde, x.shape, n, x_init=x)),
    "DPM-Solver++(2M)": (2, 1, lambda sf, sde, x, n: S.dpm_solver_sample(sf, sde, x.shape, n, order=2, x_init=x)),
    "DPM-Solver++(2S)": (2, 2, lambda sf, sde, x, n: S.dpm_solver_sample(sf, sde, x.shape, n, order=2, multistep=False, x_init=x)),
    "DPM-Solver++(3M)": (3, 1, lambda sf, sde, x, n: S.dpm_solver_sample(sf, sde, x.shape, n, order=3, x_init=x)),
    "DPM-Solver++(3S)": (3, 3, lambda sf, sde, x, n: S.dpm_solver_sample(sf, sde, x.shape, n, order=3, multistep=False, x_init=x)),
    "LMS in sigma, order 3 (prototype)": (3, 1, lambda sf, sde, x, n: lms_sample(sf, sde, x.shape, n, x_init=x)),
    # the corrector (UniPC's UniC) adds one order; 3M's corrected start (a second-order first step) keeps it at 3
    "DDIM + corrector": (2, 1, lambda sf, sde, x, n: S.dpm_solver_sample(sf, sde, x.shape, n, order=1, corrector=True, x_init=x)),
    "DPM-Solver++(2M) + corrector": (3, 1, lambda sf, sde, x, n: S.dpm_solver_sample(sf, sde, x.shape, n, order=2, corrector=True, x_init=x)),
    "DPM-Solver++(3M) + corrector": ("3-4", 1, lambda sf, sde, x, n: S.dpm_solver_sample(sf, sde, x.shape, n, order=3, corrector=True, x_init=x)),
    # the linear part of Gaussian data (std 0.1) changes the function the polynomial follows, not the order
    "DPM-Solver++(3M), linear part (soft grid)": (3, 1, lambda sf, sde, x, n: S.dpm_solver_sample(
        sf, sde, x.shape, n, order=3, gaussian_std=0.1, x_init=x)),
    "DPM-Solver++ default (from 15 steps: linear part, corrector)": ("3-4", 1, lambda sf, sde, x, n: S.dpm_solver_sample(
        sf, sde, x.shape, n, x_init=x)),
}


def main() -> None:
    torch.set_num_threads(1)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    print("Mean distance to a dopri5 solution (rtol = atol = 1e-10) of the same probability-flow ODE, "
          "500 prior draws, exact scores, float64.\n")
    for mname, gmm in mixtures().items():
        for sname, sde in (("VP", VPSDE()), ("sub-VP", SubVPSDE()), ("VE", VESDE())):
            sf = exact_score_fn(gmm, sde)
            x_T = sde.prior_sample((500, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
            ref, nfe_ref = S.ode_sample(sf, sde, x_T.shape, x_init=x_T, rtol=1e-10, atol=1e-10)
            print(f"### {mname}, {sname} (reference: {nfe_ref} NFE)\n")
            print("| solver | theory | " + " | ".join(f"NFE {n}" for n in NFES) + " | measured order |")
            print("| --- | ---: | " + " | ".join("---:" for _ in NFES) + " | ---: |")
            for name, (order, per_step, run) in SOLVERS.items():
                nfes, errs = [], []
                for budget in NFES:
                    x, nfe = run(sf, sde, x_T, budget // per_step)
                    nfes.append(nfe)
                    errs.append(float((x - ref).norm(dim=1).mean()))
                slope = -np.polyfit(np.log(nfes[-3:]), np.log(errs[-3:]), 1)[0]
                print(f"| {name} | {order} | " + " | ".join(f"{e:.1e}" for e in errs) + f" | {slope:.2f} |")
            print(flush=True)
    print(f"runtime: {time.process_time() - cpu_start:.0f} s of CPU time, {time.perf_counter() - t_start:.0f} s wall-clock")


if __name__ == "__main__":
    main()
