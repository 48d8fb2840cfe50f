"""Hugging Face model directories: config.json plus safetensors (one file or shards with an index), read row range by
row range and written shard by shard, so a conversion never holds a second copy of the model."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from xlstm_megatron.convert.errors import ConvertError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _safetensors():
    try:
        import safetensors
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConvertError("Hugging Face conversion needs the `safetensors` package: pip install safetensors") from None
    return safetensors


def read_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConvertError(f"{hf_dir} has no config.json; --hf-dir must be a saved Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{path} is not a JSON object")
    return config


class SafetensorsReader:
    """Tensor name -> file of an HF directory; shapes from the headers, data read per row range on demand."""

    def __init__(self, hf_dir: Path) -> None:
        self.dir = Path(hf_dir)
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConvertError(f"{index} is not a safetensors index (no weight_map)") from None
            files = {name: self.dir / file for name, file in weight_map.items()}
        elif (self.dir / SINGLE).is_file():
            files = None
        else:
            other = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = f" (found {other[0]}: re-save with safe_serialization=True)" if other else ""
            raise ConvertError(f"{self.dir} has neither {SINGLE} nor {INDEX}{hint}")
        missing = sorted({p.name for p in (files or {}).values() if not p.is_file()})
        if missing:
            raise ConvertError(f"{INDEX} names shard {missing[0]}, which is missing from {self.dir}")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.files: dict[str, Path] = {}
        st = _safetensors()
        for file in sorted(set((files or {SINGLE: self.dir / SINGLE}).values())):
            try:
                with st.safe_open(str(file), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                        sl = f.get_slice(name)
                        self.shapes[name] = tuple(sl.get_shape())
                        self.dtypes[name] = SAFETENSORS_DTYPES.get(sl.get_dtype())
                        self.files[name] = file
            except (OSError, st.SafetensorError) as e:  # truncated or corrupt file
                raise ConvertError(f"cannot read {file.name}: {e}".splitlines()[0]) from None
        if files is not None:
            absent = sorted(n for n, p in files.items() if self.files.get(n) != p)
            if absent:
                raise ConvertError(f"{INDEX} places {absent[0]!r} in {files[absent[0]].name}, which does not hold it")
        bad = sorted(n for n, d in self.dtypes.items() if d is None)
        if bad:
            raise ConvertError(f"tensor {bad[0]!r} has a dtype this converter does not read (use fp32/bf16/fp16)")

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (only they are read)."""
        with _safetensors().safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_slice(name)[start:stop]


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped in order into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[str]] = []
    used = 0
    for name, nbytes in sizes:
        if not shards or (used + nbytes > max_shard_bytes and shards[-1]):
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_safetensors(
    out_dir: Path, names: Iterable[tuple[str, int]], make: Callable[[str], torch.Tensor], max_shard_bytes: int
) -> list[Path]:
    """Write tensors (name, bytes) in shards, building each shard's tensors with `make(name)` only while that shard is
    written; an index json is written when there is more than one shard (HF's file naming)."""
    from safetensors.torch import save_file

    shards = plan_shards(list(names), max_shard_bytes)
    files = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    total = 0
    for file, shard in zip(files, shards, strict=True):
        tensors = {name: make(name).contiguous() for name in shard}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / f for f in files]


def parse_size(text: str) -> int:
    """'2GB', '500MB', '20KB' or a byte count -> bytes (decimal units, as Hugging Face's max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * mult)
    if t.isdigit():
        return int(t)
    raise ConvertError(f"--max-shard-size {text!r} is not a size; use e.g. 2GB, 500MB or a byte count")
