"""Fixes for ``megatron.training.pretrain()`` as the megatron-core wheel ships it, on every device (the CPU-only
shims are in ``megatron_cpu``). Each is listed with its reason and removal condition in ``patches/README.md``
(section 5).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator
from typing import Any

import torch

from xlstm_megatron.compat.megatron_cpu import (
    _enable_training_shims,
    _replace_everywhere,
    enable_megatron_cpu_compat,
    megatron_cpu_context,
)

_ACTIVE = False


def enable_pretrain_fixes() -> None:
    """Idempotent; safe with and without CUDA."""
    global _ACTIVE
    if _ACTIVE:
        return
    init = importlib.import_module("megatron.training.initialize")
    original_compile = init._compile_dependencies

    @functools.wraps(original_compile)
    def compile_dependencies(*args: Any, **kwargs: Any) -> Any:
        # The wheel ships the dataset index helpers prebuilt (helpers_cpp) but not their Makefile, so Megatron's
        # `make` on rank 0 fails and exits the job; build only where the prebuilt module is missing.
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:
            return original_compile(*args, **kwargs)
        torch.distributed.barrier()

    _replace_everywhere(init, "_compile_dependencies", compile_dependencies)
    _fix_distributed_optimizer_load()
    _fix_fsdp2_optimizer_state_matching()
    _fix_fsdp2_resume_adam_step()
    _ACTIVE = True


def _fix_fsdp2_optimizer_state_matching() -> None:
    """Checkpoints of torch-FSDP2 runs: megatron-core matches each optimizer state to its model entry by
    `id(to_local_if_dtensor(param))` against `id(entry.data)`, where the model entries hold `DTensor._local_tensor`.
    With torch 2.14 `DTensor.to_local()` returns a new view object per call, so nothing matches and the save stops
    at "Param id 0 does not match any model sharded param". Give the optimizer-state mapping the local tensor itself
    (the same storage and values; what those entries hold)."""
    from torch.distributed.tensor import DTensor

    optimizer_io = importlib.import_module("megatron.core.dist_checkpointing.optimizer")
    original = optimizer_io.to_local_if_dtensor

    @functools.wraps(original)
    def to_local_if_dtensor(tensor: torch.Tensor) -> torch.Tensor:
        return tensor._local_tensor if isinstance(tensor, DTensor) else original(tensor)

    optimizer_io.to_local_if_dtensor = to_local_if_dtensor


def _fix_distributed_optimizer_load() -> None:
    """Resume with the distributed optimizer and torch's Adam (no Apex/TE): the load request is built from
    `state_dict()`, which reads torch Adam's per-parameter `step`, which exists only after a first step (bare
    `assert len(steps) == 1`). Give the fresh optimizer Megatron's own dummy state first, as it already does for
    Megatron-FSDP; the load then overwrites every value, `step` included."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    cls = dopt.DistributedOptimizer
    original = cls.sharded_state_dict

    @functools.wraps(original)
    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs: Any):
        if is_loading and not dopt.HAVE_APEX_OR_TE and not self.optimizer.state:
            self._init_optimizer_states_with_dummy_values()
        return original(self, model_sharded_state_dict, is_loading, **kwargs)

    cls.sharded_state_dict = sharded_state_dict
    original_load = cls.load_parameter_state_from_dp_reshardable

    @functools.wraps(original_load)
    @torch.no_grad()  # it copies into views of the fp32 parameters (its sibling loaders have the decorator)
    def load_parameter_state_from_dp_reshardable(self, state_dict):
        # `load_state_dict` has just set torch Adam's `step` from the checkpoint's param groups, as ONE tensor shared
        # by every parameter's state (Adam increments it once per parameter per step); this loader then copies the
        # per-parameter state tensors, `step` included, from the request built on the dummy state (step 1). Keep
        # the restored value, in a tensor of each parameter's own.
        states = [s for s in self.optimizer.state.values() if torch.is_tensor(s.get("step"))]
        restored = [s["step"].clone() for s in states]
        original_load(self, state_dict)
        for state, step in zip(states, restored, strict=True):
            state["step"] = step

    cls.load_parameter_state_from_dp_reshardable = load_parameter_state_from_dp_reshardable


def enable_pretrain_shims() -> None:
    """The wheel fixes everywhere and, without CUDA, the CPU shims of megatron-core and megatron.training (enough for
    `validate_args`; the loop itself also needs `pretrain_context()`)."""
    enable_pretrain_fixes()
    if not torch.cuda.is_available():
        enable_megatron_cpu_compat()
        _enable_training_shims()


@contextlib.contextmanager
def pretrain_context() -> Iterator[None]:
    """Everything ``pretrain()`` needs from ``compat``: the wheel fixes everywhere, the CPU shims without CUDA."""
    enable_pretrain_shims()
    with megatron_cpu_context():
        yield


def _fix_fsdp2_resume_adam_step() -> None:
    """Resuming torch-FSDP2 runs with torch Adam: for FSDP2 + torch_dist, `pretrain()` loads the checkpoint in place
    (`skip_load_to_model_and_opt=True`: the model and optimizer tensors are filled directly) and never calls the
    optimizer's `load_state_dict`, which is where megatron-core puts torch Adam's per-parameter `step` back (it saves
    one `common_step` among the non-tensor state). The states then hold exp_avg/exp_avg_sq without `step`, and the first
    step stops on `KeyError: 'step'`. Keep the state dict the load returns and restore each parameter's step from it."""
    checkpointing = importlib.import_module("megatron.training.checkpointing")
    training = importlib.import_module("megatron.training.training")
    original_base, original_load = checkpointing._load_base_checkpoint, training.load_checkpoint
    loaded: dict[str, Any] = {}

    @functools.wraps(original_base)
    def load_base_checkpoint(*args: Any, **kwargs: Any) -> Any:
        result = original_base(*args, **kwargs)
        loaded["state_dict"] = result[0]
        return result

    @functools.wraps(original_load)
    def load_checkpoint(model: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        loaded.clear()
        result = original_load(model, optimizer, *args, **kwargs)
        if kwargs.get("skip_load_to_model_and_opt") and optimizer is not None and loaded.get("state_dict"):
            _restore_common_step(optimizer, loaded["state_dict"].get("optimizer"))
        loaded.clear()
        return result

    checkpointing._load_base_checkpoint = load_base_checkpoint
    training.load_checkpoint = load_checkpoint


def _restore_common_step(optimizer: Any, saved: Any) -> None:
    """Give every parameter state without `step` the saved `common_step` (a tensor of its own, as torch Adam keeps)."""
    if not isinstance(saved, dict):
        return
    saved_states = [saved] if "state" in saved else [saved[k] for k in sorted(saved) if isinstance(saved[k], dict)]
    megatron_optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    for megatron_opt, saved_opt in zip(megatron_optimizers, saved_states, strict=False):
        step = saved_opt.get("state", {}).get("common_step")
        torch_opt = getattr(megatron_opt, "optimizer", None)
        if step is None or torch_opt is None:
            continue
        for state in torch_opt.state.values():
            if state and "step" not in state:
                state["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
