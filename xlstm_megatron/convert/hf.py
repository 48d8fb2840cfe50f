"""Hugging Face `xLSTMForCausalLM` directories <-> our checkpoints (xLSTM-Large family).

Import streams: our checkpoint's tensors (`CheckpointParts`, one copy of the weights in the target dtype) are filled
row range by row range straight from the safetensors files (`safe_open` slices, nothing else held), then saved as a
weights-only dist checkpoint at TP=1/PP=1 that runs of any TP/PP load (resharded).

Export loads our checkpoint (saved at any TP/PP) into the same parts at TP=1, in this process and in place, then
writes safetensors shard by shard (besides the weights, only one shard's concatenated tensors exist) and a
config.json that `xLSTMForCausalLM` loads offline. Values are copied bit for bit in both directions (no dtype change
unless --dtype asks for one). Peak memory is measured by `bench/convert_memory.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from xlstm_megatron.convert.errors import ConvertError
from xlstm_megatron.convert.hf_config import hf_config_from_model, hf_sizes, model_kwargs_from_hf
from xlstm_megatron.convert.hf_files import SafetensorsReader, read_config, write_safetensors
from xlstm_megatron.convert.large_map import TensorMap, large_tensor_map
from xlstm_megatron.convert.megatron_io import (
    DTYPES,
    CheckpointParts,
    atomic_output_dir,
    check_tensors,
    conversion_config,
    converter_args,
    load_checkpoint_parts,
    save_converted,
    single_process,
)
from xlstm_megatron.runs.checkpoint import resolve_checkpoint_dir, saved_args

DEFAULT_MAX_SHARD_BYTES = 2 * 10**9
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _check_parts(parts: CheckpointParts, tmap: TensorMap) -> None:
    check_tensors(tmap.ours, parts.shapes, "our model")


def hf_to_megatron(hf_dir: Path, out: Path, dtype: str | None = None) -> None:
    """Convert a Hugging Face xLSTM directory into a checkpoint directory `out` (must not exist). `dtype` of the saved
    weights: 'fp32' or 'bf16'; None keeps bf16 files bf16 and stores everything else as fp32."""
    hf_dir, out = Path(hf_dir), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is unknown; use one of {sorted(DTYPES)}")
    hf = read_config(hf_dir)
    model_kwargs, vocab = model_kwargs_from_hf(hf)
    sizes, mode = hf_sizes(hf)
    tmap = large_tensor_map(sizes, mode)
    reader = SafetensorsReader(hf_dir)
    check_tensors(tmap.theirs, reader.shapes, str(hf_dir))
    if dtype is None:
        dtype = "bf16" if set(reader.dtypes.values()) == {torch.bfloat16} else "fp32"

    def rows_of(name: str, start: int, stop: int) -> torch.Tensor:
        pieces = [reader.rows(theirs, a, b) for theirs, a, b in tmap.theirs_for_ours(name, start, stop)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    args = converter_args("large", model_kwargs, vocab, dtype)
    with atomic_output_dir(out) as tmp, single_process():
        parts = CheckpointParts(args, DTYPES[dtype])
        _check_parts(parts, tmap)
        parts.fill(rows_of)
        extra = {"hf_config": hf, "converted_from": f"huggingface:{hf_dir.name}"}
        save_converted(tmp, parts, extra)


def megatron_to_hf(
    ckpt: Path, out: Path, iteration: int | None = None, dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Convert a Megatron checkpoint of ours (a run's --save directory, its latest or `iteration`, or one iter_*
    directory; saved at any TP/PP) into a Hugging Face directory `out`. The model is the one the checkpoint's saved
    args define."""
    ckpt, out = Path(ckpt), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is unknown; use one of {sorted(DTYPES)}")
    path = resolve_checkpoint_dir(ckpt, iteration, flag="--ckpt")
    args = saved_args(path)
    with atomic_output_dir(out) as tmp, single_process():
        # Refuse what HF cannot hold before reading any weights.
        hf_config_from_model(conversion_config(args, torch.float32), 1, None)
        parts, common = load_checkpoint_parts(path, DTYPES.get(dtype or ""))
        extra = common.get("xlstm_extra") or {}
        hf: dict[str, Any] = hf_config_from_model(parts.config, args.padded_vocab_size, extra.get("hf_config"))
        hf["dtype"] = HF_DTYPE_NAMES[parts.dtype]
        sizes, mode = hf_sizes(hf)
        tmap = large_tensor_map(sizes, mode)
        _check_parts(parts, tmap)

        def make(name: str) -> torch.Tensor:
            pieces = [parts.rows(ours, a, b) for ours, a, b in tmap.ours_for_theirs(name)]
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

        itemsize = torch.empty((), dtype=parts.dtype).element_size()
        sizes_bytes = [(name, itemsize * int(torch.Size(shape).numel())) for name, shape in tmap.theirs.items()]
        write_safetensors(tmp, sizes_bytes, make, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
