"""Scaling-law fits of a study's results, per family.

- The parametric law L(N, D) = E + A / N^alpha + B / D^beta fitted as Hoffmann et al. (2022, Chinchilla, approach 3)
  do: minimise the Huber loss (delta 1e-3) between log L and log(exp(a - alpha log N) + exp(b - beta log D) + exp(e))
  with BFGS from the best starts of Chinchilla's initialisation grid, keep the best fit; intervals from a bootstrap
  over the points (each resample refit from the best initialisations of the full fit).
- IsoFLOP minima (approach 2): per FLOP budget with at least three model sizes, a parabola of the loss in log N; its
  vertex is the compute-optimal N at that budget, D follows from the budget and the FLOPs per token there. N*(C) and
  D*(C) are then power laws fitted through the minima (two budgets or more).
- The compute-optimal allocation implied by the parametric law, with C = k N D (k: the family's training FLOPs per
  token and parameter, the median over its points): N*(C) = G (C/k)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1 /
  (alpha + beta)), D*(C) = (C/k) / N*.
- The loss-FLOPs frontier: the points no other point of the family beats at equal or fewer FLOPs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

HUBER_DELTA = 1e-3
PARAMS = ("E", "A", "B", "alpha", "beta")
# Chinchilla's initialisation grid (a = log A, b = log B, e = log E): 4,500 starts. The objective is evaluated at
# all of them and BFGS runs from the STARTS best (a full BFGS from every start takes minutes on two busy cores).
INIT_GRID = dict(alpha=(0.0, 0.5, 1.0, 1.5, 2.0), beta=(0.0, 0.5, 1.0, 1.5, 2.0), e=(-1.0, -0.5, 0.0, 0.5, 1.0),
                 a=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0), b=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0))
STARTS = 8


@dataclass
class LawFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    n_points: int
    intervals: dict[str, tuple[float, float]] | None = None

    def loss(self, N: Any, D: Any) -> Any:
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    def compute_optimal(self, C: Any, k: float) -> tuple[Any, Any]:
        """(N*, D*) minimising the law at compute C = k N D."""
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        N = G * np.power(np.asarray(C, dtype=float) / k, self.beta / (self.alpha + self.beta))
        return N, np.asarray(C, dtype=float) / k / N

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _objective(theta: np.ndarray, x: np.ndarray, y: np.ndarray, log_l: np.ndarray, delta: float
               ) -> tuple[float, np.ndarray]:
    """Summed Huber loss of the log-space residuals and its gradient in theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    u = np.stack([a - alpha * x, b - beta * y, np.full_like(x, e)])
    top = u.max(axis=0)
    ex = np.exp(u - top)
    total = ex.sum(axis=0)
    r = top + np.log(total) - log_l  # log-sum-exp minus the observed log loss
    w = ex / total
    abs_r = np.abs(r)
    huber = np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta))  # scipy.special.huber's
    g = np.clip(r, -delta, delta)  # d huber / d r
    grad = np.array([(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(), -(g * w[0] * x).sum(),
                     -(g * w[1] * y).sum()])
    return float(huber.sum()), grad


def _minimise(x: np.ndarray, y: np.ndarray, log_l: np.ndarray, init: Sequence[float], delta: float
              ) -> tuple[float, np.ndarray]:
    from scipy.optimize import minimize

    # BFGS with the analytic gradient (Chinchilla used L-BFGS; scipy's L-BFGS-B spends milliseconds per step in
    # multi-threaded BLAS calls on busy cores, while this 5-parameter problem needs no limited memory)
    res = minimize(_objective, np.asarray(init, dtype=float), args=(x, y, log_l, delta), jac=True, method="BFGS",
                   options=dict(maxiter=2000, gtol=1e-10))
    return float(res.fun), res.x


def _inits() -> list[tuple[float, ...]]:
    g = INIT_GRID
    return [(a, b, e, al, be) for al, be, e, a, b in itertools.product(g["alpha"], g["beta"], g["e"], g["a"], g["b"])]


def fit_law(N: Sequence[float], D: Sequence[float], L: Sequence[float], delta: float = HUBER_DELTA,
            bootstrap: int = 0, seed: int = 0, inits: list[tuple[float, ...]] | None = None,
            keep_best: int = 2) -> LawFit:
    """Fit L = E + A/N^alpha + B/D^beta (module doc). `bootstrap` > 0 adds 90% percentile intervals per parameter
    from that many resamples of the points."""
    x, y, log_l = np.log(np.asarray(N, float)), np.log(np.asarray(D, float)), np.log(np.asarray(L, float))
    if not (len(x) == len(y) == len(log_l)) or len(x) < 2:
        raise ValueError("a law fit needs N, D and L of equal length, at least two points")
    grid = inits or _inits()
    if len(grid) > STARTS:
        at_start = [_objective(np.asarray(t, float), x, y, log_l, delta)[0] for t in grid]
        grid = [grid[i] for i in np.argsort(at_start)[:STARTS]]
    results = sorted((_minimise(x, y, log_l, init, delta) for init in grid), key=lambda r: r[0])
    best_obj, theta = results[0]
    fit = _law(theta, best_obj, len(x))
    if bootstrap:
        rng = np.random.default_rng(seed)
        starts = [tuple(t) for _, t in results[:keep_best]]
        samples = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(x), len(x))
            obj, th = min((_minimise(x[idx], y[idx], log_l[idx], s, delta) for s in starts), key=lambda r: r[0])
            samples.append(_law(th, obj, len(x)))
        fit.intervals = {
            name: (float(np.percentile([getattr(s, name) for s in samples], 5)),
                   float(np.percentile([getattr(s, name) for s in samples], 95)))
            for name in PARAMS}
    return fit


def _law(theta: np.ndarray, objective: float, n: int) -> LawFit:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return LawFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, objective=objective,
                  n_points=n)


# ---- IsoFLOP minima and the frontier ---------------------------------------------------------------------------


def isoflop_minima(rows: list[dict[str, Any]], params_key: str) -> list[dict[str, float]]:
    """Per FLOP budget (rows of one family with `flop_budget` set): the parabola in log N through the losses and its
    vertex. Budgets with fewer than three sizes, or whose parabola opens downwards, are left out."""
    out = []
    budgets = sorted({r["flop_budget"] for r in rows if r.get("flop_budget")})
    for C in budgets:
        at = [r for r in rows if r.get("flop_budget") == C]
        logn = np.log([r[params_key] for r in at])
        if len(set(np.round(logn, 9))) < 3:
            continue
        loss = np.array([r["loss"] for r in at])
        c2, c1, c0 = np.polyfit(logn, loss, 2)
        if c2 <= 0:
            continue
        x_opt = -c1 / (2 * c2)
        # FLOPs per token at N*: log-linear in log N through this budget's points
        s, i = np.polyfit(logn, np.log([r["flops"] / r["tokens"] for r in at]), 1)
        n_opt = math.exp(x_opt)
        out.append(dict(flops=float(C), N_opt=n_opt, D_opt=float(C / math.exp(s * x_opt + i)),
                        loss_opt=float(c0 + c1 * x_opt + c2 * x_opt**2), parabola=[float(c2), float(c1), float(c0)],
                        inside=bool(logn.min() <= x_opt <= logn.max())))
    return out


def power_law(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float] | None:
    """y = k x^a through the points in log space (None with fewer than two distinct x)."""
    if len(set(xs)) < 2:
        return None
    a, log_k = np.polyfit(np.log(xs), np.log(ys), 1)
    return {"exponent": float(a), "coefficient": float(math.exp(log_k))}


def frontier(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats with at most as many FLOPs (sorted by FLOPs)."""
    best, out = math.inf, []
    for r in sorted(rows, key=lambda r: (r["flops"], r["loss"])):
        if r["loss"] < best:
            best = r["loss"]
            out.append(r)
    return out


def lr_envelope(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (size, tokens): the learning rate with the lowest loss."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["size"], r["tokens"])
        if key not in best or r["loss"] < best[key]["loss"]:
            best[key] = r
    return list(best.values())


def fit_study(rows: list[dict[str, Any]], params_key: str = "params_non_embedding", bootstrap: int = 100,
              seed: int = 0) -> dict[str, Any]:
    """Every fit per family from results.csv rows (finished points, final validation loss, best LR per size and
    budget)."""
    done = [dict(r, loss=r["final_valid_loss"]) for r in rows
            if r.get("status") == "done" and r.get("final_valid_loss") is not None]
    families: dict[str, Any] = {}
    for family in sorted({r["family"] for r in done}):
        mine = [r for r in done if r["family"] == family]
        env = lr_envelope(mine)
        entry: dict[str, Any] = {"points": len(mine), "envelope_points": len(env),
                                 "frontier": [r["point"] for r in frontier(mine)]}
        k = float(np.median([r["flops"] / r["tokens"] / r[params_key] for r in env]))
        entry["flops_per_token_per_param"] = k
        distinct_n = len({r[params_key] for r in env})
        distinct_d = len({r["tokens"] for r in env})
        if distinct_n >= 2 and distinct_d >= 2:
            law = fit_law([r[params_key] for r in env], [r["tokens"] for r in env], [r["loss"] for r in env],
                          bootstrap=bootstrap, seed=seed)
            entry["law"] = law.as_dict()
            entry["law_underdetermined"] = len(env) <= len(PARAMS)  # no residual degree of freedom
            C = np.geomspace(min(r["flops"] for r in env), max(r["flops"] for r in env), 5)
            n_opt, d_opt = law.compute_optimal(C, k)
            entry["law_optimal"] = {"flops": C.tolist(), "N_opt": n_opt.tolist(), "D_opt": d_opt.tolist(),
                                    "N_exponent": law.beta / (law.alpha + law.beta),
                                    "D_exponent": law.alpha / (law.alpha + law.beta)}
        else:
            entry["law"] = None
            entry["law_missing"] = f"needs >= 2 sizes and >= 2 token counts (has {distinct_n} and {distinct_d})"
        minima = isoflop_minima(env, params_key)
        entry["isoflop"] = minima
        entry["isoflop_N"] = power_law([m["flops"] for m in minima], [m["N_opt"] for m in minima])
        entry["isoflop_D"] = power_law([m["flops"] for m in minima], [m["D_opt"] for m in minima])
        families[family] = entry
    return {"params": params_key, "huber_delta": HUBER_DELTA, "bootstrap": bootstrap, "families": families}
