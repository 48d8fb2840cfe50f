"""Compatibility shims; ``megatron_cpu`` makes Megatron-Core run on CPU/gloo (see ``patches/README.md``)."""

from xlstm_megatron.compat.megatron_cpu import (
    cpu_config_overrides,
    enable_megatron_cpu_compat,
    is_cpu_compat_active,
    megatron_cpu_context,
    model_parallel_manual_seed,
)
from xlstm_megatron.compat.megatron_training import enable_pretrain_fixes, enable_pretrain_shims, pretrain_context

__all__ = [
    "cpu_config_overrides",
    "enable_megatron_cpu_compat",
    "enable_pretrain_fixes",
    "enable_pretrain_shims",
    "is_cpu_compat_active",
    "megatron_cpu_context",
    "model_parallel_manual_seed",
    "pretrain_context",
]
