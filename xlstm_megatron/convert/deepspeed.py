"""DeepSpeed checkpoint (of `xlstm-megatron train --deepspeed`) -> our Megatron checkpoint (and from there to HF).

A DeepSpeed checkpoint holds, per tensor-parallel rank `r`, the module state (`mp_rank_XX_model_states.pt`, with our
run's Megatron args in its client state) and, under ZeRO, the fp32 master weights partitioned over the data-parallel
ranks (`zero_pp_rank_D_mp_rank_XX_optim_states.pt`). For each TP rank the full fp32 state dict is gathered with
DeepSpeed's own `zero_to_fp32` (stage 1/2/3) on that rank's files; then one process per TP rank builds the model at
the saved TP size, loads its gathered state dict and writes a weights-only Megatron checkpoint (dist format:
`convert megatron-to-hf`, `generate` and `train --load --finetune` reshard it to any TP/PP).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch

from xlstm_megatron.convert.errors import ConvertError

CLIENT_STATE_KEY = "xlstm_megatron"  # the training engine's key of our state in DeepSpeed's client state
_MP_FILE = re.compile(r"mp_rank_(\d+)_")


def _tag_dir(ckpt: Path, tag: str | None) -> Path:
    if not ckpt.is_dir():
        raise ConvertError(f"--ckpt {ckpt} does not exist; pass the run's --save directory")
    if tag is None:
        latest = ckpt / "latest"
        if not latest.is_file():
            raise ConvertError(f"{ckpt} has no DeepSpeed `latest` file; pass --tag global_stepN")
        tag = latest.read_text().strip()
    path = ckpt / tag
    if not path.is_dir():
        raise ConvertError(f"{path} does not exist; check --tag")
    return path


def _model_state_file(tag_dir: Path, mp_rank: int) -> Path:
    for name in (f"mp_rank_{mp_rank:02d}_model_states.pt", f"zero_pp_rank_0_mp_rank_{mp_rank:02d}_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise ConvertError(f"{tag_dir} has no model states of tensor-parallel rank {mp_rank}; "
                       "is it a DeepSpeed checkpoint?")


def read_run_state(tag_dir: Path) -> dict[str, Any]:
    """Our training state saved in the checkpoint's client state (iteration, Megatron args, ...)."""
    state = torch.load(_model_state_file(tag_dir, 0), map_location="cpu", weights_only=False)
    ours = state.get(CLIENT_STATE_KEY)
    if not isinstance(ours, dict) or not isinstance(ours.get("args"), Namespace):
        raise ConvertError(f"{tag_dir} was not written by `xlstm-megatron train --deepspeed` (no saved Megatron args)")
    if "zero_stage" not in ours:
        ours["zero_stage"] = int(state.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    return ours


def gathered_state_dict(tag_dir: Path, mp_rank: int, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of one tensor-parallel rank's module: DeepSpeed's `zero_to_fp32` over that rank's
    data-parallel partitions (it reads one model-parallel rank only: given a directory of links to rank `mp_rank`'s
    files named as rank 0's); the module state itself without ZeRO."""
    if zero_stage == 0:
        state = torch.load(_model_state_file(tag_dir, mp_rank), map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in state["module"].items() if torch.is_tensor(v)}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="xlstm_ds_export_"))
    try:
        view = tmp / tag_dir.name
        view.mkdir()
        for f in tag_dir.iterdir():
            m = _MP_FILE.search(f.name)
            if m and int(m.group(1)) == mp_rank:
                os.symlink(f.resolve(), view / _MP_FILE.sub("mp_rank_00_", f.name, count=1))
        return get_fp32_state_dict_from_zero_checkpoint(str(tmp), tag=tag_dir.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export_rank(tag_dir: Path, out: Path, run: dict[str, Any]) -> None:
    """One TP rank: build the model at the saved layout, load its gathered weights, write our checkpoint."""
    from xlstm_megatron.runs.checkpoint import save_weights_checkpoint, with_layout
    from xlstm_megatron.runs.launch import init_parallel
    from xlstm_megatron.runs.model import build_xlstm_model

    args = run["args"]
    tp = int(args.tensor_model_parallel_size)
    init_parallel(tp, 1, seed=args.seed)
    from megatron.core import parallel_state as ps

    layout = with_layout(args, tp, 1, None, bool(args.sequence_parallel))
    model = build_xlstm_model(layout)
    state = gathered_state_dict(tag_dir, ps.get_tensor_model_parallel_rank(), run["zero_stage"])
    own = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    missing, unknown = sorted(own - state.keys()), sorted(set(state) - own)
    if missing or unknown:
        raise ConvertError(f"{tag_dir}: the checkpoint does not match its saved architecture "
                           f"(missing {missing[:2]}, unexpected {unknown[:2]})")
    model.load_state_dict({k: state[k] for k in own}, strict=False)
    save_weights_checkpoint([model], out, int(run["iteration"]), layout)


def _worker(tag_dir: str, out: str, run: dict[str, Any]) -> None:
    from xlstm_megatron.runs.launch import shutdown_parallel

    try:
        _export_rank(Path(tag_dir), Path(out), run)
    finally:
        shutdown_parallel()


def deepspeed_to_megatron(ckpt: Path, out: Path, tag: str | None = None) -> Path:
    """Export a DeepSpeed checkpoint of our trainer to a weights-only Megatron checkpoint at `out` (refuses an
    existing `out`; written to a temporary directory next to it and renamed when complete)."""
    from xlstm_megatron.runs.launch import run_processes

    if importlib.util.find_spec("deepspeed") is None:
        raise ConvertError('reading DeepSpeed checkpoints needs DeepSpeed: pip install --no-build-isolation '
                           '"xlstm-megatron[deepspeed]"')
    if out.exists():
        raise ConvertError(f"--out {out} exists; choose a new directory")
    tag_dir = _tag_dir(Path(ckpt), tag)
    run = read_run_state(tag_dir)
    tp = int(run["args"].tensor_model_parallel_size)
    for r in range(tp):
        _model_state_file(tag_dir, r)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        run_processes(_worker, tp, args=(str(tag_dir), str(tmp), run))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
