"""The scaling-law fits recover known laws from synthetic losses; IsoFLOP minima and the frontier."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xlstm_megatron.studies.fit import fit_law, fit_study, frontier, isoflop_minima

TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al.'s fit


def _grid():
    N, D = np.meshgrid(np.geomspace(1e6, 1e10, 5), np.geomspace(1e8, 1e12, 5))
    N, D = N.ravel(), D.ravel()
    return N, D, TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"]


def test_fit_recovers_the_law_from_exact_losses():
    N, D, L = _grid()
    fit = fit_law(N, D, L)
    for name, value in TRUE.items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-5), name


def test_fit_with_noise_is_close_and_bootstrap_intervals_bracket_the_fit():
    N, D, L = _grid()
    noisy = L * np.exp(np.random.default_rng(0).normal(0, 0.003, L.shape))
    fit = fit_law(N, D, noisy, bootstrap=20, seed=1)
    for name, value in TRUE.items():
        assert getattr(fit, name) == pytest.approx(value, rel=0.1), name
        lo, hi = fit.intervals[name]
        assert lo <= getattr(fit, name) <= hi
    # the compute-optimal split of the law: N* ~ C^(beta/(alpha+beta)), and C = k N D holds
    n_opt, d_opt = fit.compute_optimal(np.array([1e20, 1e22]), k=6.0)
    assert math.log(n_opt[1] / n_opt[0]) / math.log(100) == pytest.approx(fit.beta / (fit.alpha + fit.beta))
    assert 6.0 * n_opt * d_opt == pytest.approx([1e20, 1e22])


def test_isoflop_minimum_is_the_parabola_vertex():
    # loss = 3 + 0.1 (log N - log 2e6)^2 at budget C; FLOPs per token = 6 N
    C = 1e15
    rows = [dict(params_non_embedding=n, loss=3 + 0.1 * (math.log(n) - math.log(2e6)) ** 2, flop_budget=C,
                 flops=C, tokens=C / (6 * n)) for n in (5e5, 1e6, 4e6, 8e6)]
    (m,) = isoflop_minima(rows, "params_non_embedding")
    assert m["N_opt"] == pytest.approx(2e6, rel=1e-6) and m["loss_opt"] == pytest.approx(3.0)
    assert m["D_opt"] == pytest.approx(C / (6 * 2e6), rel=1e-6) and m["inside"]


def test_frontier_and_study_fit_from_rows():
    rows = [dict(point=f"p{i}", family="f", size=f"s{n}", status="done", final_valid_loss=l, tokens=d,
                 params_non_embedding=n, flops=6 * n * d, flop_budget=None, lr=1e-3)
            for i, (n, d) in enumerate((n, d) for n in (1e6, 1e7, 1e8) for d in (1e8, 1e9, 1e10))
            for l in [TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]]]
    front = frontier([dict(r, loss=r["final_valid_loss"]) for r in rows])
    assert all(a["flops"] < b["flops"] and a["loss"] > b["loss"] for a, b in zip(front, front[1:], strict=False))
    fits = fit_study(rows, bootstrap=0)["families"]["f"]
    assert fits["law"]["alpha"] == pytest.approx(TRUE["alpha"], rel=1e-3)
    assert fits["flops_per_token_per_param"] == pytest.approx(6.0)
    assert not fits["law_underdetermined"] and fits["isoflop"] == []
