"""Running a study's points: locally one after another, or as Slurm array / torchrun scripts for a cluster.

Layout of a study directory `OUT`:

    OUT/study.yaml                     the study file as run (a copy)
    OUT/points/<id>/point.yaml         the point's run config (`xlstm-megatron train --config` reads it)
    OUT/points/<id>/point.json         its identity: flags, config hash, counts, attempts (wall time, commit)
    OUT/points/<id>/...                the run itself (`--save` is the point's directory): Megatron checkpoints,
                                       tensorboard/, summary.json, train.log (local runs)
    OUT/points.txt                     point ids, one a line (the Slurm array index is the line number)

A point is `done` when its summary.json reports the last iteration, `partial` when it has a checkpoint but is not
done (the train command resumes from its `--save`), `pending` otherwise. A point whose directory was made for other
flags (config hash) is refused with one line rather than mixed into the results.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xlstm_megatron.runs.errors import ConfigError
from xlstm_megatron.studies.grid import Point

TrainFn = Callable[[list[str]], int]


def point_dir(out: str | Path, pid: str) -> Path:
    return Path(out) / "points" / pid


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def point_status(out: str | Path, pid: str, train_iters: int) -> str:
    """'done', 'partial' or 'pending' (see the module doc)."""
    from xlstm_megatron.runs.checkpoint import LATEST

    d = point_dir(out, pid)
    summary = _read_json(d / "summary.json")
    if summary and summary.get("iteration") is not None and summary["iteration"] >= train_iters:
        return "done"
    if (d / LATEST).is_file():
        return "partial"
    return "pending"


def git_commit() -> str:
    """The package's git commit (+ '-dirty' with uncommitted changes), or 'unknown' outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip()[:12] + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prepare(out: str | Path, study_path: str | Path, points: list[Point]) -> None:
    """Write every point's config and record (keeping the attempts of an existing one); refuse a point directory
    made for other flags."""
    import yaml

    out = Path(out)
    (out / "points").mkdir(parents=True, exist_ok=True)
    (out / "study.yaml").write_text(Path(study_path).read_text())
    for p in points:
        d = point_dir(out, p.id)
        old = _read_json(d / "point.json")
        if old is not None and old.get("config_hash") != p.config_hash:
            raise ConfigError(f"{d} was run with other flags (config hash {old.get('config_hash')} vs "
                              f"{p.config_hash} now); restore the study file or remove that directory")
        d.mkdir(parents=True, exist_ok=True)
        (d / "point.yaml").write_text(yaml.safe_dump(p.run_config(d.resolve()), sort_keys=False))
        record = {**p.record(), "attempts": (old or {}).get("attempts", [])}
        (d / "point.json").write_text(json.dumps(record, indent=1))
    (out / "points.txt").write_text("".join(p.id + "\n" for p in points))


def run_point(out: str | Path, pid: str, train: TrainFn) -> int:
    """`study point OUT ID`: train one point unless it is done (a partial one resumes from its checkpoints). Under
    torchrun / srun every rank calls this; rank 0 records the attempt (wall time, commit, outcome)."""
    d = point_dir(out, pid)
    record = _read_json(d / "point.json")
    if record is None:
        raise ConfigError(f"{d} has no point.json; run `xlstm-megatron study run STUDY --out {out}` first")
    iters = int(record["train"]["train_iters"])
    if point_status(out, pid, iters) == "done":
        print(f"{pid}: done already")
        return 0
    start, began = time.time(), point_status(out, pid, iters)
    rc = train(["--config", str(d / "point.yaml")])
    if int(os.environ.get("RANK", "0")) == 0:
        record = _read_json(d / "point.json") or record
        record.setdefault("attempts", []).append({
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start)), "from": began,
            "wall_s": round(time.time() - start, 2), "rc": rc, "commit": git_commit(),
            "status": point_status(out, pid, iters)})
        (d / "point.json").write_text(json.dumps(record, indent=1))
    return rc


def run_local(out: str | Path, points: list[Point], log: Callable[[str], None] = print) -> int:
    """Every point not done, one after another, each in its own process (`xlstm-megatron study point`): a crash
    or a Megatron exit leaves the others running. Returns the number of points that failed."""
    failed = 0
    todo = [p for p in points if point_status(out, p.id, int(p.train["train_iters"])) != "done"]
    log(f"{len(points) - len(todo)} of {len(points)} points done already; running {len(todo)}")
    for i, p in enumerate(todo, 1):
        d = point_dir(out, p.id)
        state = point_status(out, p.id, int(p.train["train_iters"]))
        start = time.time()
        with open(d / "train.log", "a") as f:
            proc = subprocess.run([sys.executable, "-m", "xlstm_megatron.cli", "study", "point", str(out), p.id],
                                  stdout=f, stderr=subprocess.STDOUT)
        summary = _read_json(d / "summary.json") or {}
        loss = summary.get("valid_loss")
        ok = loss is not None and not proc.returncode
        what = f"valid loss {loss:.4f}" if ok else f"FAILED (rc {proc.returncode}; see {d / 'train.log'})"
        log(f"[{i}/{len(todo)}] {p.id} ({state}): {what}, {time.time() - start:.0f} s")
        failed += proc.returncode != 0
    return failed


SLURM_TEMPLATE = """#!/bin/bash
# One array task per study point ({n} points): `sbatch {out}/study.sbatch`. Finished points exit at once, half-finished
# ones resume from their checkpoints, so resubmitting the same array is safe. Adapt the #SBATCH lines to the cluster.
#SBATCH --job-name={name}
#SBATCH --array=0-{last}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node={gpus}
#SBATCH --gres=gpu:{gpus}
#SBATCH --time=04:00:00
#SBATCH --output={out}/points/slurm-%A_%a.log
set -euo pipefail
cd {cwd}
ID=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {out}/points.txt)
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_PORT=$((29500 + SLURM_ARRAY_TASK_ID % 1000))
export CUDA_DEVICE_MAX_CONNECTIONS=1
srun {python} -m xlstm_megatron.cli study point {out} "$ID"   # one task per GPU: ranks from SLURM_PROCID
"""

TORCHRUN_TEMPLATE = """#!/bin/bash
# Every study point on this node, one after another ({n} points): `NPROC=8 bash {out}/study_torchrun.sh`.
# Finished points exit at once, half-finished ones resume from their checkpoints.
set -uo pipefail
cd {cwd}
NPROC=${{NPROC:-{gpus}}}
while read -r ID; do
  torchrun --nproc_per_node "$NPROC" -m xlstm_megatron.cli study point {out} "$ID" || echo "point $ID failed" >&2
done < {out}/points.txt
"""


def write_scripts(out: str | Path, name: str, n: int, gpus: int, which: str) -> Path:
    """The Slurm array script (`which='slurm'`) or the torchrun loop (`'torchrun'`) for the points of `out`."""
    out_abs = Path(out).resolve()
    fields = dict(n=n, last=n - 1, name=shlex.quote(name), gpus=gpus, out=shlex.quote(str(out_abs)),
                  cwd=shlex.quote(os.getcwd()), python=shlex.quote(sys.executable))
    path = out_abs / ("study.sbatch" if which == "slurm" else "study_torchrun.sh")
    path.write_text((SLURM_TEMPLATE if which == "slurm" else TORCHRUN_TEMPLATE).format(**fields))
    path.chmod(0o755)
    return path
