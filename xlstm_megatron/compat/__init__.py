"""Compatibility shims; ``megatron_cpu`` makes Megatron-Core run on CPU/gloo (see ``patches/README.md``)."""

from xlstm_megatron.compat.megatron_cpu import (
    cpu_config_overrides,
    enable_megatron_cpu_compat,
    is_cpu_compat_active,
    model_parallel_manual_seed,
)

__all__ = [
    "cpu_config_overrides",
    "enable_megatron_cpu_compat",
    "is_cpu_compat_active",
    "model_parallel_manual_seed",
]
