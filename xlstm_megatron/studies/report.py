"""`study fit`'s outputs: PNG plots (loss against FLOPs with each family's frontier, IsoFLOP curves, the fitted laws)
and a short markdown report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(families: list[str]) -> dict[str, Any]:
    plt = _plt()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {f: cycle[i % len(cycle)] for i, f in enumerate(families)}


def plot_frontier(rows: list[dict[str, Any]], fits: dict[str, Any], path: Path) -> Path:
    """Validation loss against training FLOPs: every finished point, each family's frontier as a line."""
    plt = _plt()
    fams = sorted(fits["families"])
    colors = _colors(fams)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for f in fams:
        mine = [r for r in rows if r["family"] == f]
        ax.scatter([r["flops"] for r in mine], [r["loss"] for r in mine], s=18, alpha=0.45, color=colors[f])
        front = [r for r in mine if r["point"] in set(fits["families"][f]["frontier"])]
        front.sort(key=lambda r: r["flops"])
        ax.plot([r["flops"] for r in front], [r["loss"] for r in front], "o-", color=colors[f], label=f)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("loss against compute; lines: each family's frontier")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def plot_law(rows: list[dict[str, Any]], fits: dict[str, Any], path: Path) -> Path | None:
    """Per family: loss against tokens for each model size, points and the fitted law's curves."""
    plt = _plt()
    fams = [f for f in sorted(fits["families"]) if fits["families"][f].get("law")]
    if not fams:
        return None
    key = fits["params"]
    fig, axes = plt.subplots(1, len(fams), figsize=(4.2 * len(fams), 3.8), squeeze=False)
    for ax, f in zip(axes[0], fams, strict=True):
        law = fits["families"][f]["law"]
        mine = [r for r in rows if r["family"] == f]
        sizes = sorted({r[key] for r in mine})
        colors = _colors([str(n) for n in sizes])
        d = np.geomspace(min(r["tokens"] for r in mine) / 1.5, max(r["tokens"] for r in mine) * 1.5, 50)
        for n in sizes:
            at = [r for r in mine if r[key] == n]
            ax.scatter([r["tokens"] for r in at], [r["loss"] for r in at], color=colors[str(n)], s=20)
            pred = law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]
            ax.plot(d, pred, color=colors[str(n)], label=f"N={n:.3g}")
        ax.set_xscale("log")
        ax.set_xlabel("tokens")
        ax.set_title(f"{f}: E={law['E']:.2f} a={law['alpha']:.2f} b={law['beta']:.2f}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("final validation loss")
    return _save(fig, path)


def plot_isoflop(rows: list[dict[str, Any]], fits: dict[str, Any], path: Path) -> Path | None:
    """Per family: loss against N at each FLOP budget, the parabola and its minimum."""
    plt = _plt()
    fams = [f for f in sorted(fits["families"]) if any(r.get("flop_budget") for r in rows if r["family"] == f)]
    if not fams:
        return None
    key = fits["params"]
    fig, axes = plt.subplots(1, len(fams), figsize=(4.2 * len(fams), 3.8), squeeze=False)
    for ax, f in zip(axes[0], fams, strict=True):
        mine = [r for r in rows if r["family"] == f and r.get("flop_budget")]
        budgets = sorted({r["flop_budget"] for r in mine})
        colors = _colors([str(c) for c in budgets])
        minima = {m["flops"]: m for m in fits["families"][f]["isoflop"]}
        for C in budgets:
            at = [r for r in mine if r["flop_budget"] == C]
            ax.scatter([r[key] for r in at], [r["loss"] for r in at], color=colors[str(C)], s=20, label=f"C={C:.2g}")
            if C in minima:
                c2, c1, c0 = minima[C]["parabola"]
                x = np.linspace(math.log(min(r[key] for r in at)), math.log(max(r[key] for r in at)), 40)
                ax.plot(np.exp(x), c2 * x**2 + c1 * x + c0, color=colors[str(C)])
                ax.plot([minima[C]["N_opt"]], [minima[C]["loss_opt"]], "k*", ms=9)
        ax.set_xscale("log")
        ax.set_xlabel(f"parameters ({key.removeprefix('params_')})")
        ax.set_title(f"{f}: IsoFLOP curves", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("final validation loss")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _ci(law: dict[str, Any], name: str, fmt: str) -> str:
    value = format(law[name], fmt)
    iv = (law.get("intervals") or {}).get(name)
    return f"{value} [{format(iv[0], fmt)}, {format(iv[1], fmt)}]" if iv else value


def markdown_report(study_name: str, rows: list[dict[str, Any]], all_rows: list[dict[str, Any]],
                    fits: dict[str, Any], plots: dict[str, Path | None]) -> str:
    key = fits["params"]
    lines = [f"# Study `{study_name}`", ""]
    done = sum(r.get("status") == "done" for r in all_rows)
    lines += [f"{done} of {len(all_rows)} points finished; fits use the final validation loss, the best learning "
              f"rate per (size, tokens), N = {key.removeprefix('params_').replace('_', '-')} parameters, "
              f"D = training tokens; intervals: 5-95% over {fits['bootstrap']} bootstrap resamples.", ""]
    for name, path in plots.items():
        if path is not None:
            lines.append(f"![{name}]({path.name})")
    lines += ["", "## Points on each family's loss-FLOPs frontier", "",
              "| family | point | parameters | tokens | FLOPs | valid loss |", "|---|---|---|---|---|---|"]
    by_id = {r["point"]: r for r in rows}
    for f, entry in sorted(fits["families"].items()):
        for pid in entry["frontier"]:
            r = by_id[pid]
            lines.append(f"| {f} | {pid} | {r[key]:,.0f} | {r['tokens']:,.0f} | {r['flops']:.3g} | {r['loss']:.4f} |")
    lines += ["", "## Fitted laws L(N, D) = E + A/N^alpha + B/D^beta", "",
              "| family | points | E | A | B | alpha | beta | N* ~ C^a | D* ~ C^b |", "|---" * 9 + "|"]
    notes = []
    for f, entry in sorted(fits["families"].items()):
        law = entry.get("law")
        if not law:
            lines.append(f"| {f} | {entry['envelope_points']} | - | - | - | - | - | - | - |")
            notes.append(f"- {f}: no law fit ({entry['law_missing']}).")
            continue
        opt = entry["law_optimal"]
        lines.append(f"| {f} | {law['n_points']} | {_ci(law, 'E', '.3f')} | {_ci(law, 'A', '.3g')} | "
                     f"{_ci(law, 'B', '.3g')} | {_ci(law, 'alpha', '.3f')} | {_ci(law, 'beta', '.3f')} | "
                     f"{opt['N_exponent']:.3f} | {opt['D_exponent']:.3f} |")
        if entry.get("law_underdetermined"):
            notes.append(f"- {f}: {law['n_points']} points for 5 parameters: the fit interpolates, it does not measure "
                         "(the intervals say how little is known).")
    lines += ["", *notes] if notes else []
    iso = [(f, e) for f, e in sorted(fits["families"].items()) if e["isoflop"]]
    lines += ["", "## IsoFLOP minima", ""]
    if not iso:
        lines.append("None: IsoFLOP minima need `budgets: {flops: [...]}` with at least three sizes per budget.")
    for f, entry in iso:
        for m in entry["isoflop"]:
            lines.append(f"- {f}, C = {m['flops']:.3g}: N* = {m['N_opt']:.3g}, D* = {m['D_opt']:.3g}, "
                         f"loss {m['loss_opt']:.4f}{'' if m['inside'] else ' (extrapolated: outside the sizes run)'}")
        for what in ("N", "D"):
            law = entry[f"isoflop_{what}"]
            if law:
                lines.append(f"- {f}: {what}*(C) = {law['coefficient']:.3g} C^{law['exponent']:.3f}")
    return "\n".join(lines) + "\n"
