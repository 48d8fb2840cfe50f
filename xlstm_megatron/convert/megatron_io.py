"""Our side of every conversion: a one-process Megatron context, the Megatron arguments of a converted model, our
checkpoint's tensors at TP=1 (without building a model in memory), and our checkpoint directories.

A converted checkpoint is a weights-only Megatron checkpoint (`runs.checkpoint.save_weights_state`) saved once at
TP=1/PP=1 from `XLSTMModel.sharded_state_dict()`: `iter_0000000/` with the model's Megatron args in its common state
and `latest_checkpointed_iteration.txt`. Megatron's distributed checkpointing reshards it when a run of any TP/PP
loads it (`--load DIR --finetune`, `generate --load DIR`, `convert megatron-to-hf`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from argparse import Namespace
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xlstm_megatron.convert.errors import ConvertError
from xlstm_megatron.runs.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# XLSTMConfig fields whose Megatron flag is not `--<field-with-dashes>`.
FLAG_NAMES = {"layernorm_epsilon": "--norm-epsilon"}
DEFAULT_SEQ_LENGTH = 2048
"""Recorded as the converted model's --seq-length (a recurrent model has no maximum; a run that continues from the
checkpoint passes its own)."""


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


def converter_args(
    block: str, model_kwargs: dict[str, Any], vocab_size: int, dtype: str, seq_length: int = DEFAULT_SEQ_LENGTH
) -> Namespace:
    """The validated Megatron arguments of a converted model (`make_xlstm_config` kwargs of family `block`): what
    `megatron_args` gives for the equivalent command line, with the vocabulary exactly `vocab_size` (unpadded)."""
    from xlstm_megatron.layers.config import MEGATRON_FAMILY_DEFAULTS
    from xlstm_megatron.runs.args import family_ffn_hidden_size, megatron_args

    kwargs = {**MEGATRON_FAMILY_DEFAULTS[block], **model_kwargs}
    factor, width = kwargs.get("ffn_proj_factor"), kwargs.get("ffn_hidden_size")
    if factor is not None and width is not None and family_ffn_hidden_size(
            Namespace(xlstm_block=block, ffn_proj_factor=factor, hidden_size=kwargs["hidden_size"])) != width:
        del kwargs["ffn_proj_factor"]  # another rounding made the width (HF's multiple): the width is what counts
    argv = [
        "--xlstm-block", block, "--transformer-impl", "local", "--seq-length", str(seq_length),
        "--max-position-embeddings", str(seq_length), "--micro-batch-size", "1", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", str(vocab_size), "--padded-vocab-size", str(vocab_size), "--make-vocab-size-divisible-by", "1",
    ]
    if dtype == "bf16":
        argv.append("--bf16")
    for name, value in kwargs.items():
        argv += [FLAG_NAMES.get(name, "--" + name.replace("_", "-")), str(value)]
    try:
        args = megatron_args(argv)
    except (AssertionError, ValueError) as e:  # Megatron's checks are assertions; ours ConfigErrors
        raise ConvertError(f"our model cannot take these settings: {e}".splitlines()[0]) from None
    except SystemExit:  # argparse: a value our flags refuse
        raise ConvertError(f"our model cannot take these settings: {' '.join(argv)}") from None
    args.padded_vocab_size = vocab_size  # what Megatron's tokenizer set-up fills in a training run
    return args


def args_at_tp1(args: Namespace) -> Namespace:
    """A copy of `args` for a conversion process: TP=PP=1, no sequence parallel or virtual stages, local modules and
    torch kernels (a conversion never runs them; a GPU run's TE / Triton / FP8 settings need hardware)."""
    from xlstm_megatron.runs.checkpoint import with_layout

    args = with_layout(args)
    args.transformer_impl, args.mlstm_kernel, args.slstm_kernel, args.fp8 = "local", "torch", "torch", None
    return args


def conversion_config(args: Namespace, dtype: torch.dtype) -> Any:
    """The XLSTMConfig of a TP=1 model of `args` with local (non-TE) modules, whose parameter names are the tensor
    maps' (TE checkpoints share the keys), parameters allocated in `dtype`, not initialised."""
    from xlstm_megatron.runs.model import xlstm_config_from_args

    try:
        return xlstm_config_from_args(args_at_tp1(args), params_dtype=dtype, perform_initialization=False)
    except ConfigError as e:
        raise ConvertError(str(e)) from None


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

    def __init__(self, args: Namespace, dtype: torch.dtype) -> None:
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

        from xlstm_megatron.runs.checkpoint import model_sharded_state
        from xlstm_megatron.runs.model import build_xlstm_model

        self.args, self.config = args, conversion_config(args, dtype)
        with torch.device("meta"):
            model = build_xlstm_model(args_at_tp1(args), self.config)
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


def save_converted(root: Path, parts: CheckpointParts, extra: dict[str, Any]) -> None:
    """`parts` as a weights-only Megatron checkpoint at iteration 0 (`extra`: what the export needs back)."""
    from xlstm_megatron.runs.checkpoint import save_weights_state

    save_weights_state(parts.state, root, 0, parts.args, extra=extra)


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


def saved_dtype(path: Path, key: str = "embedding.word_embeddings.weight") -> torch.dtype:
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(path))
    if key not in meta:
        raise ConvertError(f"{path} has no tensor {key!r}; is it an xlstm-megatron checkpoint?")
    return meta[key].dtype


def load_checkpoint_parts(path: Path, dtype: torch.dtype | None) -> tuple[CheckpointParts, dict[str, Any]]:
    """(CheckpointParts holding the weights, common state) of a checkpoint saved at any TP/PP (resharded on load,
    into the parts in place), its model built from the args it saved. Call inside `single_process()`."""
    from megatron.core import dist_checkpointing

    from xlstm_megatron.runs.checkpoint import MODEL_METADATA, common_state, load_sharded, saved_args

    args = saved_args(path)
    common = common_state(path)
    parts = CheckpointParts(args, dtype or saved_dtype(path))
    saved_metadata = dist_checkpointing.load_content_metadata(str(path)) or {}
    if any(saved_metadata.get(k, v) != v for k, v in MODEL_METADATA.items()):
        raise ConvertError(f"{path} was saved with sharding metadata {saved_metadata}, which conversion does not read")
    parts.adopt(load_sharded(parts.state, path))
    return parts, common
