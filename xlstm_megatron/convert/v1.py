"""Official v1 `xLSTMLMModel` state dict (+ its config) -> a Megatron checkpoint of our v1 model.

The state dict is opened memory-mapped and mapped by `official.v1_to_megatron` (which swaps the sLSTM module names
`igate`/`fgate` back into their gate slots); our checkpoint's tensors are filled from it and saved weights-only at
TP=1/PP=1.
"""

from __future__ import annotations

from pathlib import Path

import torch

from xlstm_megatron.convert.errors import ConvertError
from xlstm_megatron.convert.megatron_io import (
    DEFAULT_SEQ_LENGTH,
    DTYPES,
    CheckpointParts,
    atomic_output_dir,
    check_tensors,
    converter_args,
    save_converted,
    single_process,
)
from xlstm_megatron.convert.official import v1_to_megatron
from xlstm_megatron.convert.v1_config import model_kwargs_from_v1, read_v1_config


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConvertError(f"--state-dict {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConvertError(f"cannot read {path} as a torch state dict: {e}".splitlines()[0]) from None
    for key in ("state_dict", "model"):  # training-script wrappers around the model's state dict
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConvertError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def v1_to_checkpoint(state_dict: Path, config: Path, out: Path, dtype: str = "fp32") -> None:
    """Convert an official v1 xLSTMLMModel state dict with its config (YAML/JSON) into checkpoint directory `out`."""
    state_dict, config, out = Path(state_dict), Path(config), Path(out)
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is unknown; use one of {sorted(DTYPES)}")
    model_kwargs, vocab, layout = model_kwargs_from_v1(read_v1_config(config))
    official = _read_state_dict(state_dict)
    try:
        ours = v1_to_megatron(official, layout.pattern, layout.mlstm_heads, layout.slstm_heads, layout.slstm_backend)
    except KeyError as e:
        raise ConvertError(f"{state_dict.name}: {e.args[0]}") from None
    except RuntimeError as e:  # a reshape that does not fit: shapes disagree with the config
        raise ConvertError(f"{state_dict.name} does not fit the config: {e}".splitlines()[0]) from None
    seq_length = layout.context_length if layout.context_length > 0 else DEFAULT_SEQ_LENGTH
    args = converter_args("v1", model_kwargs, vocab, dtype, seq_length=seq_length)
    with atomic_output_dir(out) as tmp, single_process():
        parts = CheckpointParts(args, DTYPES[dtype])
        check_tensors(parts.shapes, {n: tuple(t.shape) for n, t in ours.items()}, f"{state_dict.name} (mapped)")
        parts.fill(lambda name, start, stop: ours[name][start:stop])
        save_converted(tmp, parts, {"converted_from": f"xlstm-v1:{state_dict.name}"})
