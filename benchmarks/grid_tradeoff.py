"""Exact scores against learned ones: what a time grid, solver order or corrector buys each, at 10 to 30 NFE.

DPM-Solver++'s default grid was chosen on exact scores (``samplers_vs_nfe.py``), where the only
error is the solver's, and its default order and corrector on both. This script puts the same
choices in front of learned models, where the network's error enters too, and prints both side by
side. Rows: the default (below 15 steps ``lambda`` uniform on ``sigma/alpha`` in ``[0.03, 60]``;
from 15 steps the linear part of Gaussian data of std 0.1 on
:func:`~minisgm.samplers.soft_lambda_grid`, with the UniPC-style corrector; from 10 steps
third-order multistep steps where a step starts at ``sigma/alpha <= 3``, second order above), the
default without the corrector and with it at every budget, its linear part on the grid before and
its grid without the linear part; the default before (no linear part, ``[0.002, 80]`` from 15
steps, the corrector from 20), without the corrector, and on its grid 3M and 2M throughout (no
corrector); and, without the linear part, fixed ranges for every budget: ``[0.002, 7]`` and
``[0.002, 10]`` (skip the high noise; without the corrector, and ``[0.002, 7]`` with it from 20)
and ``[0.002, sigma(T)/alpha(T)]`` (the whole upper range, as DPM-Solver's own logSNR grid, the
corrector from 20; for VE, whose ``sigma(T) = 50``, the default before from 15 steps).

- Exact scores (both mixtures of ``exact_measures``; VP, sub-VP, VE; 4000 samples, 8 seeds): how
  many of the six cases are at the true-sample floor on all three measures, and the largest
  mean log-density error.
- Learned scores, each against its own probability-flow ODE solved to ``rtol = atol = 1e-6``
  (1e-5 for the digits) from the same prior draws, so that only the solver's error is measured:
  chapter 8's digits model (a ``SmallUNet`` on the 8x8 digits, VP, 400 steps; 512 samples; also
  its Frechet distance to the test digits) and three 2-D score models on the 3-mode mixture
  (chapter 8's VP model, 800 steps, and VP and VE models trained for 2000 steps; 2000 samples).

    python benchmarks/grid_tradeoff.py

About 12 min of one core.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Tuple

import torch

from exact_measures import ExactMeasures, at_floor, mixtures, summary
from minisgm import samplers as S
from minisgm.data import GaussianMixture, exact_score_fn, load_digits
from minisgm.digit_features import digits_frechet_distance, digits_split
from minisgm.models import ScoreMLP, SmallUNet
from minisgm.score_matching import sde_loss
from minisgm.sde import SDE, SubVPSDE, VESDE, VPSDE

F64 = torch.float64
NFES = (10, 15, 20, 30)
Grid = Optional[Callable[[SDE, int], torch.Tensor]]


def fixed_range(sigma_min: float, sigma_max: Optional[float]) -> Grid:
    """``lambda`` uniform on ``sigma/alpha`` in ``[sigma_min, sigma_max]`` (``None``: up to ``sigma(T)/alpha(T)``)."""
    return lambda sde, n: S.lambda_time_grid(sde, n, sigma_min=sigma_min, sigma_max=sigma_max, dtype=F64)


def soft(sde: SDE, n: int) -> torch.Tensor:
    """The default's grid from 15 steps (:func:`minisgm.samplers.soft_lambda_grid`), at every budget."""
    return S.soft_lambda_grid(sde, n, dtype=F64)


Corrector = Optional[bool | int]  # None: the default's; a bool: as given; an int k: on from k steps


ROWS: Dict[str, Tuple[Grid, Optional[int], Corrector, Optional[float]]] = {
    # name: (grid or None for the default, order, corrector, gaussian_std (None: the default's))
    "default (from 15 steps: linear part of std 0.1, soft grid, corrector)": (None, None, None, None),
    "default without the corrector": (None, None, False, None),
    "default with the corrector at every N": (None, None, True, None),
    "linear part on lambda in [0.002, 80] instead of the soft grid": (fixed_range(0.002, 80.0), None, None, None),
    "soft grid without the linear part (corrector from 15)": (soft, None, 15, 0.0),
    "before: no linear part, [0.002, 80], corrector from 20": (None, None, 20, 0.0),
    "before, without the corrector": (None, None, False, 0.0),
    "before's grid, 3M": (None, 3, False, None),
    "before's grid, 2M": (None, 2, False, None),
    "[0.002, 7] (skips the high noise), no corrector": (fixed_range(0.002, 7.0), None, False, 0.0),
    "[0.002, 7] with the corrector from 20": (fixed_range(0.002, 7.0), None, 20, 0.0),
    "[0.002, 10], no corrector": (fixed_range(0.002, 10.0), None, False, 0.0),
    "[0.002, sigma(T)] (the whole upper range), corrector from 20": (fixed_range(0.002, None), None, 20, 0.0),
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def solve(score, sde: SDE, x_T: torch.Tensor, nfe: int, row: str) -> torch.Tensor:
    grid, order, corrector, gaussian_std = ROWS[row]
    ts = None if grid is None else grid(sde, nfe)
    if isinstance(corrector, int) and not isinstance(corrector, bool):
        corrector = nfe >= corrector
    with torch.no_grad():
        return S.dpm_solver_sample(score, sde, x_T.shape, nfe, ts=ts, order=order, corrector=corrector,
                                   gaussian_std=gaussian_std, x_init=x_T)[0]


def exact_table(seeds: int = 8, n: int = 4000) -> None:
    cases = []  # (measures, floor mean, floor se, energy-distance floor, sde, score)
    for gmm in mixtures().values():
        meas = ExactMeasures(gmm)
        fl_mean, fl_se = summary([meas(gmm.sample(n, gen(10_000 + s), dtype=F64)) for s in range(4 * seeds)])
        for sde in (VPSDE(), SubVPSDE(), VESDE()):
            cases.append((meas, fl_mean, fl_se, meas.e_yy / n, sde, exact_score_fn(gmm, sde)))
    print("## Exact scores: cases of 6 at the floor on all three measures; largest |log p - E log p| (nats)\n")
    print("| grid, order | " + " | ".join(f"{k} NFE" for k in NFES) + " |")
    print("| --- | " + " | ".join("---:" for _ in NFES) + " |")
    for row in ROWS:
        cells = []
        for nfe in NFES:
            n_ok, worst = 0, 0.0
            for meas, fl_mean, fl_se, ed_floor, sde, score in cases:
                vals = [meas(solve(score, sde, sde.prior_sample((n, 2), generator=gen(s), dtype=F64), nfe, row))
                        for s in range(seeds)]
                mean, se = summary(vals)
                n_ok += all(at_floor(mean, se, fl_mean, fl_se, ed_floor))
                worst = max(worst, abs(mean[1]))
            cells.append(f"{n_ok}/6, {worst:.3f}")
        print(f"| {row} | " + " | ".join(cells) + " |", flush=True)
    print()


def train_2d(sde: SDE, gmm: GaussianMixture, seed: int, steps: int):
    torch.manual_seed(seed)
    model = ScoreMLP(2, hidden=128, n_layers=3, marginal_std=lambda t: sde.marginal_coeffs(t)[1])
    opt, g = torch.optim.Adam(model.parameters(), lr=2e-3), gen(seed)
    for _ in range(steps):
        loss = sde_loss(model, sde, gmm.sample(256, generator=g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    return lambda x, t: model(x.float(), t.float()).to(x.dtype)


def train_digits(sde: SDE, train: torch.Tensor):
    """Chapter 8's digits model, with its seeds."""
    torch.manual_seed(0)
    unet = SmallUNet(base_channels=16, marginal_std=lambda t: sde.marginal_coeffs(t)[1])
    opt, g = torch.optim.Adam(unet.parameters(), lr=2e-3), gen(7)
    for _ in range(400):
        loss = sde_loss(unet, sde, train[torch.randint(0, len(train), (64,), generator=g)], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval().requires_grad_(False)


def mean_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).flatten(1).norm(dim=1).mean())


def learned_table() -> None:
    t0 = time.perf_counter()
    digits, _ = load_digits()
    train_idx, test_idx = digits_split()
    vp, ve = VPSDE(), VESDE()
    unet = train_digits(vp, 2 * digits[train_idx] - 1)
    gmm = mixtures()["3 modes"]
    models = {"2-D VP, 800 steps (ch. 8)": (vp, train_2d(vp, gmm, 12, 800)),
              "2-D VP, 2000": (vp, train_2d(vp, gmm, 21, 2000)),
              "2-D VE, 2000": (ve, train_2d(ve, gmm, 22, 2000))}
    print(f"## Learned scores, each against its own ODE solution (models trained in "
          f"{time.perf_counter() - t0:.0f} s)\n")
    to_unit = lambda y: ((y + 1) / 2).clamp(0, 1)  # noqa: E731
    test = digits[test_idx]
    x_T = vp.prior_sample((512, 1, 8, 8), generator=gen(8))
    with torch.no_grad():
        refs = {"digits": (vp, unet, x_T, S.ode_sample(unet, vp, x_T.shape, rtol=1e-5, atol=1e-5, x_init=x_T)[0])}
        for name, (sde, score) in models.items():
            x0 = sde.prior_sample((2000, 2), generator=gen(13), dtype=F64)
            refs[name] = (sde, score, x0, S.ode_sample(score, sde, x0.shape, rtol=1e-6, atol=1e-6, x_init=x0)[0])
    fd_ode = digits_frechet_distance(to_unit(refs["digits"][3]), test)
    fd_train = digits_frechet_distance(digits[train_idx[:512]], test)
    print(f"digits: Frechet distance of the ODE solution {fd_ode:.1f} (training digits: {fd_train:.1f})\n")
    print("Per NFE: digits Frechet distance (mean |x - x_ODE|) ; 2-D mean |x - x_ODE|: "
          + " | ".join(models) + "\n")
    print("| grid, order | " + " | ".join(f"{k} NFE" for k in NFES) + " |")
    print("| --- | " + " | ".join("---:" for _ in NFES) + " |")
    for row in ROWS:
        cells = []
        for nfe in NFES:
            sde, score, x0, ref = refs["digits"]
            x = solve(score, sde, x0, nfe, row)
            cell = f"{digits_frechet_distance(to_unit(x), test):.0f} ({mean_distance(x, ref):.2f}) ;"
            for name in models:
                sde, score, x0, ref = refs[name]
                cell += f" {mean_distance(solve(score, sde, x0, nfe, row), ref):.3f}"
            cells.append(cell)
        print(f"| {row} | " + " | ".join(cells) + " |", flush=True)
    print()


def main() -> None:
    torch.set_num_threads(1)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    exact_table()
    learned_table()
    print(f"runtime: {time.process_time() - cpu_start:.0f} s of CPU time, "
          f"{time.perf_counter() - t_start:.0f} s of wall-clock time")


if __name__ == "__main__":
    main()
