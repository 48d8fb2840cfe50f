"""`study collect`: one tidy row per point (CSV) from the point records and what each run left (summary.json,
Megatron's TensorBoard events)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from xlstm_megatron.runs.errors import ConfigError
from xlstm_megatron.studies.runner import point_dir, point_status

COLUMNS = (
    "point", "family", "size", "num_layers", "hidden_size", "num_attention_heads", "params_total",
    "params_non_embedding", "tokens", "flops", "flop_budget", "lr", "train_iters", "status", "final_valid_loss",
    "best_valid_loss", "final_train_loss", "tokens_per_s", "wall_s", "config_hash", "commit",
)
TEXT_COLUMNS = {"point", "family", "size", "status", "config_hash", "commit"}


def _iteration_seconds(tensorboard_dir: Path) -> list[float]:
    """Megatron's per-iteration wall times (`--log-timers-to-tensorboard`: scalar 'iteration-time')."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tensorboard_dir.is_dir():
        return []
    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    if "iteration-time" not in events.Tags().get("scalars", []):
        return []
    by_step = {s.step: s.value for s in events.Scalars("iteration-time")}
    return [by_step[k] for k in sorted(by_step)]


def point_row(out: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    d = point_dir(out, record["id"])
    run = record["train"]
    iters = int(run["train_iters"])
    row: dict[str, Any] = {
        "point": record["id"], "family": record["family"], "size": record["size"],
        **{k: record["model"][k] for k in ("num_layers", "hidden_size", "num_attention_heads")},
        "params_total": record["params_total"], "params_non_embedding": record["params_non_embedding"],
        "tokens": record["tokens"], "flops": record["flops"], "flop_budget": record.get("flop_budget"),
        "lr": record["lr"], "train_iters": iters, "status": point_status(out, record["id"], iters),
        "config_hash": record["config_hash"],
    }
    attempts = record.get("attempts", [])
    row["wall_s"] = round(sum(a["wall_s"] for a in attempts), 1) if attempts else None
    row["commit"] = attempts[-1]["commit"] if attempts else None
    summary_path = d / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        history = summary.get("history", {})
        valid = [v for _, v in history.get("valid", [])]
        train = [v for _, v in history.get("train", [])]
        row["final_valid_loss"] = valid[-1] if valid else None
        row["best_valid_loss"] = min(valid) if valid else None
        row["final_train_loss"] = train[-1] if train else None
    times = _iteration_seconds(d / "tensorboard")[1:]  # the first iteration carries start-up work
    if times:
        row["tokens_per_s"] = round(record["tokens"] / iters / statistics.median(times), 1)
    return {c: row.get(c) for c in COLUMNS}


def collect(out: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """Write OUT/results.csv (points in points.txt order); return its path and rows."""
    out = Path(out)
    listing = out / "points.txt"
    if not listing.is_file():
        raise ConfigError(f"{out} is not a study directory (no points.txt); run `xlstm-megatron study run` first")
    rows = []
    for pid in listing.read_text().split():
        record_path = point_dir(out, pid) / "point.json"
        if not record_path.is_file():
            raise ConfigError(f"{record_path} is missing; run `xlstm-megatron study run` again to rewrite it")
        rows.append(point_row(out, json.loads(record_path.read_text())))
    path = out / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path, rows


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """results.csv back as typed rows (numbers as floats, empty cells as None)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                if v in ("", None):
                    row[k] = None
                    continue
                row[k] = v if k in TEXT_COLUMNS else float(v)
            rows.append(row)
    return rows
