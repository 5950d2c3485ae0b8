"""Sample quality versus the number of score evaluations (NFE), measured against the exact answer.

Two 2-D Gaussian mixtures (``exact_measures.mixtures()``: the README's 3-mode mixture, and one
with a small, narrow, distant mode), their exact noised scores (:func:`minisgm.data.exact_score_fn`)
and the VP, sub-VP and VE SDEs, so the only errors are the samplers'. Each sampler, with its
default settings, runs at NFE budgets 5, 10, 15, 20, 25, 30, 35, 50 (and more for the slow ones), for
n = 4000 samples and 8 seeds. Three measures against the mixture itself (``exact_measures``):
the largest mode-weight error under soft assignment, the mean exact log-density of the samples
minus ``E_p[log p]``, and the energy distance to the mixture; each is compared with the same
measure of exact samples (the floor). Prints, per mixture and SDE, the energy distance relative
to the floor at every budget (marked where all three measures are at the floor), the three
measures at 10 and 20 NFE, and a summary: the NFE from which on each sampler is at the floor on
all three measures at every larger budget it runs (a budget at the floor followed by one off it,
an error that cancels by chance, does not count).

``--ablation`` measures instead the low-NFE details of the fast samplers (grid, order and form,
the corrector, last step, lower-order final steps, stochastic churn, VE's ``exact_variance``), 4 seeds.

    python benchmarks/samplers_vs_nfe.py [--ablation] [--n 4000] [--seeds 8]

About 13 min of one core for the main tables, 25 min for the ablation with 8 seeds (an idle core is faster).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

from exact_measures import MEASURES, ExactMeasures, at_floor, mixtures, summary
from minisgm import samplers as S
from minisgm.data import exact_score_fn
from minisgm.sde import SubVPSDE, VESDE, VPSDE

F64 = torch.float64
BUDGETS = (5, 10, 15, 20, 25, 30, 35, 50)
SLOW = (100, 200)
Run = Callable[..., Tuple[torch.Tensor, int]]


def main_samplers() -> List[Tuple[str, Tuple[int, ...], Run]]:
    """(name, NFE budgets, run(score, sde, shape, nfe, generator) -> (x, nfe)), default settings."""
    return [
        ("Euler-Maruyama", BUDGETS + SLOW, lambda sf, sde, sh, nfe, g: S.euler_maruyama_sample(sf, sde, sh, nfe, generator=g, dtype=F64)),
        ("ancestral (DDPM / SMLD)", BUDGETS + SLOW, lambda sf, sde, sh, nfe, g: S.ancestral_sample(sf, sde, sh, nfe, generator=g, dtype=F64)),
        ("PC (reverse diffusion + Langevin)", BUDGETS[1:] + SLOW, lambda sf, sde, sh, nfe, g: S.pc_sample(sf, sde, sh, nfe // 2, generator=g, dtype=F64)),
        ("Heun in t (heun_sample)", BUDGETS[1:] + SLOW[:2], lambda sf, sde, sh, nfe, g: S.heun_sample(sf, sde, sh, nfe // 2, generator=g, dtype=F64)),
        ("DDIM (ddim_sample)", BUDGETS + SLOW[:2], lambda sf, sde, sh, nfe, g: S.ddim_sample(sf, sde, sh, nfe, generator=g, dtype=F64)),
        ("DPM-Solver++ (dpm_solver_sample)", BUDGETS + SLOW[:1], lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(sf, sde, sh, nfe, generator=g, dtype=F64)),
        # the default before the linear part of Gaussian data (gaussian_std = 0, so lambda on [0.002, 80]) and
        # with the corrector from 20 steps: the same below 15 NFE
        ("DPM-Solver++, the default before (no linear part)", BUDGETS[2:] + SLOW[:1], lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(
            sf, sde, sh, nfe, gaussian_std=0.0, corrector=nfe >= 20, generator=g, dtype=F64)),
        # and the one before that, without the corrector
        ("DPM-Solver++, no linear part, no corrector", BUDGETS[3:] + SLOW[:1], lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(
            sf, sde, sh, nfe, gaussian_std=0.0, corrector=False, generator=g, dtype=F64)),
        ("EDM Heun (edm_sample)", BUDGETS[1:] + SLOW[:2], lambda sf, sde, sh, nfe, g: S.edm_sample(sf, sde, sh, nfe // 2, generator=g, dtype=F64)),
        # not a default: a grid that skips the high noise, without the corrector, which only exact scores
        # can afford (chapter 8, "A grid for exact scores only": it nearly triples a learned model's error)
        ("DPM-Solver++, lambda on [0.002, 7], no corrector (exact scores only)", BUDGETS[2:], lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(
            sf, sde, sh, nfe, ts=S.lambda_time_grid(sde, nfe, sigma_min=0.002, sigma_max=7.0, dtype=F64), corrector=False,
            gaussian_std=0.0, generator=g, dtype=F64)),
        # not a default either: the whole upper range (DPM-Solver's own grid), without the linear part and with the
        # corrector from 20 steps (the default before); for VE (sigma(T) = 50) the same as that default from 15 steps
        ("DPM-Solver++, lambda on [0.002, sigma(T)] (the whole upper range)", BUDGETS[2:], lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(
            sf, sde, sh, nfe, ts=S.lambda_time_grid(sde, nfe, sigma_min=0.002, dtype=F64), gaussian_std=0.0,
            corrector=nfe >= 20, generator=g, dtype=F64)),
    ]


def rk45_runs() -> List[Tuple[str, float, Run]]:
    return [("RK45 (ode_sample)", tol, lambda sf, sde, sh, nfe, g, tol=tol: S.ode_sample(sf, sde, sh, rtol=tol, atol=tol, generator=g, dtype=F64))
            for tol in (1e-1, 1e-2, 1e-3, 1e-4)]


# ----- ablation: the low-NFE details -------------------------------------------------------------------
def lms_sample(score_fn, sde, shape, n_steps, *, order=3, generator=None, dtype=F64, x_init=None):
    """Linear multistep (Adams-Bashforth) in ``sigma`` on ``dy/dsigma = (y - D)/sigma``, EDM grid.

    A prototype for the measurement only (k-diffusion's ``sample_lms``): the Lagrange polynomial
    through the last ``order`` slopes, integrated exactly over each step; one NFE per step.
    """
    grid = S.edm_time_grid(sde, n_steps, dtype=F64).tolist()
    alpha, sigma = S._marginals(sde, grid)
    nsr = [s / a for a, s in zip(alpha, sigma)]
    score = S.CountedScore(score_fn)
    D = S._data_prediction(score, sde)
    x = S._initial_state(sde, shape, x_init, generator, None, dtype)
    y, slopes = x / alpha[0], []
    for i in range(n_steps):
        slopes.insert(0, (y - D(alpha[i] * y, grid[i], alpha[i], sigma[i])) / nsr[i])
        del slopes[order:]
        nodes = nsr[i: i - len(slopes): -1] if i - len(slopes) >= 0 else nsr[i::-1][: len(slopes)]
        V = np.vander(np.array(nodes) - nsr[i], len(nodes), increasing=True)
        h = nsr[i + 1] - nsr[i]
        moments = np.array([h ** (k + 1) / (k + 1) for k in range(len(nodes))])
        w = moments @ np.linalg.inv(V)
        y = y + sum(float(wj) * dj for wj, dj in zip(w, slopes))
    return S._finished(alpha[-1] * y, score.nfe, "lms_sample")


def ablation_samplers() -> List[Tuple[str, Tuple[int, ...], Run]]:
    lam_sde = lambda sde, n: S.lambda_time_grid(sde, n, dtype=F64)  # noqa: E731  (SDE's own range)
    grids = {
        "lambda on [0.002, 80]": lambda sde, n: S.lambda_time_grid(sde, n, sigma_min=0.002, sigma_max=80.0, dtype=F64),
        "lambda on [0.01, 80]": lambda sde, n: S.lambda_time_grid(sde, n, sigma_min=0.01, sigma_max=80.0, dtype=F64),
        "lambda on [0.03, 60]": lambda sde, n: S.lambda_time_grid(sde, n, sigma_min=0.03, sigma_max=60.0, dtype=F64),
        "lambda, SDE's range": lam_sde,
        "EDM rho = 7": lambda sde, n: S.edm_time_grid(sde, n, dtype=F64),
        "uniform t": lambda sde, n: S.time_grid(sde, n, dtype=F64),
    }
    b = (5, 10, 15, 20, 25, 35)
    out = [("DPM-Solver++ default (2M below 10 steps; from 10, 3M below sigma/alpha = 3 and 2M above; [0.03, 60] below 15 steps; "
            "corrector from 20)", b, lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(sf, sde, sh, nfe, generator=g, dtype=F64)),
           ("default without the corrector", b, lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(
               sf, sde, sh, nfe, corrector=False, generator=g, dtype=F64)),
           ("default with the corrector at every N", b, lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(
               sf, sde, sh, nfe, corrector=True, generator=g, dtype=F64)),
           ("3M throughout on the default grid", b, lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(
               sf, sde, sh, nfe, order=3, generator=g, dtype=F64))]
    for gname, gf in grids.items():
        out.append((f"3M, {gname}", b, lambda sf, sde, sh, nfe, g, gf=gf: S.dpm_solver_sample(
            sf, sde, sh, nfe, order=3, ts=gf(sde, nfe), generator=g, dtype=F64)))
    for gname, gf in grids.items():
        out.append((f"DDIM, {gname}", b, lambda sf, sde, sh, nfe, g, gf=gf: S.ddim_sample(
            sf, sde, sh, nfe, ts=gf(sde, nfe), generator=g, dtype=F64)))
    for gname, gf in grids.items():
        out.append((f"EDM Heun, {gname}", b[1:], lambda sf, sde, sh, nfe, g, gf=gf: S.edm_sample(
            sf, sde, sh, nfe // 2, ts=gf(sde, nfe // 2), generator=g, dtype=F64)))
    out += [
        ("2M", b, lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(sf, sde, sh, nfe, order=2, generator=g, dtype=F64)),
        ("2S (singlestep, order schedule)", b, lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(
            sf, sde, sh, len(S.dpm_solver_orders(nfe, 2)), order=S.dpm_solver_orders(nfe, 2), multistep=False, generator=g, dtype=F64)),
        ("3S (singlestep, order schedule)", b, lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(
            sf, sde, sh, len(S.dpm_solver_orders(nfe, 3)), order=S.dpm_solver_orders(nfe, 3), multistep=False, generator=g, dtype=F64)),
        ("3S, uniform t (DPM-Solver-fast)", b, lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(
            sf, sde, sh, len(S.dpm_solver_orders(nfe, 3)), order=S.dpm_solver_orders(nfe, 3), multistep=False,
            ts=S.time_grid(sde, len(S.dpm_solver_orders(nfe, 3)), dtype=F64), generator=g, dtype=F64)),
        # the default's short-grid form at every N, and the short range it replaced
        ("3M, lambda on [0.03, 60], first-order last step at every N", b + (50,), lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(
            sf, sde, sh, nfe, order=S._solver_orders(None, nfe, True, True)[:-1] + [1],
            ts=grids["lambda on [0.03, 60]"](sde, nfe), generator=g, dtype=F64)),
        ("3M, lambda on [0.01, 80], first-order last step at every N", b + (50,), lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(
            sf, sde, sh, nfe, order=S._solver_orders(None, nfe, True, True)[:-1] + [1],
            ts=grids["lambda on [0.01, 80]"](sde, nfe), generator=g, dtype=F64)),
        ("3M, no lower-order final steps", b, lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(
            sf, sde, sh, nfe, order=3, lower_order_final=False, generator=g, dtype=F64)),
        ("3M, N - 1 steps + final x0_hat", b, lambda sf, sde, sh, nfe, g: S.dpm_solver_sample(
            sf, sde, sh, nfe - 1, order=3, denoise=True, generator=g, dtype=F64)),
        ("DDIM, eta = 1 (stochastic)", b, lambda sf, sde, sh, nfe, g: S.ddim_sample(sf, sde, sh, nfe, eta=1.0, generator=g, dtype=F64)),
        ("DDIM, N - 1 steps + final x0_hat", b, lambda sf, sde, sh, nfe, g: S.ddim_sample(sf, sde, sh, nfe - 1, denoise=True, generator=g, dtype=F64)),
        ("EDM Heun + final Euler to sigma = 0 (EDM's last step)", b, lambda sf, sde, sh, nfe, g: S.edm_sample(
            sf, sde, sh, (nfe - 1) // 2, denoise=True, generator=g, dtype=F64)),
        ("EDM stochastic, S_churn = 1", b[1:], lambda sf, sde, sh, nfe, g: S.edm_sample(sf, sde, sh, nfe // 2, S_churn=1.0, generator=g, dtype=F64)),
        ("EDM stochastic, S_churn = 5", b[1:], lambda sf, sde, sh, nfe, g: S.edm_sample(sf, sde, sh, nfe // 2, S_churn=5.0, generator=g, dtype=F64)),
        ("LMS (Adams-Bashforth in sigma, order 3)", b, lambda sf, sde, sh, nfe, g: lms_sample(sf, sde, sh, nfe, generator=g)),
    ]
    return out


# ----- running and printing ------------------------------------------------------------------------------
def measure(run: Run, sf, sde, n: int, nfe: int, seeds: int, meas: ExactMeasures):
    vals, nfes = [], []
    for s in range(seeds):
        x, used = run(sf, sde, (n, 2), nfe, torch.Generator().manual_seed(s))
        vals.append(meas(x))
        nfes.append(used)
    return summary(vals), float(np.mean(nfes))


def at_floor_from(results):
    """``results``: ``(nfe used, at the floor on all three measures)`` from the smallest budget up.
    The NFE from which every later budget is at the floor (one off it starts the count again), or None."""
    first = None
    for used, ok in results:
        first = (first or used) if ok else None
    return first


def fmt_cell(mean, se, floor_ed, ok) -> str:
    if not np.isfinite(mean[2]):
        return "diverged"
    r = mean[2] / floor_ed
    s = f"{r:.3g}" if r < 100 else f"{r:.2e}"
    return s + (" ✓" if all(ok) else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--seeds", type=int, default=None, help="default 8 (main), 4 (--ablation)")
    parser.add_argument("--ablation", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = args.seeds or (4 if args.ablation else 8)
    sdes = {"VP": VPSDE, "sub-VP": SubVPSDE, "VE": VESDE}
    if args.ablation:
        sdes["VE, exact_variance=False"] = lambda: VESDE(exact_variance=False)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    n = args.n
    print(f"Exact scores, n = {n} samples, {seeds} seeds (float64, 1 thread). Measures against the mixture "
          f"itself; 'floor' = exact samples.\n")
    summary_rows: Dict[str, Dict[str, str]] = {}
    for mname, gmm in mixtures().items():
        meas = ExactMeasures(gmm)
        # The floor from 4x as many draws as the samplers get seeds: its noise is then small.
        fl_mean, fl_se = summary([meas(gmm.sample(n, torch.Generator().manual_seed(10_000 + s), dtype=F64))
                                  for s in range(4 * seeds)])
        ed_floor = meas.e_yy / n  # E of the energy distance of n exact samples (the diagonal)
        print(f"## Mixture '{mname}'\n")
        print(f"floor (exact samples, {4 * seeds} draws of n): "
              + "; ".join(f"{m} {a:.2e} ± {b:.1e}" for m, a, b in zip(MEASURES, fl_mean, fl_se))
              + f" (exactly: 0 and E|X - X'| / n = {ed_floor:.2e})\n")
        for sname, make in sdes.items():
            sde = make()
            sf = exact_score_fn(gmm, sde)
            samplers = ablation_samplers() if args.ablation else main_samplers()
            cols = list(BUDGETS) + ([] if args.ablation else list(SLOW))
            detail = []
            print(f"### {mname}, {sname}: energy distance / E|X - X'|/n at each NFE budget (✓: all three measures at the floor)\n")
            print("| sampler | " + " | ".join(str(c) for c in cols) + " | at floor from NFE |")
            print("| --- | " + " | ".join("---:" for _ in cols) + " | ---: |")
            for name, budgets, run in samplers:
                cells, results = {}, []
                for nfe in budgets:
                    (mean, se), used = measure(run, sf, sde, n, nfe, seeds, meas)
                    ok = at_floor(mean, se, fl_mean, fl_se, ed_floor)
                    cells[nfe] = fmt_cell(mean, se, ed_floor, ok)
                    results.append((int(used), all(ok)))
                    if nfe in (10, 20):
                        detail.append((name, int(used), mean, se, ok))
                first = at_floor_from(results)
                print(f"| {name} | " + " | ".join(cells.get(c, "") for c in cols) + f" | {first or '-'} |", flush=True)
                summary_rows.setdefault(name, {})[f"{mname}, {sname}"] = str(first or f"> {max(budgets)}")
            if not args.ablation:  # the adaptive solver: NFE follows from the tolerance
                key, rk, results = f"{mname}, {sname}", [], []
                for name, tol, run in rk45_runs():  # tolerances from loose to tight
                    (mean, se), used = measure(run, sf, sde, n, 0, seeds, meas)
                    ok = at_floor(mean, se, fl_mean, fl_se, ed_floor)
                    rk.append(f"{tol:g}: {used:.0f} NFE, {fmt_cell(mean, se, ed_floor, ok)}")
                    results.append((f"{used:.0f}", all(ok)))
                summary_rows.setdefault(name, {})[key] = at_floor_from(results) or "> tol 1e-4"
                print(f"\nRK45 (ode_sample), rtol = atol = " + "; ".join(rk))
            print(f"\n{mname}, {sname}: the three measures at 10 and 20 NFE (mean ± standard error; ✓ at the floor)\n")
            print("| sampler | NFE | " + " | ".join(MEASURES) + " |")
            print("| --- | ---: | ---: | ---: | ---: |")
            print("| exact samples (floor) | - | " + " | ".join(f"{a:.2e} ± {b:.1e}" for a, b in zip(fl_mean, fl_se)) + " |")
            for name, used, mean, se, ok in sorted(detail, key=lambda r: r[1]):
                print(f"| {name} | {used} | " + " | ".join(f"{a:.2e} ± {b:.1e}{' ✓' if o else ''}" for a, b, o in zip(mean, se, ok)) + " |")
            print(flush=True)
    cases = [f"{m}, {s}" for m in mixtures() for s in sdes]
    print("## The NFE from which on each sampler stays at the floor on all three measures\n")
    print("| sampler | " + " | ".join(cases) + " |")
    print("| --- | " + " | ".join("---:" for _ in cases) + " |")
    for name, row in summary_rows.items():
        print(f"| {name} | " + " | ".join(row.get(c, "") for c in cases) + " |")
    print(f"\nruntime: {time.process_time() - cpu_start:.0f} s of CPU time, "
          f"{time.perf_counter() - t_start:.0f} s of wall-clock time")


if __name__ == "__main__":
    main()
