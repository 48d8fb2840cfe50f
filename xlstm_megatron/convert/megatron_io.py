"""Our side of every conversion: a one-process Megatron context, our checkpoint's tensors at TP=1 (without building
a model in memory), and our checkpoint directories.

A converted checkpoint is saved once at TP=1/PP=1 from `XLSTMModel.sharded_state_dict()`; Megatron's distributed
checkpointing reshards it when a run of any TP/PP loads it. Its directory is what `xlstm-megatron train` writes:
`iter_0000000/` (weights only, see `training.checkpoint`), `latest_checkpointed_iteration.txt` and `run_config.yaml`
(the model section, plus the train settings that keep the vocabulary unpadded), usable as `train --config`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from xlstm_megatron.convert.errors import ConvertError

RUN_CONFIG = "run_config.yaml"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str) -> None:
    """The tensors of a checkpoint are exactly the expected names and shapes (one ConvertError line otherwise)."""
    missing = [n for n in expected if n not in found]
    if missing:
        raise ConvertError(f"{where} has no tensor {missing[0]!r} ({len(missing)} missing); is it this architecture?")
    unknown = sorted(set(found) - set(expected))
    if unknown:
        raise ConvertError(f"{where} has tensors the model does not have, e.g. {unknown[0]!r} ({len(unknown)} in all)")
    bad = [n for n, shape in expected.items() if tuple(found[n]) != shape]
    if bad:
        raise ConvertError(f"{where}: tensor {bad[0]!r} has shape {tuple(found[bad[0]])}, "
                           f"the config implies {expected[bad[0]]}")


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Megatron's parallel state at TP=PP=1 in this process (a gloo group of one, on a file store: no ports), torn
    down on exit; an existing process group of size 1 (a test worker) is used as it is."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from xlstm_megatron.compat import enable_megatron_cpu_compat, model_parallel_manual_seed

    own_group = not dist.is_initialized()
    store_dir = tempfile.mkdtemp(prefix="xlstm_convert_")
    try:
        if own_group:
            store = dist.FileStore(os.path.join(store_dir, "store"), 1)
            dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        if dist.get_world_size() != 1:
            raise ConvertError(f"conversion runs in one process, not {dist.get_world_size()}; run it without torchrun")
        if not torch.cuda.is_available():
            enable_megatron_cpu_compat()
        own_state = not ps.model_parallel_is_initialized()
        if own_state:
            ps.initialize_model_parallel(1, 1)
            model_parallel_manual_seed(0)
        try:
            yield
        finally:
            if own_state:
                ps.destroy_model_parallel()
            if own_group:
                dist.destroy_process_group()
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)


def model_config(block: str, model_kwargs: dict[str, Any], dtype: torch.dtype) -> Any:
    """The XLSTMConfig of a TP=1 model for conversion (parameters allocated, not initialised)."""
    from xlstm_megatron.compat import cpu_config_overrides
    from xlstm_megatron.layers.config import make_xlstm_config

    try:
        return make_xlstm_config(
            block, **model_kwargs, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
            params_dtype=dtype, perform_initialization=False, **cpu_config_overrides(),
        )
    except (ValueError, AssertionError, TypeError) as e:  # Megatron's own config checks are assertions
        raise ConvertError(f"our model cannot take these settings: {e}".splitlines()[0]) from None


@dataclass
class Part:
    """One tensor of our checkpoint: rows [start, start + rows) of our TP=1 parameter `param`."""

    sharded: Any
    """Its ShardedTensor; `.data` is a tensor of its own (not a view)."""
    param: str
    start: int

    @property
    def data(self) -> torch.Tensor:
        return self.sharded.data


class CheckpointParts:
    """Our checkpoint's model state for a TP=1/PP=1 model, as independent tensors.

    The keys and sharding come from `XLSTMModel.sharded_state_dict()` of a model built on the meta device (no
    memory), with its factories applied (fused in_proj -> q, k, v, o, i, f; GLU fc1 -> gate, up); each ShardedTensor
    then gets a tensor of its own. Megatron's writer clones every tensor that is a view of a larger one, so saving a
    real model's fused weights would briefly hold them twice; independent parts keep conversions at one copy.
    """

    def __init__(self, config: Any, vocab_size: int, dtype: torch.dtype) -> None:
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

        from xlstm_megatron.models.xlstm_model import XLSTMModel
        from xlstm_megatron.training.checkpoint import model_sharded_state

        with torch.device("meta"):
            # the local spec's parameter names are the tensor map's; its checkpoint keys equal the TE spec's
            model = XLSTMModel(config, vocab_size, max_sequence_length=1, pre_process=True, post_process=True,
                               use_te=False)
        names = {id(p): n for n, p in model.named_parameters()}
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.state = model_sharded_state([model])
        apply_factories(self.state)
        self.parts: dict[str, list[Part]] = {n: [] for n in self.shapes}
        for sh in nested_values(self.state):
            if not isinstance(sh, ShardedTensor):
                continue
            view = sh.data
            base = view._base if view._base is not None else view
            start = view.storage_offset() // base.stride(0) if base.dim() else 0
            sh.data = torch.empty(view.shape, dtype=dtype)
            self.parts[names[id(base)]].append(Part(sh, names[id(base)], start))
        for parts in self.parts.values():
            parts.sort(key=lambda p: p.start)

    def fill(self, rows_of: Callable[[str, int, int], torch.Tensor]) -> None:
        """Fill every part from `rows_of(param, start, stop)` (rows of our TP=1 parameter), one part at a time."""
        with torch.no_grad():
            for name, parts in self.parts.items():
                for part in parts:
                    part.data.copy_(rows_of(name, part.start, part.start + part.data.shape[0]))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of our TP=1 parameter: the part itself when one part is exactly that, else a copy."""
        pieces = []
        for part in self.parts[name]:
            end = part.start + part.data.shape[0]
            if (part.start, end) == (start, stop):
                return part.data
            lo, hi = max(start, part.start), min(stop, end)
            if lo < hi:
                pieces.append(part.data[lo - part.start : hi - part.start])
        return torch.cat(pieces)

    def adopt(self, loaded: dict[str, Any]) -> None:
        """Take the tensors `dist_checkpointing.load(self.state)` returned (it loads into the parts in place, so
        these are normally the parts themselves)."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        def walk(state: Any, values: Any) -> None:
            if isinstance(state, dict):
                for key, value in state.items():
                    walk(value, values[key])
            elif isinstance(state, list):
                for value, loaded_value in zip(state, values, strict=True):
                    walk(value, loaded_value)
            elif isinstance(state, ShardedTensor) and values is not state.data:
                state.data = values

        walk(self.state, loaded)

    @property
    def dtype(self) -> torch.dtype:
        return next(p.data.dtype for parts in self.parts.values() for p in parts)


def architecture(config: Any, vocab_size: int) -> dict[str, Any]:
    from xlstm_megatron.training.checkpoint import architecture as arch

    return arch(config, vocab_size)


def run_config_yaml(block: str, model_kwargs: dict[str, Any], vocab_size: int) -> str:
    """`train --config` file of a converted model; the vocabulary stays unpadded (TP must divide it)."""
    doc = {
        "model": {"xlstm_block": block, **model_kwargs},
        "train": {"vocab_size": vocab_size, "make_vocab_size_divisible_by": 1},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def save_converted(
    root: Path, parts: CheckpointParts, config: Any, block: str, model_kwargs: dict[str, Any], vocab_size: int,
    extra: dict[str, Any],
) -> None:
    from xlstm_megatron.training.checkpoint import save_weights_checkpoint

    save_weights_checkpoint(root, parts.state, architecture(config, vocab_size), extra)
    (root / RUN_CONFIG).write_text(run_config_yaml(block, model_kwargs, vocab_size))


@contextlib.contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """A temporary directory next to `out`, renamed to `out` only when the block succeeds (removed otherwise)."""
    out = Path(out)
    if out.exists():
        raise ConvertError(f"{out} already exists; choose a new --out (nothing is overwritten)")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise ConvertError(f"the parent directory of --out, {parent}, does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_run_model(ckpt_root: Path, config_path: Path | None) -> tuple[str, dict[str, Any]]:
    """(family, model kwargs) of a checkpoint directory, from its `run_config.yaml` (or `config_path`)."""
    from xlstm_megatron.layers.config import pattern_from_positions

    path = config_path or ckpt_root / RUN_CONFIG
    if not path.is_file():
        raise ConvertError(f"{path} does not exist; pass the run's YAML (its `model:` section) with --config")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConvertError(f"{path} is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise ConvertError(f"{path} has no `model:` section")
    model = dict(doc["model"])
    if "slstm_at" in model:
        model["xlstm_pattern"] = pattern_from_positions(model["num_layers"], model.pop("slstm_at"))
    return model.pop("xlstm_block", "large"), model


def checkpoint_iteration_dir(ckpt_root: Path, iteration: int | None) -> Path:
    from xlstm_megatron.training.checkpoint import iteration_dir, latest_iteration

    try:
        it = latest_iteration(ckpt_root) if iteration is None else iteration
    except ValueError as e:
        raise ConvertError(str(e)) from None
    if it is None:
        raise ConvertError(f"{ckpt_root} has no checkpoint (no latest_checkpointed_iteration.txt); check --ckpt")
    path = iteration_dir(ckpt_root, it)
    if not path.is_dir():
        raise ConvertError(f"{path} does not exist; check --ckpt / --iteration")
    return path


def saved_dtype(path: Path, key: str = "embedding.word_embeddings.weight") -> torch.dtype:
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(path))
    if key not in meta:
        raise ConvertError(f"{path} has no tensor {key!r}; is it an xlstm-megatron checkpoint?")
    return meta[key].dtype


def load_checkpoint_parts(path: Path, block: str, model_kwargs: dict[str, Any], dtype: torch.dtype | None):
    """(CheckpointParts holding the checkpoint's weights, config, vocab size, common state) of a checkpoint saved at
    any TP/PP (resharded on load, into the parts in place). Call inside `single_process()`."""
    from megatron.core import dist_checkpointing

    from xlstm_megatron.training.checkpoint import check_architecture
    from xlstm_megatron.training.run_config import ConfigError

    try:
        common = check_architecture(path, {})
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    vocab = common["arch"]["vocab_size"]
    config = model_config(block, model_kwargs, dtype or saved_dtype(path))
    try:
        check_architecture(path, architecture(config, vocab))
    except ConfigError as e:
        raise ConvertError(f"{e} (the model section of run_config.yaml does not match the checkpoint)") from None
    parts = CheckpointParts(config, vocab, config.params_dtype)
    parts.adopt(dist_checkpointing.load(parts.state, str(path)))
    return parts, config, vocab, common
