"""A quiet start: the warnings Megatron-Core and torch print on every run that say nothing about this run, silenced
by exact message (real warnings keep printing). Called at the start of every command and in every rank it spawns.

Each entry says why it is harmless here.
"""

from __future__ import annotations

import logging
import warnings

import torch

# (category, message regex) of Python warnings
_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # Apex / Transformer Engine absent: Megatron falls back to torch norms, optimizers and multi-tensor ops (the
    # plugin's --transformer-impl choice already says which layers run; FP8 refuses to start without TE)
    (UserWarning, r"(Transformer Engine and Apex are|Apex is) not installed"),
    (UserWarning, r"Only transformer-engine>=1\.7\.0 supports MoE experts"),
    # import-time notes of Megatron modules the plugin does not use
    (UserWarning, r"MimoModelConfig is experimental"),
    (UserWarning, r"Could not determine rank from torch\.distributed"),
    # torch deprecations inside Megatron's own collectives
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    # single-process checkpoint reads (generation, conversion) by design
    (UserWarning, r"torch\.distributed is disabled, unavailable or uninitialized"),
    (UserWarning, r"The argument order of load has been changed"),
)
# (category, message regex, module regex): warnings Python raises while compiling Megatron's own source, i.e. on the
# first import after a fresh install (no .pyc yet): megatron-core 0.19's kv_block_allocator.py docstring has '\-'
_SOURCE_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (SyntaxWarning, r"invalid escape sequence", r".*[/\\]megatron[/\\]"),
)
_CPU_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
)
# (logger, message start) of log records
_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    # xLSTM layers need TransformerLayer specs, which HybridModel's closed symbol set cannot take (patches/README.md)
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),
    # Megatron wraps every MLP spec this way, its own GPT specs included
    ("megatron.core.transformer.transformer_layer", "Rewrapping ModuleSpec"),
    # logged for every dist-checkpoint save strategy, async or not
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated"),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: list[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_known_warnings() -> None:
    """Idempotent."""
    entries = _WARNINGS + (() if torch.cuda.is_available() else _CPU_WARNINGS)
    for category, message in entries:
        warnings.filterwarnings("ignore", message=f".*{message}", category=category)
    for category, message, module in _SOURCE_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{message}", category=category, module=module)
    by_logger: dict[str, list[str]] = {}
    for name, prefix in _LOG_RECORDS:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    if not torch.cuda.is_available():
        # "No CUDA runtime is found, using CUDA_HOME=..." at import: only CUDA extension builds would care
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
