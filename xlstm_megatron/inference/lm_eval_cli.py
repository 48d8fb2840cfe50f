"""`xlstm-megatron lm-eval`: lm-evaluation-harness tasks on a checkpoint of ours.

    xlstm-megatron lm-eval --load runs/demo --tasks lambada_openai,hellaswag [--limit 100] [--output results.json]

Runs lm_eval's `simple_evaluate` with the "xlstm-megatron" model (`inference.lm_eval_adapter`; one process, TP 1)
and prints lm_eval's results table. `--include-path DIR` adds task YAML files of your own; tasks found there are
loaded without indexing lm_eval's ~15k built-in ones (which takes a while). Needs the optional `lm_eval` package:
pip install 'xlstm-megatron[eval]'.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from xlstm_megatron.data.tokenizer import TOKENIZER_TYPES
from xlstm_megatron.inference.lm_eval_adapter import ROLLING_MODES

INSTALL_HINT = "lm_eval is not installed; pip install 'xlstm-megatron[eval]'"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xlstm-megatron lm-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint directory (a run's --save, a converter's --out, or one "
                                                 "iter_* directory)")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    p.add_argument("--tasks", required=True, help="comma-separated lm_eval task names (globs allowed)")
    p.add_argument("--include-path", default=None, help="directory with task YAML files of your own")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward")
    p.add_argument("--max-length", type=int, default=None, help="context window (default: the run's --seq-length)")
    p.add_argument("--rolling", choices=ROLLING_MODES, default="windows",
                   help="loglikelihood_rolling of long documents: lm_eval's windows, or one recurrent pass")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="HuggingFaceTokenizer")
    p.add_argument("--tokenizer-model", default=None, help="default: the tokenizer the run trained with")
    p.add_argument("--output", default=None, help="write lm_eval's results (without per-sample logs) as JSON here")
    return p


def _task_manager(tasks: list[str], include_path: str | None) -> tuple[Any, list[str]]:
    """lm_eval's TaskManager that knows every requested task (the include path alone when it suffices), and the
    task names the requests match; raises ValueError naming the unknown ones."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local, local.match_tasks(tasks)
    manager = TaskManager(include_path=include_path)
    missing = [t for t in tasks if not manager.match_tasks([t])]
    if missing:
        raise ValueError(f"unknown lm_eval task(s) {', '.join(missing)}; check --tasks (or --include-path)")
    return manager, manager.match_tasks(tasks)


def results_table(results: dict[str, Any], column: str = "results") -> str:
    """lm_eval's results table (its columns), as Markdown. Written here because lm_eval's `make_table` needs
    pytablewriter >= 0.39 for its headers, and the pinned python-dateutil 4 leaves pip only pytablewriter 0.38."""
    header = ["Tasks", "Version", "Filter", "n-shot", "Metric", "Value", "Stderr"]
    rows = []
    for name, metrics in results.get(column, {}).items():
        for key, value in metrics.items():
            metric, _, filter_ = key.partition(",")
            if not filter_ or metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_}", "")
            rows.append([metrics.get("alias", name), results.get("versions", {}).get(name, ""), filter_,
                         results.get("n-shot", {}).get(name, ""), metric, value, stderr])
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _limit(value: float | None) -> int | float | None:
    return int(value) if value is not None and value >= 1 else value


def lm_eval_main(argv: list[str] | None = None) -> int:
    """Evaluate; returns the exit code (2 with one `error:` line for bad input or a missing lm_eval)."""
    from xlstm_megatron.data.errors import DataConfigError
    from xlstm_megatron.inference.loading import resolve_checkpoint
    from xlstm_megatron.runs.errors import ConfigError

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)  # stdout is the results table's
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        try:
            import lm_eval
            from lm_eval.utils import handle_non_serializable
        except ImportError as e:
            raise ConfigError(INSTALL_HINT) from e
        from xlstm_megatron.inference.lm_eval_adapter import XLSTMMegatronLM

        resolve_checkpoint(args.load, args.iteration, tensor_parallel=1)  # a bad --load fails before lm_eval's work
        if args.include_path and not Path(args.include_path).is_dir():
            raise ConfigError(f"--include-path {args.include_path} is not a directory")
        if args.limit is not None and args.limit <= 0:
            raise ConfigError(f"--limit must be > 0, got {args.limit}")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        manager, task_names = _task_manager(tasks, args.include_path)
        lm = XLSTMMegatronLM(args.load, iteration=args.iteration, batch_size=args.batch_size,
                             max_length=args.max_length, rolling=args.rolling, seed=args.seed,
                             tokenizer_model=args.tokenizer_model, tokenizer_type=args.tokenizer_type)
    except (ConfigError, DataConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from xlstm_megatron.runs.launch import shutdown_parallel

    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=task_names, task_manager=manager, limit=_limit(args.limit),
                                          num_fewshot=args.num_fewshot, log_samples=False)
    finally:
        shutdown_parallel()
    print(results_table(results))
    if results.get("groups"):
        print(results_table(results, "groups"))
    if args.output:
        out = {k: v for k, v in results.items() if k != "samples"}
        Path(args.output).write_text(json.dumps(out, indent=2, default=handle_non_serializable))
    return 0


if __name__ == "__main__":
    sys.exit(lm_eval_main())
