"""Sample quality versus number of score evaluations (NFE) on a 2-D Gaussian mixture.

The score is exact (:func:`minisgm.data.exact_score_fn`), so the only errors are the
sampler's: discretisation (EM, PC, Heun), solver tolerance (RK45) and the finite sample.
Quality is the squared energy distance (V-statistic) between N samples and N fresh true
samples, averaged over seeds; the "floor" row is the same statistic for true samples, i.e.
what a perfect sampler scores. Under that null the ratio to the floor varies from seed to
seed by roughly 0.4-2.5 for a single run, so rows within ~1.5x of the floor (averaged over 5
seeds) are indistinguishable from exact sampling. Runs in about 50 s of one core. Prints one
markdown table per SDE.

    python benchmarks/samplers_vs_nfe.py [--n-samples 2000] [--seeds 5]
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from minisgm import samplers as S
from minisgm.data import GaussianMixture, exact_score_fn
from minisgm.metrics import energy_distance
from minisgm.sde import VESDE, VPSDE

F64 = torch.float64


def mixture() -> GaussianMixture:
    return GaussianMixture([[-1.0, 0.5], [1.0, 0.5], [0.0, -1.0]], [0.25, 0.25, 0.3], [0.3, 0.3, 0.4])


def configs():
    yield "fresh true samples (same seeds)", "-", lambda sf, sde, shape, g: (mixture().sample(shape[0], g, dtype=F64), 0)
    for n in (10, 30, 100, 300, 1000):
        yield "Euler-Maruyama", f"n_steps={n}", lambda sf, sde, shape, g, n=n: S.euler_maruyama_sample(sf, sde, shape, n, generator=g, dtype=F64)
    for n in (5, 15, 50, 150, 500):
        yield "PC (reverse diffusion + Langevin, snr 0.16)", f"n_steps={n}", lambda sf, sde, shape, g, n=n: S.pc_sample(sf, sde, shape, n, generator=g, dtype=F64)
    per_sample = functools.partial(S.langevin_corrector_step, per_sample=True)
    yield "PC, per-sample snr step (see langevin_corrector_step)", "n_steps=150", lambda sf, sde, shape, g: S.pc_sample(sf, sde, shape, 150, corrector=per_sample, generator=g, dtype=F64)
    for tol in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        yield "ODE RK45 (dopri5)", f"rtol=atol={tol:g}", lambda sf, sde, shape, g, tol=tol: S.ode_sample(sf, sde, shape, rtol=tol, atol=tol, generator=g, dtype=F64)
    for n in (3, 5, 10, 20, 50, 100):
        yield "ODE Heun", f"n_steps={n}", lambda sf, sde, shape, g, n=n: S.heun_sample(sf, sde, shape, n, generator=g, dtype=F64)
    for n in (3, 5, 10, 20, 50):
        yield "ODE Heun, EDM grid (rho=7)", f"n_steps={n}", lambda sf, sde, shape, g, n=n: S.heun_sample(
            sf, sde, shape, n, generator=g, dtype=F64, ts=S.edm_time_grid(sde, n)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gmm, n = mixture(), args.n_samples
    y = gmm.sample(n, torch.Generator().manual_seed(10_000), dtype=F64)
    floors = [float(energy_distance(gmm.sample(n, torch.Generator().manual_seed(20_000 + s), dtype=F64), y)) for s in range(10)]
    floor = sum(floors) / len(floors)
    print(f"2-D mixture of 3 Gaussians, exact score, N = {n} samples, energy distance x 1e3 averaged over {args.seeds} seeds (float64, 1 thread).\n")
    for sde in (VPSDE(), VESDE()):
        sf = exact_score_fn(gmm, sde)
        print(f"### {type(sde).__name__}\n")
        print("| sampler | setting | NFE | energy distance (x1e3) | / floor | time (s) |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        print(f"| true samples (floor, 10 draws) | - | - | {1e3 * floor:.3f} | 1.00 | - |")
        for name, setting, run in configs():
            eds, nfes, t0 = [], [], time.perf_counter()
            for s in range(args.seeds):
                x, nfe = run(sf, sde, (n, 2), torch.Generator().manual_seed(s))
                eds.append(float(energy_distance(x, y)) if torch.isfinite(x).all() else float("inf"))
                nfes.append(nfe)
            ed = sum(eds) / len(eds)
            nfe_str = f"{nfes[0]}" if min(nfes) == max(nfes) else f"{sum(nfes) / len(nfes):.0f}"
            dt = (time.perf_counter() - t0) / args.seeds
            print(f"| {name} | {setting} | {nfe_str} | {1e3 * ed:.3f} | {ed / floor:.2f} | {dt:.2f} |")
        print()


if __name__ == "__main__":
    main()
