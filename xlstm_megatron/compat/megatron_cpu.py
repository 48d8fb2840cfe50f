"""Run Megatron-Core (0.19) on CPU with the gloo backend: the ONE place that shims Megatron's CUDA assumptions.

Nothing here changes anything when CUDA is available: ``enable_megatron_cpu_compat()`` is then a no-op and
``model_parallel_manual_seed`` calls Megatron's own ``model_parallel_cuda_manual_seed``.

On a machine without CUDA, ``enable_megatron_cpu_compat()`` installs three kinds of shims (each one is listed with
its upstream location and its removal condition in ``patches/README.md``):

1. ``torch.cuda.current_device`` answers ``torch.device("cpu")``, ``torch.cuda.synchronize`` is a no-op and
   ``torch.cuda.current_stream`` answers a stream whose waits are no-ops. These are process-global because the call
   sites (~200 for ``current_device``) read them through the ``torch`` module; all three raise without CUDA, so no code
   that worked before can change behaviour.
2. A ``TorchFunctionMode`` (``_CudaToCpuMode``) that rewrites ``device="cuda"`` / ``.to("cuda")`` / ``.cuda()`` to CPU,
   entered only inside the Megatron functions listed in ``_DEVICE_SHIMS`` (wrapped where they are defined and wherever
   an already-imported Megatron module holds a reference). For the functions in ``_TYPE_NAME_SHIMS`` the mode also
   answers ``tensor.type()`` with the CUDA type name (``'torch.cuda.FloatTensor'``) that their dtype checks expect.
3. ``megatron.core.tensor_parallel.random``: its private CUDA RNG get/set helpers use the CPU generator (activation
   recompute saves and restores them), and ``model_parallel_manual_seed`` installs ``CpuRNGStatesTracker``, a tracker
   with the same named streams and seeds as upstream whose ``fork()`` swaps the CPU generator's state.

Config flags cannot be set by a shim; ``cpu_config_overrides()`` returns the ``TransformerConfig`` kwargs needed on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False
_MISSING_TARGETS: list[str] = []  # shim targets not found in the installed Megatron (version drift)

# (module, qualified name) of Megatron functions that allocate on / move to "cuda" literally.
_DEVICE_SHIMS: tuple[tuple[str, str], ...] = (
    # token counter `torch.zeros([], device="cuda")` at the top of every schedule
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining"),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_pipelining_without_interleaving"),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_pipelining_with_interleaving"),
    # optimizer construction, grad-norm, zero counting, loss-scale state
    ("megatron.core.optimizer.clip_grads", "get_grad_norm_fp32"),
    ("megatron.core.optimizer.clip_grads", "count_zeros_fp32"),
    ("megatron.core.optimizer.grad_scaler", "MegatronGradScaler.__init__"),
    ("megatron.core.optimizer.grad_scaler", "DynamicGradScaler.__init__"),
    ("megatron.core.optimizer.grad_scaler", "DynamicGradScaler.load_state_dict"),
    ("megatron.core.optimizer.optimizer", "MegatronOptimizer.has_grad_norm_group"),
    ("megatron.core.optimizer.optimizer", "MegatronOptimizer.restore_from_cpu"),
    ("megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer.__init__"),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero"),
    ("megatron.core.optimizer.layer_wise_optimizer", "LayerWiseDistributedOptimizer.has_grad_norm_group"),
    # DDP buffer warm-up tensor
    ("megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBuffer.__init__"),
    # tied embeddings across pipeline stages: `weight.data.cuda()`
    ("megatron.core.models.common.language_module.language_module", "LanguageModule.setup_embeddings_and_output_layer"),
    ("megatron.core.models.common.embeddings.rope_utils", "get_pos_emb_on_this_cp_rank"),
    # default causal masks of the local DotProductAttention / fused softmax
    ("megatron.core.transformer.utils", "get_default_causal_mask"),
    ("megatron.core.transformer.utils", "get_sliding_window_causal_mask"),
    # data broadcast across TP ranks
    ("megatron.core.tensor_parallel.data", "_build_key_size_numel_dictionaries"),
    ("megatron.core.tensor_parallel.data", "broadcast_data"),
    # distributed checkpointing (save verification, fully-parallel load exchange)
    ("megatron.core.dist_checkpointing.strategies.state_dict_saver", "verify_global_md_reuse"),
    ("megatron.core.dist_checkpointing.exchange_utils", "_get_empty_tensor_for_exchange"),
    ("megatron.core.dist_checkpointing.exchange_utils", "exchange_loaded_tensors_gather_rounds"),
    ("megatron.core.dist_checkpointing.exchange_utils", "exchange_loaded_tensors_broadcast"),
    # misc utilities used by training loops
    ("megatron.core.utils", "check_param_hashes_across_dp_replicas"),
    ("megatron.core.utils", "local_multi_tensor_l2_norm"),
    ("megatron.core.rerun_state_machine", "RerunStateMachine._reduce_any"),
)

# Functions that compare `tensor.type()` against 'torch.cuda.{Float,Half,BFloat16}Tensor' (and also allocate on cuda).
_TYPE_NAME_SHIMS: tuple[tuple[str, str], ...] = (
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups"),
)


def cpu_config_overrides() -> dict[str, Any]:
    """``TransformerConfig`` kwargs that Megatron needs on CPU (a shim cannot set them).

    - ``use_cpu_initialization``: the GPU init path allocates weights on ``torch.cuda.current_device()`` inside the
      CUDA RNG tracker; CPU init also makes weights independent of the TP size (a TP=2 model equals a TP=1 model).
    - ``batch_p2p_sync``: drop the ``torch.cuda.synchronize()`` after batched pipeline send/recv (a no-op anyway).
    - ``batch_p2p_comm``: with PP=2 both pipeline neighbours are the same rank, and the interleaved schedule's batched
      send-forward + send-backward to it match in posting order and silently swap activations and grads (measured:
      wrong losses from microbatch 3 on). ``megatron.training`` refuses that combination (it sets
      ``batch_p2p_comm = not overlap_p2p_comm`` and asserts PP > 2 otherwise); a bare ``TransformerConfig`` does not.
      Unbatched p2p (even/odd ordering, two communicators for PP=2) is exact for every schedule.
    - fusion flags: each needs a CUDA kernel (apex/TE/triton); ``megatron.training``'s argument defaults turn some on.
    """
    return {
        "use_cpu_initialization": True,
        "batch_p2p_sync": False,
        "batch_p2p_comm": False,
        "gradient_accumulation_fusion": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "apply_rope_fusion": False,
        "cross_entropy_loss_fusion": False,
    }


@contextlib.contextmanager
def megatron_cpu_context() -> Iterator[None]:
    """Installs the shims and maps CUDA device literals to CPU for the whole block (Megatron's training loop is full
    of them). A no-op with CUDA."""
    if torch.cuda.is_available():
        yield
        return
    enable_megatron_cpu_compat()
    with _CudaToCpuMode(spoof_type_names=False):
        yield


def is_cpu_compat_active() -> bool:
    """True once ``enable_megatron_cpu_compat()`` installed the shims in this process (never when CUDA exists)."""
    return _ACTIVE


def missing_shim_targets() -> list[str]:
    """Shim targets absent from the installed Megatron: non-empty means the shim table needs a version update."""
    return list(_MISSING_TARGETS)


def enable_megatron_cpu_compat() -> None:
    """Install the CPU shims for Megatron-Core; idempotent, and a no-op when ``torch.cuda.is_available()``."""
    global _ACTIVE
    if _ACTIVE or torch.cuda.is_available():
        return
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = _no_synchronize
    torch.cuda.current_stream = _null_current_stream
    torch.cuda.Stream = _NullStreamClass  # type: ignore[misc]
    torch.cuda.stream = _null_stream_context
    torch.cuda.get_rng_state = _get_cpu_rng_state  # checkpoints save and restore the "CUDA" RNG next to the CPU one
    torch.cuda.set_rng_state = _set_cpu_rng_state
    for module, qualname in _DEVICE_SHIMS:
        _wrap_target(module, qualname, spoof_type_names=False)
    for module, qualname in _TYPE_NAME_SHIMS:
        _wrap_target(module, qualname, spoof_type_names=True)
    rng = importlib.import_module("megatron.core.tensor_parallel.random")
    _replace_everywhere(rng, "_get_cuda_rng_state", _get_cpu_rng_state)
    _replace_everywhere(rng, "_set_cuda_rng_state", _set_cpu_rng_state)
    _enable_fsdp2_cpu_mesh()
    _ACTIVE = True


class _CpuDeviceMesh:
    """Stands in for `DeviceMesh` inside Megatron's torch-FSDP2 wrapper: `from_group(group, "cuda")` builds the mesh
    on "cpu" (torch's FSDP2 then shards, all-gathers and reduce-scatters CPU tensors over gloo)."""

    @staticmethod
    def from_group(group: Any, device_type: str, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed import DeviceMesh

        return DeviceMesh.from_group(group, "cpu" if device_type == "cuda" else device_type, *args, **kwargs)


def _enable_fsdp2_cpu_mesh() -> None:
    """`TorchFullyShardedDataParallel.__init__` (--use-torch-fsdp2) builds its mesh as
    `DeviceMesh.from_group(group, "cuda")`, a positional literal the TorchFunctionMode cannot see (section 8 of
    patches/README.md)."""
    name = "megatron.core.distributed.torch_fully_sharded_data_parallel"
    try:
        module = importlib.import_module(name)
    except ImportError:
        _MISSING_TARGETS.append(f"{name}.DeviceMesh")
        return
    if not hasattr(module, "DeviceMesh"):
        _MISSING_TARGETS.append(f"{name}.DeviceMesh")
        return
    module.DeviceMesh = _CpuDeviceMesh


def model_parallel_manual_seed(seed: int) -> None:
    """Seed the default and the model-parallel RNG streams; call after ``initialize_model_parallel``.

    As Megatron-LM's ``_set_random_seed``, the seed is first offset by ``100 * pipeline_rank`` so that pipeline stages
    (which build their layers from the same default-generator stream) get different weights; the default generator is
    seeded with it on every device. With CUDA the streams are Megatron's
    ``tensor_parallel.model_parallel_cuda_manual_seed(seed)``. On CPU it mirrors them on the
    CPU generator: the default stream gets ``seed`` (same on all TP ranks) and ``CpuRNGStatesTracker`` holds the
    data-parallel (``seed``), model-parallel (``seed + 2718 + tp_rank``) and expert-parallel
    (``seed + 1024 + 100 * ep_rank + etp_rank``) streams, so ``get_cuda_rng_tracker().fork()`` works as upstream.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    enable_megatron_cpu_compat()
    _install_cpu_rng_tracker(seed)


def _install_cpu_rng_tracker(seed: int) -> None:
    """Megatron's named RNG streams (data-, model- and expert-parallel) on the CPU generator, seeded as upstream."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as rng

    tracker = _cpu_tracker_class()()
    rng._CUDA_RNG_STATE_TRACKER = tracker
    rng._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tracker.add(rng._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(rng._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + ps.get_tensor_model_parallel_rank())
    ep_seed = seed + 1024 + 100 * ps.get_expert_model_parallel_rank() + ps.get_expert_tensor_parallel_rank()
    tracker.add(rng._EXPERT_PARALLEL_RNG_TRACKER_NAME, ep_seed)


# ---------------------------------------------------------------------------------------------------------------------
# global torch.cuda answers (only installed when CUDA is absent, where the originals raise)


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _no_synchronize(device: Any = None) -> None:
    return None


class _NullStream:
    """What ``torch.cuda.current_stream()`` answers on CPU: work is synchronous, so waiting is a no-op."""

    def wait_event(self, event: Any) -> None:
        return None

    def wait_stream(self, stream: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


_NULL_STREAM = _NullStream()


class _NullStreamClass(_NullStream):
    """What ``torch.cuda.Stream()`` builds on CPU (Megatron makes side streams for DDP set-up and overlap)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass


def _null_stream_context(stream: Any = None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _null_current_stream(device: Any = None) -> _NullStream:
    return _NULL_STREAM


# ---------------------------------------------------------------------------------------------------------------------
# device-literal mode


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and (device == "cuda" or device.startswith("cuda:"))


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments to CPU; optionally answers ``Tensor.type()`` with the CUDA type name."""

    def __init__(self, spoof_type_names: bool) -> None:
        super().__init__()
        self.spoof_type_names = spoof_type_names

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and self.spoof_type_names and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else "torch.cuda." + name.removeprefix("torch.")
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _with_cuda_to_cpu(fn: Callable, spoof_type_names: bool) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaToCpuMode(spoof_type_names):
            return fn(*args, **kwargs)

    wrapper.__cpu_compat_original__ = fn  # type: ignore[attr-defined]
    return wrapper


def _wrap_target(module_name: str, qualname: str, spoof_type_names: bool) -> None:
    try:
        owner: Any = importlib.import_module(module_name)
        *outer, name = qualname.split(".")
        for part in outer:
            owner = getattr(owner, part)
        raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    except (ImportError, AttributeError, KeyError):
        _MISSING_TARGETS.append(f"{module_name}:{qualname}")
        return
    if isinstance(raw, staticmethod | classmethod):
        setattr(owner, name, type(raw)(_with_cuda_to_cpu(raw.__func__, spoof_type_names)))
    elif isinstance(owner, type):
        setattr(owner, name, _with_cuda_to_cpu(raw, spoof_type_names))
    else:
        _replace_everywhere(owner, name, _with_cuda_to_cpu(raw, spoof_type_names))


def _replace_everywhere(module: Any, name: str, new: Any) -> None:
    """Set ``module.name = new`` and rebind every already-imported Megatron module that imported the old object."""
    old = getattr(module, name)
    setattr(module, name, new)
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("megatron."):
            continue
        for attr, value in list(vars(mod).items()):
            if value is old:
                setattr(mod, attr, new)


# ---------------------------------------------------------------------------------------------------------------------
# RNG on CPU


def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Stand-in for ``tensor_parallel.random._get_cuda_rng_state``: the CPU generator is the only device generator."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """Stand-in for ``tensor_parallel.random._set_cuda_rng_state``."""
    torch.set_rng_state(new_state)


@functools.cache
def _cpu_tracker_class() -> type:
    """Built on first use so that importing this module does not import Megatron."""
    from megatron.core.tensor_parallel.random import _MODEL_PARALLEL_RNG_TRACKER_NAME, CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """Megatron's RNG tracker on the CPU generator: named streams, ``fork(name)`` swaps the generator state."""

        def add(self, name: str, seed: int) -> None:
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


# ---------------------------------------------------------------------------------------------------------------------
# megatron.training (the pretrain() loop)

_TRAINING_SHIMS_ACTIVE = False


def _enable_training_shims() -> None:
    """Wrap the three ``megatron.training.initialize`` steps that assume a GPU (section 4 of patches/README.md)."""
    global _TRAINING_SHIMS_ACTIVE
    if _TRAINING_SHIMS_ACTIVE:
        return
    init = importlib.import_module("megatron.training.initialize")
    original_init, original_dist, original_seed = (
        init.initialize_megatron, init._initialize_distributed, init._set_random_seed
    )

    @functools.wraps(original_init)
    def initialize_megatron(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_no_cuda"] = True  # it asserts CUDA otherwise
        return original_init(*args, **kwargs)

    @functools.wraps(original_dist)
    def initialize_distributed(*args: Any, **kwargs: Any) -> Any:
        # Without a GPU it joins the process group but skips model-parallel initialisation (`device_count() > 0`);
        # a second call, with the group already joined, runs Megatron's own initialize_model_parallel call.
        original_dist(*args, **kwargs)
        device_count = torch.cuda.device_count
        torch.cuda.device_count = lambda: 1
        try:
            return original_dist(*args, **kwargs)
        finally:
            torch.cuda.device_count = device_count

    @functools.wraps(original_seed)
    def set_random_seed(seed_: int, data_parallel_random_init: bool = False, *args: Any, **kwargs: Any) -> None:
        # Megatron seeds its model-parallel RNG streams only when a GPU exists; add them on the CPU generator with
        # the seed Megatron would use (offset by pipeline rank, and by data-parallel rank if asked).
        from megatron.core import parallel_state as ps

        original_seed(seed_, data_parallel_random_init, *args, **kwargs)
        seed = seed_ + 100 * ps.get_pipeline_model_parallel_rank()
        if data_parallel_random_init:
            seed += 10 * ps.get_data_parallel_rank()
        _install_cpu_rng_tracker(seed)

    # validate_args asks the GPU architecture (e.g. whether TP needs CUDA_DEVICE_MAX_CONNECTIONS=1): none here
    utils = importlib.import_module("megatron.training.utils.common_utils")
    _replace_everywhere(utils, "get_device_arch_version", lambda: 0)
    # JIT warm-up of the GPU fusions: on CPU it would only draw from the CPU generator (its dropout calls), with
    # TP/SP-dependent shapes, so initial weights would depend on the layout
    _replace_everywhere(init, "_warmup_jit_function", lambda tp_size=None: None)
    _replace_everywhere(init, "initialize_megatron", initialize_megatron)
    _replace_everywhere(init, "_initialize_distributed", initialize_distributed)
    _replace_everywhere(init, "_set_random_seed", set_random_seed)
    _TRAINING_SHIMS_ACTIVE = True
