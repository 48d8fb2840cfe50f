"""Builders shared by the model tests (they run inside `run_distributed` workers)."""

from __future__ import annotations

from typing import Any

import torch

from xlstm_megatron.compat import cpu_config_overrides
from xlstm_megatron.layers.config import XLSTMConfig, make_xlstm_config
from xlstm_megatron.models.xlstm_model import XLSTMModel


def tiny_config(block: str = "large", **kwargs: Any) -> XLSTMConfig:
    from megatron.core import parallel_state as ps

    base = dict(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        params_dtype=torch.float32,
        **cpu_config_overrides(),
    )
    return make_xlstm_config(block, **{**base, **kwargs})


def build_model(config: XLSTMConfig, vocab_size: int, seq_length: int, **kwargs: Any) -> XLSTMModel:
    from megatron.core import parallel_state as ps

    return XLSTMModel(
        config,
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        **kwargs,
    )


def _local_parts(model: torch.nn.Module, name: str, param: torch.Tensor) -> list[int]:
    """Sizes (along the TP partition dim) of the logical parts a local shard holds, in order."""
    dim = param.partition_dim
    if name.endswith("in_proj.weight"):  # fused projections of our mixers
        return list(model.get_submodule(name.rsplit(".", 2)[0]).split_sizes)
    stride = getattr(param, "partition_stride", 1)  # Megatron's GLU fc1: [gate | up] per rank
    return [param.shape[dim] // stride] * stride


def gather_full(model: torch.nn.Module, name: str, local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The logical (TP=1) tensor of a TP-sharded parameter or gradient, gathered over the TP group."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_world_size() == 1:
        return local.detach().clone()
    dim, group = param.partition_dim, ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    pieces = []
    for part in local.split(_local_parts(model, name, param), dim=dim):
        bufs = [torch.empty_like(part) for _ in range(tp)]
        torch.distributed.all_gather(bufs, part.contiguous(), group=group)
        pieces.append(torch.cat(bufs, dim=dim))
    return torch.cat(pieces, dim=dim)


def randomize_tp_invariant(model: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Fill every parameter with random values that are the same logical model for every TP size."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not getattr(p, "tensor_model_parallel", False) or tp == 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)
                continue
            dim = p.partition_dim
            parts = _local_parts(model, name, p)
            local = []
            for size in parts:
                shape = list(p.shape)
                shape[dim] = size * tp
                local.append(torch.randn(shape, generator=g).mul_(std).chunk(tp, dim=dim)[rank])
            p.copy_(torch.cat(local, dim=dim))
