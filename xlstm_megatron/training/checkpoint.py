"""Distributed checkpoints of model, optimizer and scheduler with auto-resume from the latest one.

Layout (as Megatron-LM's): `<dir>/iter_0000100/` (a megatron-core dist checkpoint) and
`<dir>/latest_checkpointed_iteration.txt`. Common (unsharded) state holds the iteration, the scheduler, the loss
history and an architecture fingerprint that is checked before any tensor is read, so loading a checkpoint of another
architecture fails with one line instead of a shape error deep inside the loader.

A weights-only checkpoint (what the converters write: `weights_only: True` in the common state, no optimizer or
scheduler state) loads the model and leaves the optimizer and schedule fresh, at the checkpoint's iteration (0).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from xlstm_megatron.layers.config import XLSTMConfig
from xlstm_megatron.training.run_config import ConfigError

LATEST = "latest_checkpointed_iteration.txt"
ARCH_FIELDS = (
    "xlstm_block", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "layer_pattern",
    "slstm_heads", "mlstm_qk_width", "mlstm_v_width", "mlstm_proj_factor", "mlstm_qkv_block_size",
    "conv_kernel_size", "gated_linear_unit", "normalization",
)


def architecture(config: XLSTMConfig, vocab_size: int) -> dict[str, Any]:
    return {**{name: getattr(config, name) for name in ARCH_FIELDS}, "vocab_size": vocab_size}


def resume_root(save: str | Path | None, load: str | Path | None) -> str | Path | None:
    """Where a run continues from: its own latest checkpoint once it has one (so a restarted fine-tune resumes its
    progress instead of reloading the starting weights), else --load."""
    return save if latest_iteration(save) is not None else (load or save)


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path | None) -> int | None:
    if root is None:
        return None
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    if not text.isdigit() or not iteration_dir(root, int(text)).is_dir():
        raise ConfigError(f"{marker} names {text!r}, which is not a complete checkpoint there; fix or remove it")
    return int(text)


def _metadata(use_distributed_optimizer: bool) -> dict[str, Any]:
    metadata: dict[str, Any] = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "dp_reshardable"
    return metadata


def _ensure_optimizer_state(optimizer: Any) -> None:
    """Give a fresh distributed optimizer its Adam state before it describes a checkpoint to load into.

    Without Apex/TE, megatron-core's `DistributedOptimizer.state_dict()` reads each parameter's torch-Adam `step`,
    which exists only after a first step; Megatron's own zero-gradient dummy step creates it. The values it touches
    are all overwritten by the load that follows.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _model_key(model: list[torch.nn.Module], i: int) -> str:
    return "model" if len(model) == 1 else f"model{i}"


def _model_state(model: list[torch.nn.Module], metadata: dict) -> dict[str, Any]:
    return {_model_key(model, i): chunk.sharded_state_dict(metadata=metadata) for i, chunk in enumerate(model)}


def _torch_adam_states(optimizer: Any) -> list[dict]:
    return [state for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            for state in opt.optimizer.state.values() if torch.is_tensor(state.get("step"))]


def _adam_step(optimizer: Any) -> float | None:
    """The step count of torch's Adam (it keeps one per parameter; they are all equal)."""
    states = _torch_adam_states(optimizer)
    return float(states[0]["step"]) if states else None


def _restore_adam_step(optimizer: Any, step: float | None) -> None:
    """megatron-core's distributed-optimizer checkpoints restore Adam's moments but not torch Adam's per-parameter
    `step` (they keep it for Apex/TE's fused Adam only): without this, bias correction restarts after a resume."""
    if step is None:
        return
    for state in _torch_adam_states(optimizer):
        state["step"] = torch.full_like(state["step"], step)


def _sharded_state(model: list[torch.nn.Module], optimizer: Any, metadata: dict, is_loading: bool) -> dict:
    if is_loading:
        _ensure_optimizer_state(optimizer)
    state = _model_state(model, metadata)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


def _save(root: str | Path, iteration: int, state: dict[str, Any], metadata: dict[str, Any]) -> Path:
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, iteration)
    if torch.distributed.get_rank() == 0:
        if path.exists():  # left by a run killed while saving: the latest pointer never named it
            shutil.rmtree(path)
        path.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(state, str(path), content_metadata=metadata)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:  # the pointer moves only once the checkpoint is complete
        tmp = Path(root) / (LATEST + ".tmp")
        tmp.write_text(str(iteration))
        os.replace(tmp, Path(root) / LATEST)
    torch.distributed.barrier()
    return path


def save_checkpoint(
    root: str | Path, iteration: int, model: list[torch.nn.Module], optimizer: Any, scheduler: Any,
    arch: dict[str, Any], extra: dict[str, Any], use_distributed_optimizer: bool,
) -> Path:
    metadata = _metadata(use_distributed_optimizer)
    state = _sharded_state(model, optimizer, metadata, is_loading=False)
    state.update(iteration=iteration, scheduler=scheduler.state_dict(), arch=arch, extra=extra,
                 adam_step=_adam_step(optimizer))
    return _save(root, iteration, state, metadata)


def model_sharded_state(model: list[torch.nn.Module]) -> dict[str, Any]:
    """The model part of our checkpoints' sharded state (what `save_weights_checkpoint` takes)."""
    return _model_state(model, _metadata(use_distributed_optimizer=False))


def save_weights_checkpoint(
    root: str | Path, model_state: dict[str, Any], arch: dict[str, Any], extra: dict[str, Any]
) -> Path:
    """A weights-only checkpoint at iteration 0 (converted weights): `train --load` starts a fresh optimizer.
    `model_state` is `model_sharded_state(model)`, whose tensors a converter may have replaced by its own."""
    state = {**model_state, "iteration": 0, "arch": arch, "extra": extra, "weights_only": True}
    return _save(root, 0, state, _metadata(use_distributed_optimizer=False))


def check_architecture(path: Path, arch: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's common state, after checking it was saved for this architecture."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(path))
    saved = common.get("arch")
    if saved is None:
        raise ConfigError(f"{path} is not an xlstm-megatron checkpoint (no architecture record); check --load")
    diffs = [f"{k} {saved.get(k)!r} vs {v!r}" for k, v in arch.items() if saved.get(k) != v]
    if diffs:
        raise ConfigError(
            f"checkpoint {path} has a different architecture ({', '.join(diffs[:3])}); "
            "load a matching checkpoint or use its model config"
        )
    return common


def _load(request: dict[str, Any], path: Path) -> dict[str, Any]:
    """`dist_checkpointing.load`, with a one-line error naming the first tensor the checkpoint lacks (instead of the
    storage layer's traceback mid-load)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    loaded, _, absent = dist_checkpointing.load(request, str(path), strict=StrictHandling.RETURN_UNEXPECTED)
    if absent:
        raise ConfigError(
            f"checkpoint {path} lacks {len(absent)} tensors this model needs (e.g. {sorted(absent)[0]!r}); it was "
            "saved for another model layout or by an older xlstm-megatron: load a matching checkpoint"
        )
    return loaded


@torch.no_grad()
def load_model_weights(path: Path, model: list[torch.nn.Module]) -> None:
    """Load only the model chunks of any of our checkpoints (full or weights-only), resharded to this layout."""
    loaded = _load(model_sharded_state(model), path)
    for i, chunk in enumerate(model):
        chunk.load_state_dict(loaded[_model_key(model, i)])


@torch.no_grad()  # the distributed optimizer copies into views of the parameters
def load_checkpoint(
    path: Path, model: list[torch.nn.Module], optimizer: Any, scheduler: Any, arch: dict[str, Any],
    use_distributed_optimizer: bool,
) -> dict[str, Any]:
    """Load model, optimizer and scheduler in place; returns the common state (iteration, extra). A weights-only
    checkpoint loads the model, refreshes the optimizer's copies of the parameters and keeps the fresh schedule."""

    common = check_architecture(path, arch)
    if common.get("weights_only"):
        load_model_weights(path, model)
        optimizer.reload_model_params()  # fp32 main params / distributed-optimizer shards were copied at build time
        return common
    metadata = _metadata(use_distributed_optimizer)
    loaded = _load(_sharded_state(model, optimizer, metadata, is_loading=True), path)
    for i, chunk in enumerate(model):
        chunk.load_state_dict(loaded[_model_key(model, i)])
    optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_step(optimizer, common.get("adam_step"))
    scheduler.load_state_dict(common["scheduler"])
    return common
