"""Megatron checkpoints of a run: the one reader and weights-only writer that training, convert, inference and bench
share.

Layout (what `megatron.training.checkpointing.save_checkpoint` writes in `torch_dist` format):
`<root>/latest_checkpointed_iteration.txt` and `<root>/iter_NNNNNNN/`, a megatron-core dist checkpoint whose common
state holds `args` (the run's validated Megatron Namespace, our xLSTM fields and `padded_vocab_size` included: the one
record of the architecture), `checkpoint_version`, `iteration`, and the model's sharded state under `model` (or
`model0`, `model1`, ... with virtual pipeline stages), plus optimizer / scheduler / RNG state.

A weights-only checkpoint (converters, `save_weights_checkpoint`) is the same format with only the model: its saved
args say `no_save_optim` / `no_save_rng`, so Megatron's own `load_checkpoint` (`--load DIR`, with or without
`--finetune`) loads the weights and starts a fresh optimizer, schedule and RNG.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch

from xlstm_megatron.runs.errors import ConfigError

LATEST = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
# The model part of Megatron's sharded-state metadata (`_build_sharded_state_dict_metadata` without the optimizer
# entries); `dp_cp_group` is added at use and never serialised.
MODEL_METADATA: dict[str, Any] = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


# ---- where checkpoints are ----------------------------------------------------------------------------------------
def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def is_checkpoint_dir(path: str | Path) -> bool:
    """Whether `path` is one dist checkpoint (an `iter_*` directory), not a run's root."""
    return (Path(path) / "metadata.json").is_file()


def latest_iteration(root: str | Path | None) -> int | None:
    """The iteration `latest_checkpointed_iteration.txt` names (None without the file); a marker that does not name
    a complete checkpoint is a one-line ConfigError. Megatron moves the marker only after a save has finished on
    every rank, so an `iter_*` directory it does not name (left by a job killed while saving) is never read; the
    next save of that iteration overwrites it."""
    if root is None:
        return None
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    if text == "release":
        raise ConfigError(f"{marker} names a 'release' checkpoint; xlstm-megatron reads iter_* checkpoints only")
    if not text.isdigit() or not iteration_dir(root, int(text)).is_dir():
        raise ConfigError(f"{marker} names {text!r}, which is not a complete checkpoint there; fix or remove it")
    return int(text)


def check_checkpoint_files(iter_dir: str | Path) -> None:
    """A one-line ConfigError unless `iter_dir` is a complete dist checkpoint: Megatron's `metadata.json` (written
    last), torch's `.metadata` index readable, and every file it indexes present and long enough for the bytes it
    indexes there. Reads the indexes only (no tensor data): it catches truncated, missing and half-written shard
    files, which otherwise fail deep inside the load (torch's reader: EOFError / unpickling errors, per rank)."""
    import json
    import pickle

    path = Path(iter_dir)
    fix = "point --load at another checkpoint (or its parent's latest_checkpointed_iteration.txt at an older " \
          "iter_*), or save / convert it again"
    try:
        json.loads((path / "metadata.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} is incomplete (no metadata.json: its save did not finish); {fix}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}/metadata.json is damaged ({type(e).__name__}); {fix}") from None
    try:
        with open(path / ".metadata", "rb") as f:
            index = pickle.load(f)  # torch's own reader does the same (FileSystemReader.read_metadata)
        storage = dict(index.storage_data)
    except FileNotFoundError:
        raise ConfigError(f"{path} has no .metadata (torch_dist index); it is incomplete: {fix}") from None
    except Exception as e:  # noqa: BLE001 - a truncated or damaged pickle raises anything from EOFError to KeyError
        raise ConfigError(f"{path}/.metadata is damaged or truncated ({type(e).__name__}); {fix}") from None
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        file = path / name
        size = file.stat().st_size if file.is_file() else None
        if size is None or size < end:
            what = "is missing" if size is None else f"is truncated ({size} of at least {end} bytes)"
            raise ConfigError(f"checkpoint shard {file} {what}; {fix}")


def resolve_checkpoint_dir(load: str | Path, iteration: int | None = None, flag: str = "--load") -> Path:
    """The iteration directory to read: `load` itself when it is one, else `load`'s latest (or `iteration`)."""
    load = Path(load)
    if is_checkpoint_dir(load):
        if iteration is not None:
            raise ConfigError(f"{flag} {load} is one checkpoint (an iter_* directory); pass its parent for --iteration")
        check_checkpoint_files(load)
        return load
    if not load.is_dir():
        raise ConfigError(f"{flag} {load} does not exist; pass the run's --save directory")
    it = latest_iteration(load) if iteration is None else iteration
    if it is None:
        raise ConfigError(f"{load} has no checkpoint (no {LATEST}); check {flag} or pass --iteration")
    path = iteration_dir(load, it)
    if not path.is_dir():
        raise ConfigError(f"{path} does not exist; check {flag} / --iteration")
    check_checkpoint_files(path)
    return path


# ---- the architecture record ----------------------------------------------------------------------------------------
def common_state(iter_dir: str | Path) -> dict[str, Any]:
    """A checkpoint's common (unsharded) state: args, checkpoint_version, iteration, ..."""
    from megatron.core import dist_checkpointing
    from megatron.core.safe_globals import register_safe_globals

    path = Path(iter_dir)
    if not is_checkpoint_dir(path):
        raise ConfigError(f"{path} is not a Megatron dist checkpoint (no metadata.json); pass a run's --save directory "
                          "or one of its iter_* directories")
    register_safe_globals()  # the common state is read with weights_only=True; Namespace is one of Megatron's
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable common state is the same user error
        raise ConfigError(f"cannot read the common state of {path}: {e}".splitlines()[0]) from None
    if not isinstance(common, dict):
        raise ConfigError(f"the common state of {path} is not a dict; is it a Megatron checkpoint?")
    return common


def saved_args(iter_dir: str | Path) -> Namespace:
    """The Megatron arguments a checkpoint was saved with (its common state's `args`)."""
    path = Path(iter_dir)
    args = common_state(path).get("args")
    if not isinstance(args, Namespace):
        raise ConfigError(f"{path} has no saved Megatron args (not written by Megatron's save_checkpoint or "
                          "xlstm-megatron); convert it with `xlstm-megatron convert` or train with --save")
    if not hasattr(args, "xlstm_block"):
        raise ConfigError(f"{path} was saved by a non-xLSTM Megatron run (its args have no xlstm_block); "
                          "load an xlstm-megatron checkpoint")
    return args


def with_layout(
    args: Namespace, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None, sequence_parallel: bool = False,
) -> Namespace:
    """A copy of validated args (a checkpoint's saved ones, say) laid out for another TP/PP: the same model, with
    every field Megatron's `validate_args` derives from the layout set to match (so the model builds there)."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    out = copy.copy(args)
    out.tensor_model_parallel_size, out.pipeline_model_parallel_size = tp, pp
    out.virtual_pipeline_model_parallel_size = virtual_pipeline_model_parallel_size
    out.sequence_parallel = sequence_parallel
    out.tensor_parallel_num_weight_shards, out.gtp_weight_remat_size = tp, 1
    out.expert_tensor_parallel_size, out.expert_tensor_parallel_num_weight_shards, out.expert_gtp_weight_remat_size = \
        tp, tp, 1
    out.num_layers_in_first_pipeline_stage = out.num_layers_in_last_pipeline_stage = None
    out.pipeline_model_parallel_layout = None
    return out


def _family_default(args: Namespace, name: str) -> Any:
    from xlstm_megatron.layers.config import XLSTM_FAMILY_DEFAULTS

    value = getattr(args, name, None)
    return XLSTM_FAMILY_DEFAULTS[args.xlstm_block].get(name) if value is None else value


def architecture(args: Namespace) -> dict[str, Any]:
    """The fields of Megatron args that define the model's tensors and function, normalised (pattern string, widths,
    family defaults), so two runs with equal records build the same model."""
    block, E, heads = args.xlstm_block, args.hidden_size, args.num_attention_heads
    large = block == "large"
    pattern = args.xlstm_pattern or "m" * args.num_layers
    arch: dict[str, Any] = dict(
        xlstm_block=block, num_layers=args.num_layers, hidden_size=E, num_attention_heads=heads,
        ffn_hidden_size=args.ffn_hidden_size, xlstm_pattern=pattern,
        slstm_num_heads=(args.slstm_num_heads or heads) if "s" in pattern else None,
        # Large: q/k and v widths over all heads; v1: the up-projection width and its block-diagonal q/k/v and conv
        mlstm_qk_dim=(args.mlstm_qk_dim or int(args.mlstm_qk_dim_factor * E)) if large else None,
        mlstm_v_dim=(args.mlstm_v_dim or int(args.mlstm_v_dim_factor * E)) if large else None,
        mlstm_inner_size=None if large else math.ceil(args.mlstm_proj_factor * E / 64) * 64,
        mlstm_qkv_block_size=None if large else args.mlstm_qkv_block_size,
        conv_kernel_size=None if large else args.conv_kernel_size,
        ffn_activation=_family_default(args, "ffn_activation"),
        gate_soft_cap=float(_family_default(args, "gate_soft_cap")),
        output_logit_soft_cap=float(_family_default(args, "output_logit_soft_cap")),
        slstm_forget_gate=getattr(args, "slstm_forget_gate", "sigmoid"),
        normalization=args.normalization, add_bias_linear=args.add_bias_linear,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        padded_vocab_size=getattr(args, "padded_vocab_size", None),
    )
    return arch


def check_architecture(iter_dir: str | Path, args: Namespace) -> Namespace:
    """The checkpoint's saved args, after checking they define the model `args` defines; otherwise a one-line
    ConfigError naming the first differing field. Fields `args` leaves unset (None: padded_vocab_size before the
    tokenizer is built) are not compared."""
    saved = saved_args(iter_dir)
    ours, theirs = architecture(args), architecture(saved)
    for name, value in ours.items():
        if value is not None and theirs[name] != value:
            raise ConfigError(
                f"checkpoint {iter_dir} has {name}={theirs[name]!r} but this run has {name}={value!r}; "
                "load a matching checkpoint or use its architecture flags"
            )
    return saved


# ---- model weights ---------------------------------------------------------------------------------------------
def _model_key(num_chunks: int, i: int) -> str:
    return "model" if num_chunks == 1 else f"model{i}"


def _metadata(saved: dict[str, Any] | None = None) -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    return {**MODEL_METADATA, **(saved or {}), "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}


def model_sharded_state(model_chunks: list[torch.nn.Module], metadata: dict[str, Any] | None = None) -> dict:
    """The model part of a checkpoint's sharded state, keyed as Megatron's `generate_state_dict` keys it."""
    from megatron.core.utils import unwrap_model

    chunks = unwrap_model(list(model_chunks))
    metadata = metadata or _metadata()
    return {_model_key(len(chunks), i): chunk.sharded_state_dict(metadata=metadata) for i, chunk in enumerate(chunks)}


def load_sharded(request: dict[str, Any], iter_dir: str | Path) -> dict[str, Any]:
    """`dist_checkpointing.load` of `request` (resharded to this layout), after checking the checkpoint has every
    tensor it asks for: a one-line ConfigError naming the first it lacks instead of the storage layer's traceback."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
    from torch.distributed.checkpoint.api import CheckpointException

    wanted, _, _ = load_preprocess(request)  # a copy with the tensor factories applied: the keys load will read
    have = {sh.key for sh in load_sharded_metadata(str(iter_dir)).values()}
    absent = sorted({sh.key for sh in nested_values(wanted) if isinstance(sh, ShardedBase)} - have)
    if absent:
        raise ConfigError(
            f"checkpoint {iter_dir} lacks {len(absent)} tensors this model needs (e.g. {absent[0]!r}); it was "
            "saved for another model layout or by an older xlstm-megatron: load a matching checkpoint"
        )
    try:
        return dist_checkpointing.load(request, str(iter_dir))
    except CheckpointException as e:  # torch's reader: a shard file that is truncated, damaged or missing
        inner = next(iter(e.failures.values()), None)
        inner = getattr(inner, "exc", inner)
        what = f"{type(inner).__name__}: {inner}".splitlines()[0] if inner is not None else "unknown failure"
        raise ConfigError(f"cannot read checkpoint {iter_dir} (a tensor file is damaged or incomplete: {what}); "
                          "save or convert it again") from None


@torch.no_grad()
def load_model_weights(model_chunks: list[torch.nn.Module], iter_dir: str | Path) -> None:
    """Load only the model weights of a checkpoint (full or weights-only, saved at any TP/PP) into this layout's
    model chunks (bare or wrapped in DDP / Float16Module)."""
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    if not is_checkpoint_dir(iter_dir):
        raise ConfigError(f"{iter_dir} is not a Megatron dist checkpoint (no metadata.json); check --load")
    chunks = unwrap_model(list(model_chunks))
    metadata = _metadata(dist_checkpointing.load_content_metadata(str(iter_dir)))  # the sharding it was saved with
    loaded = load_sharded(model_sharded_state(chunks, metadata), iter_dir)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[_model_key(len(chunks), i)])


def weights_only_args(args: Namespace, iteration: int) -> Namespace:
    """The args a weights-only checkpoint records: the run's, saying there is no optimizer / RNG state to load (so
    Megatron's `load_checkpoint` starts those fresh) and no progress beyond `iteration`."""
    saved = copy.copy(args)
    saved.no_save_optim, saved.no_save_rng = True, True
    saved.iteration = iteration
    saved.consumed_train_samples = saved.skipped_train_samples = saved.consumed_valid_samples = 0
    return saved


def save_weights_state(
    model_state: dict[str, Any], root: str | Path, iteration: int, args: Namespace, extra: dict[str, Any] | None = None
) -> Path:
    """Write `model_state` (`model_sharded_state(...)`, whose tensors a converter may have replaced) as a weights-only
    Megatron checkpoint `<root>/iter_NNNNNNN` and point `latest_checkpointed_iteration.txt` at it. Collective over
    all ranks of the process group. `extra` (optional, picklable with weights_only) is kept under the common state's
    `xlstm_extra` key; Megatron ignores it."""
    from megatron.core import dist_checkpointing

    if getattr(args, "padded_vocab_size", None) is None:
        raise ConfigError("the args to save carry no padded_vocab_size; set it (the model's vocab) before saving")
    root = Path(root)
    path = iteration_dir(root, iteration)
    rank = torch.distributed.get_rank()
    if rank == 0:
        if path.exists():  # left by a run killed while saving: the latest pointer never named it
            shutil.rmtree(path)
        path.mkdir(parents=True)
    torch.distributed.barrier()
    state = {
        **model_state, "args": weights_only_args(args, iteration), "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration, "num_floating_point_operations_so_far": 0,
    }
    if extra:
        state["xlstm_extra"] = extra
    dist_checkpointing.save(state, str(path), content_metadata=dict(MODEL_METADATA))
    torch.distributed.barrier()
    if rank == 0:  # the pointer moves only once the checkpoint is complete
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(str(iteration))
        os.replace(tmp, root / LATEST)
    torch.distributed.barrier()
    return path


def save_weights_checkpoint(model_chunks: list[torch.nn.Module], root: str | Path, iteration: int,
                            args: Namespace, extra: dict[str, Any] | None = None) -> Path:
    """A weights-only checkpoint of `model_chunks` (this rank's chunks, any TP/PP) in Megatron's format, with `args`
    (the model's Megatron arguments) as its architecture record. Collective over all ranks."""
    return save_weights_state(model_sharded_state(model_chunks), root, iteration, args, extra)
