"""A model for generation from a Megatron checkpoint of ours (what `xlstm-megatron train` / `pretrain()` saves, or a
converter writes).

`--load` is the run's `--save` directory (`latest_checkpointed_iteration.txt`, `iter_NNNNNNN/`) or one `iter_*`
directory. The model is the one the checkpoint's saved Megatron args define, laid out for generation (TP as asked,
PP 1, no sequence parallel); only its weights are read (no optimizer), resharded from whatever TP/PP it was saved at.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch

from xlstm_megatron.runs.errors import ConfigError


@dataclass(frozen=True)
class CheckpointSource:
    """What a generation worker needs to rebuild the model (small and picklable)."""

    args: Namespace
    """The checkpoint's saved args in the generation layout (TP as asked, PP 1, no sequence parallel)."""
    path: Path
    """The iteration directory."""

    @property
    def vocab_size(self) -> int:
        return int(self.args.padded_vocab_size)

    @property
    def tensor_model_parallel_size(self) -> int:
        return int(self.args.tensor_model_parallel_size)


def _layer_config(args: Namespace):
    """The layer config of either family: an XLSTMConfig, or the Transformer baseline's TransformerConfig."""
    from xlstm_megatron.runs.model import is_transformer, transformer_config_from_args, xlstm_config_from_args

    return (transformer_config_from_args if is_transformer(args) else xlstm_config_from_args)(args)


def generation_args(saved: Namespace, tensor_parallel: int | None = None) -> Namespace:
    """Saved args laid out for generation on this machine: TP as asked (default the run's), PP 1, no sequence
    parallel; without CUDA, the kernels that need it fall back to torch (the weights are the same)."""
    from xlstm_megatron.runs.checkpoint import with_layout

    args = with_layout(saved, tensor_parallel or saved.tensor_model_parallel_size)
    if not torch.cuda.is_available():
        args.mlstm_kernel = "auto" if args.mlstm_kernel == "triton" else args.mlstm_kernel
        args.slstm_kernel = "auto" if args.slstm_kernel == "triton" else args.slstm_kernel
        args.fp8 = None
    return args


def resolve_checkpoint(load: str | Path, iteration: int | None = None, tensor_parallel: int | None = None,
                       seed: int | None = None) -> CheckpointSource:
    """Find the checkpoint and read its saved args; raises ConfigError (one line, with the fix) for a missing or
    foreign directory and for a TP the model cannot be split over."""
    from xlstm_megatron.runs.checkpoint import resolve_checkpoint_dir, saved_args

    path = resolve_checkpoint_dir(load, iteration)
    args = generation_args(saved_args(path), tensor_parallel)
    if seed is not None:
        args.seed = seed
    _layer_config(args)  # the model's own checks (heads divisible by TP, ...), before any process starts
    tp, vocab = args.tensor_model_parallel_size, args.padded_vocab_size
    if vocab % tp:
        raise ConfigError(f"the checkpoint's vocab {vocab} does not split over TP={tp}; use another TP")
    return CheckpointSource(args, path)


@torch.no_grad()
def load_model(source: CheckpointSource) -> torch.nn.Module:
    """Build the model on this rank (parallel state initialised at the source's TP, PP 1) and load its weights."""
    from megatron.core.transformer.module import Float16Module

    from xlstm_megatron.runs.checkpoint import load_model_weights
    from xlstm_megatron.runs.model import build_xlstm_model

    config = _layer_config(source.args)
    model: torch.nn.Module = build_xlstm_model(source.args, config, pre_process=True, post_process=True)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if source.args.bf16 or source.args.fp16:
        model = Float16Module(config, model)
    load_model_weights([model], source.path)
    return model.eval()
