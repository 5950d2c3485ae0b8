"""Likelihood error versus number of function evaluations (NFE) on a 2-D Gaussian mixture.

With the exact score, the probability-flow ODE's ``log p_eps`` is known in closed form
(:func:`minisgm.data.exact_log_prob_fn` at ``t = eps``), so ``|ODE logp - exact logp|``
measures solver error (exact divergence) plus estimator noise (Hutchinson). At tight
tolerances the error stops at a floor set by the model, not the solver: ``log p_T`` is
replaced by the prior's ``N(0, prior_std^2)`` density, which differs slightly from the true
``p_T`` (prior mismatch). Runs in about 10 s of one core. Prints one markdown table per SDE.

    python benchmarks/likelihood_vs_nfe.py [--n-points 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from minisgm.data import GaussianMixture, exact_log_prob_fn, exact_score_fn
from minisgm.likelihood import log_likelihood
from minisgm.sde import VESDE, VPSDE

F64 = torch.float64


def mixture() -> GaussianMixture:
    return GaussianMixture([[-1.0, 0.5], [1.0, 0.5], [0.0, -1.0]], [0.25, 0.25, 0.3], [0.3, 0.3, 0.4])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-points", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gmm = mixture()
    x = gmm.sample(args.n_points, torch.Generator().manual_seed(0), dtype=F64)
    print(f"2-D mixture of 3 Gaussians, exact score, {args.n_points} data points, dopri5, float64, 1 thread; errors in nats.\n")
    rows = [("exact", None, 1, tol) for tol in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)]
    rows += [(f"Hutchinson {kind}", kind, k, 1e-5) for kind in ("gaussian", "rademacher") for k in (1, 4, 16)]
    for sde in (VPSDE(), VESDE()):
        sf = exact_score_fn(gmm, sde)
        exact = exact_log_prob_fn(gmm, sde)(x, sde.eps)
        print(f"### {type(sde).__name__} (eps = {sde.eps:g})\n")
        print("| divergence | probes | rtol=atol | NFE | mean abs err | max abs err | mean signed err | time (s) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for label, kind, k, tol in rows:
            t0 = time.perf_counter()
            logp, nfe = log_likelihood(sf, sde, x, rtol=tol, atol=tol, hutchinson=kind, n_probes=k, generator=torch.Generator().manual_seed(1))
            dt = time.perf_counter() - t0
            err = logp - exact
            probes = "-" if kind is None else str(k)
            print(f"| {label} | {probes} | {tol:g} | {nfe} | {float(err.abs().mean()):.2e} | {float(err.abs().max()):.2e} | {float(err.mean()):+.2e} | {dt:.2f} |")
        print()


if __name__ == "__main__":
    main()
