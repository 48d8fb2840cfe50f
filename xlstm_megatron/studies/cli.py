"""`xlstm-megatron study`: scaling studies over the xLSTM families and the Transformer baseline.

    xlstm-megatron study run STUDY.yaml --out DIR [--local | --slurm-array | --torchrun] [--gpus N] [--dry-run]
    xlstm-megatron study point DIR POINT_ID     # one point (what the local runner and the cluster scripts call)
    xlstm-megatron study collect DIR            # DIR/results.csv
    xlstm-megatron study fit DIR [--params non_embedding|total] [--bootstrap N]   # fits, plots, DIR/report.md

`run` checks every point (flags, shapes, counts) before it trains anything; finished points are skipped and
half-finished ones resume from their checkpoints, so running it again continues a study.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from xlstm_megatron.runs.errors import ConfigError
from xlstm_megatron.studies.grid import ExtraArgsProvider

TrainFn = Callable[[list[str]], int]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlstm-megatron study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialise the grid and run it (or write cluster scripts)")
    run.add_argument("study")
    run.add_argument("--out", required=True, help="the study directory")
    how = run.add_mutually_exclusive_group()
    how.add_argument("--local", dest="how", action="store_const", const="local", help="one point after another here "
                     "(default)")
    how.add_argument("--slurm-array", dest="how", action="store_const", const="slurm",
                     help="write DIR/study.sbatch (one array task per point) and stop")
    how.add_argument("--torchrun", dest="how", action="store_const", const="torchrun",
                     help="write DIR/study_torchrun.sh (every point with torchrun on one node) and stop")
    run.add_argument("--gpus", type=int, default=8, help="GPUs per point in the cluster scripts")
    run.add_argument("--dry-run", action="store_true", help="list the points and their state; run nothing")
    point = sub.add_parser("point", help="train one point of a prepared study directory")
    point.add_argument("out")
    point.add_argument("point_id")
    collect = sub.add_parser("collect", help="write DIR/results.csv")
    collect.add_argument("out")
    fit = sub.add_parser("fit", help="fits, plots and DIR/report.md from the results")
    fit.add_argument("out")
    fit.add_argument("--params", choices=("non_embedding", "total"), default="non_embedding",
                     help="the N of the fits (non-embedding: Kaplan et al.; total: Hoffmann et al.)")
    fit.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the intervals (0: none)")
    return parser


def _run(ns: argparse.Namespace, extra: ExtraArgsProvider) -> int:
    from xlstm_megatron.studies.grid import load_study, materialise
    from xlstm_megatron.studies.runner import point_status, prepare, run_local, write_scripts

    study = load_study(ns.study)
    points = materialise(study, extra)  # every point checked before anything runs
    print(f"study {study.name}: {len(points)} points ({len(study.families)} families x {len(study.sizes)} sizes x "
          f"{len(study.budgets)} budgets x learning rates)")
    if ns.dry_run:
        for p in points:
            state = point_status(ns.out, p.id, int(p.train["train_iters"]))
            print(f"  {p.id}: {p.model['num_layers']} layers, E {p.model['hidden_size']}, {p.params_total:,} params "
                  f"({p.params_non_embedding:,} non-embedding), {p.tokens:,} tokens, {p.flops:.3g} FLOPs [{state}]")
        return 0
    prepare(ns.out, ns.study, points)
    if ns.how in ("slurm", "torchrun"):
        path = write_scripts(ns.out, study.name, len(points), ns.gpus, ns.how)
        launch = f"sbatch {path}" if ns.how == "slurm" else f"NPROC={ns.gpus} bash {path}"
        print(f"wrote {path}; start it with `{launch}`, then `xlstm-megatron study collect {ns.out}` and "
              f"`xlstm-megatron study fit {ns.out}`")
        return 0
    failed = run_local(ns.out, points)
    from xlstm_megatron.studies.results import collect

    path, _ = collect(ns.out)
    print(f"results: {path}" + (f"; {failed} points failed (their train.log says why)" if failed else ""))
    return 1 if failed else 0


def _fit(ns: argparse.Namespace) -> int:
    from xlstm_megatron.studies.fit import fit_study
    from xlstm_megatron.studies.report import markdown_report, plot_frontier, plot_isoflop, plot_law
    from xlstm_megatron.studies.results import collect, read_results

    out = Path(ns.out)
    path, _ = collect(out)
    all_rows = read_results(path)
    key = f"params_{ns.params}"
    rows = [dict(r, loss=r["final_valid_loss"]) for r in all_rows
            if r["status"] == "done" and r["final_valid_loss"] is not None]
    if not rows:
        raise ConfigError(f"{out} has no finished point yet; run the study first")
    fits = fit_study(all_rows, key, bootstrap=ns.bootstrap)
    (out / "fits.json").write_text(json.dumps(fits, indent=1))
    plots = {"loss against FLOPs": plot_frontier(rows, fits, out / "loss_vs_flops.png"),
             "fitted laws": plot_law(rows, fits, out / "law_fit.png"),
             "IsoFLOP curves": plot_isoflop(rows, fits, out / "isoflop.png")}
    name = Path(out).name
    study_file = out / "study.yaml"
    if study_file.is_file():
        import yaml

        name = (yaml.safe_load(study_file.read_text()) or {}).get("name") or name
    (out / "report.md").write_text(markdown_report(str(name), rows, all_rows, fits, plots))
    print(f"fits: {out / 'fits.json'}; report: {out / 'report.md'}; plots: "
          + ", ".join(str(p) for p in plots.values() if p is not None))
    return 0


def study_main(argv: list[str], train: TrainFn, extra_args_provider: ExtraArgsProvider = None) -> int:
    """The command; `train` (the training tier's command) and `extra_args_provider` (its flags, for checking the
    points' configs) are wired in by the CLI."""
    ns = _parser().parse_args(argv)
    try:
        if ns.command == "run":
            return _run(ns, extra_args_provider)
        if ns.command == "point":
            from xlstm_megatron.studies.runner import run_point

            return run_point(ns.out, ns.point_id, train)
        if ns.command == "collect":
            from xlstm_megatron.studies.results import collect

            path, rows = collect(ns.out)
            states = [r["status"] for r in rows]
            print(f"{path}: {len(rows)} points, " + ", ".join(f"{states.count(s)} {s}" for s in
                                                              ("done", "partial", "pending") if s in states))
            return 0
        return _fit(ns)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
