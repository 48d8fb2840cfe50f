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


def build_model(
    config: XLSTMConfig, vocab_size: int, seq_length: int, vp_stage: int | None = None, **kwargs: Any
) -> XLSTMModel:
    from megatron.core import parallel_state as ps

    pp_rank, pp = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    vpp = config.virtual_pipeline_model_parallel_size or 1
    v = vp_stage or 0
    return XLSTMModel(
        config,
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        pre_process=pp_rank == 0 and v == 0,
        post_process=pp_rank == pp - 1 and v == vpp - 1,
        vp_stage=vp_stage,
        **kwargs,
    )


def global_name(model: torch.nn.Module, name: str) -> str:
    """A parameter name with the pipeline stage's local layer index replaced by the global one."""
    if not name.startswith("decoder.layers."):
        return name
    index, rest = name[len("decoder.layers."):].split(".", 1)
    return f"decoder.layers.{model.decoder.layers[int(index)].layer_number - 1}.{rest}"


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
    """Fill every parameter with random values that are the same logical model for every TP and PP size."""
    import zlib

    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(seed + zlib.crc32(global_name(model, name).encode()))
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


def official_v1_model(E: int, NHm: int, NHs: int, pattern: str, context_length: int, vocab_size: int) -> tuple:
    """(model, config): the official `xlstm` v1 `xLSTMLMModel` for a pattern of 'm'/'s' blocks, with the settings the
    v1 tests compare against (conv 4, q/k/v blocks of 4, vanilla sLSTM, GELU FFN x1.3). Weights as `xlstm` inits them
    under the caller's seed."""
    from xlstm import (
        FeedForwardConfig,
        mLSTMBlockConfig,
        mLSTMLayerConfig,
        sLSTMBlockConfig,
        sLSTMLayerConfig,
        xLSTMLMModel,
        xLSTMLMModelConfig,
    )

    config = xLSTMLMModelConfig(
        mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(conv1d_kernel_size=4, qkv_proj_blocksize=4, num_heads=NHm)),
        slstm_block=sLSTMBlockConfig(
            slstm=sLSTMLayerConfig(backend="vanilla", num_heads=NHs, conv1d_kernel_size=4),
            feedforward=FeedForwardConfig(proj_factor=1.3, act_fn="gelu"),
        ),
        context_length=context_length, num_blocks=len(pattern), embedding_dim=E, vocab_size=vocab_size,
        slstm_at=[i for i, c in enumerate(pattern) if c == "s"],
    )
    return xLSTMLMModel(config), config
