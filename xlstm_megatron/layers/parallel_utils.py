"""Tensor-parallel helpers shared by the xLSTM mixers: head partitioning, head-local parameters, checkpoint maps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.ssm.utils import _split_tensor_factory
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import checkpoint as tp_checkpoint
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from xlstm_megatron.ops.init import gathered_for_write


def tp_group_of(pg_collection: ProcessGroupCollection | None) -> torch.distributed.ProcessGroup | None:
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    return pg_collection.tp


def cp_group_of(pg_collection: ProcessGroupCollection | None) -> torch.distributed.ProcessGroup | None:
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    return getattr(pg_collection, "cp", None)


def tp_rank_and_size(tp_group: torch.distributed.ProcessGroup | None) -> tuple[int, int]:
    if tp_group is None or not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(tp_group), torch.distributed.get_world_size(tp_group)


def local_count(total: int, tp_size: int, what: str) -> int:
    if total % tp_size:
        raise ValueError(f"{what}={total} is not divisible by tensor_model_parallel_size={tp_size}")
    return total // tp_size


def head_local_parameter(
    full: torch.Tensor, tp_rank: int, tp_size: int, dtype: torch.dtype, dim: int = 0
) -> torch.nn.Parameter:
    """A parameter holding this rank's slice (along `dim`: heads or head channels) of a canonically initialised full
    tensor; marked tensor-parallel so Megatron's optimizer, grad clipping and checkpoints treat it as sharded."""
    local = full.chunk(tp_size, dim=dim)[tp_rank].to(dtype).contiguous()
    param = torch.nn.Parameter(local)
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
    return param


# What TransformerLayer passes its `self_attention` module besides the hidden states and the inference context.
_ATTENTION_INPUTS = frozenset({
    "attention_mask", "rotary_pos_emb", "rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin", "attention_bias",
    "packed_seq_params", "sequence_len_offset",
})


class HeadParallelMixer(MegatronModule):
    """Base of the xLSTM mixers: their tensor- and context-parallel groups, and parameters holding this rank's heads.

    Under context parallelism (CP) the local sequence is this rank's pieces in Megatron's zigzag layout
    (`ops.context_parallel.cp_pieces`); the mLSTM cell continues each piece from the state the earlier pieces leave
    (`ops.mlstm.context_parallel`), the v1 conv from their last inputs."""

    def __init__(
        self, config: TransformerConfig, layer_number: int, pg_collection: ProcessGroupCollection | None
    ) -> None:
        super().__init__(config)
        self.layer_number = layer_number
        self.tp_group = tp_group_of(pg_collection)
        self.tp_rank, self.tp_size = tp_rank_and_size(self.tp_group)
        self.cp_group = cp_group_of(pg_collection)
        self.cp_size = tp_rank_and_size(self.cp_group)[1]

    def local_parameter(self, full: torch.Tensor, dim: int = 0) -> torch.nn.Parameter:
        return head_local_parameter(full, self.tp_rank, self.tp_size, self.config.params_dtype, dim)

    def document_starts(self, attention_inputs: dict[str, Any], batch: int, seq: int, device: torch.device,
                        generating: bool = False) -> torch.Tensor | None:
        """(B, S_local) bool, true at each document's first token, or None (one document per row).

        The mixers sit in Megatron's `self_attention` slot and receive what TransformerLayer passes an attention
        module; the packed-document inputs among them become state resets:
        - `packed_seq_params` (THD: one row of concatenated documents, `cu_seqlens_q[_padded]` their offsets);
        - `attention_mask` [B or 1, 1, S_local, S] (True = hidden), as Megatron's dataset builds it under
          `--reset-attention-mask`: token p starts a document where it may not see token p - 1. Under CP the rows are
          this rank's zigzag pieces (the key axis stays whole). A plain causal mask marks no starts.
        The static-inference offset needs nothing; what would change the result otherwise is refused in one line,
        as are document starts while `generating` (the recurrent context holds one document per row)."""
        unknown = sorted(set(attention_inputs) - _ATTENTION_INPUTS)
        if unknown:
            raise TypeError(f"xLSTM mixer got unexpected arguments {unknown}")
        if attention_inputs.get("attention_bias") is not None:
            raise ValueError("xLSTM mixers have no attention scores to add attention_bias to; drop it")
        if any(attention_inputs.get(k) is not None for k in ("rotary_pos_emb", "rotary_pos_cos", "rotary_pos_sin",
                                                             "rotary_pos_cos_sin")):
            raise ValueError("xLSTM layers use no position embedding; drop --position-embedding-type rope")
        starts = self._starts(attention_inputs, batch, seq, device)
        if starts is not None and generating:
            raise ValueError("xLSTM generation continues one document per row; pass no packed sequences or "
                             "document-resetting attention mask with a RecurrentInferenceContext")
        return starts

    def _starts(self, attention_inputs: dict[str, Any], batch: int, seq: int,
                device: torch.device) -> torch.Tensor | None:
        packed = attention_inputs.get("packed_seq_params")
        if packed is not None:
            return self._thd_starts(packed, batch, seq, device)
        mask = attention_inputs.get("attention_mask")
        if mask is None:
            return None
        if mask.dim() != 4 or mask.shape[2] != seq or mask.dtype != torch.bool:
            raise ValueError(f"xLSTM mixers read document starts from a bool attention mask [B, 1, {seq}, S] "
                             f"(True = hidden), got {mask.dtype} {tuple(mask.shape)}")
        rows = torch.arange(seq, device=mask.device)
        if self.cp_size > 1:  # this rank's zigzag pieces: global position of each local row
            from xlstm_megatron.ops.context_parallel import cp_pieces

            piece = seq // 2
            first = torch.tensor(cp_pieces("zigzag", torch.distributed.get_rank(self.cp_group), self.cp_size),
                                 device=mask.device) * piece
            rows = (first[:, None] + torch.arange(piece, device=mask.device)).flatten()
        hidden_prev = mask[:, 0, torch.arange(seq, device=mask.device), (rows - 1).clamp(min=0)]  # [B or 1, S_local]
        # returned even when all false (a plain causal mask): testing for that would sync the GPU in every layer
        return (hidden_prev & (rows > 0)).expand(batch, seq).to(device)

    def _thd_starts(self, packed: Any, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        if getattr(packed, "qkv_format", "thd") != "thd":
            raise ValueError(f"xLSTM mixers take packed sequences in the 'thd' format, got {packed.qkv_format!r}")
        if self.cp_size > 1:
            raise ValueError("THD packed sequences under context parallelism are not supported by the xLSTM mixers "
                             "(Megatron splits them per document); use --reset-attention-mask batches or CP 1")
        if batch != 1:
            raise ValueError(f"THD packed sequences come as one row of concatenated documents, got {batch} rows")
        offsets = packed.cu_seqlens_q_padded if packed.cu_seqlens_q_padded is not None else packed.cu_seqlens_q
        starts = torch.zeros(1, seq, dtype=torch.bool, device=device)
        offsets = offsets[:-1].to(device=device, dtype=torch.long)
        starts[0, offsets[offsets < seq]] = True
        return starts

    def mlstm_cell(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                   doc_starts: torch.Tensor | None = None) -> torch.Tensor:
        """The chunkwise mLSTM cell with this config's kernel, chunk, backward semantics and eps (both mLSTM mixers);
        under CP the state-passing form around it."""
        from xlstm_megatron.ops.kernels import mlstm_chunkwise_kernel

        cfg = self.config
        options = dict(chunk_size=cfg.mlstm_chunk_size, backward=cfg.mlstm_backward, eps=cfg.mlstm_eps,
                       doc_starts=doc_starts)
        if self.cp_size > 1:
            from xlstm_megatron.ops.mlstm.context_parallel import mlstm_context_parallel

            return mlstm_context_parallel(
                q, k, v, i, f, group=self.cp_group, layout="zigzag",
                cell=partial(mlstm_chunkwise_kernel, kernel=cfg.mlstm_kernel), **options,
            )
        return mlstm_chunkwise_kernel(q, k, v, i, f, kernel=cfg.mlstm_kernel, **options)

    def causal_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    doc_starts: torch.Tensor | None = None) -> torch.Tensor:
        """Causal depthwise conv of x [B, S_local, C] (windows stop at document starts); under CP each piece starts
        from the previous piece's last inputs (its halo) instead of zeros."""
        from xlstm_megatron.ops.conv import causal_conv1d

        if self.cp_size == 1:
            return causal_conv1d(x, weight, bias, doc_starts=doc_starts)
        from xlstm_megatron.ops.context_parallel import join_pieces, previous_piece_tails, split_pieces

        pieces = split_pieces(x, 1, 2)  # zigzag: two pieces per rank
        starts = None if doc_starts is None else split_pieces(doc_starts, 1, 2)
        halo = previous_piece_tails(pieces, weight.shape[1] - 1, group=self.cp_group, layout="zigzag",
                                    doc_starts=starts)
        return join_pieces(causal_conv1d(pieces, weight, bias, state=halo, doc_starts=starts), 1, 2)

    def run_cell(self, recompute: bool, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`, under Megatron's activation checkpoint when `recompute` (the mixer's selective-recompute
        flag) is on and a backward will follow: only `args` are kept, `fn`'s activations are recomputed in backward
        with the RNG states of the forward (Megatron's `tensor_parallel.checkpoint`, as its core-attention recompute).
        `fn` must return one tensor (the state outputs of the cells are not checkpointed)."""
        if recompute and self.training and torch.is_grad_enabled():
            return tp_checkpoint(fn, False, *args)
        return fn(*args)


def fill_fused_rows(
    weight: torch.Tensor,
    parts: Sequence[tuple[int, Callable[[torch.Tensor], None] | None]],
    tp_rank: int,
    tp_size: int,
) -> None:
    """Initialise a column-parallel weight whose local rows are [part_0 | part_1 | ...] of this rank.

    Each part is given as (global rows, init fn or None for zeros). The full part is drawn on CPU with the default
    generator in a fixed order and the rank's slice copied in, so the model is the same for every TP size.
    """
    with torch.no_grad(), gathered_for_write(weight):  # a ZeRO-3 partitioned weight is written gathered
        start = 0
        for rows, init in parts:
            full = torch.zeros(rows, weight.shape[1], dtype=torch.float32)
            if init is not None:
                init(full)
            local = full.chunk(tp_size, dim=0)[tp_rank]
            weight[start : start + local.shape[0]].copy_(local.to(weight.device, weight.dtype))
            start += local.shape[0]
        if start != weight.shape[0]:
            raise AssertionError(f"fused parts cover {start} rows, weight has {weight.shape[0]}")


def mixer_sharded_state_dict(
    module: torch.nn.Module,
    prefix: str,
    sharded_offsets: tuple,
    metadata: dict | None,
    tp_group: torch.distributed.ProcessGroup | None,
    local_param_axes: dict[str, int],
    fused_splits: dict[str, tuple[list[int], list[str]]] | None = None,
) -> ShardedStateDict:
    """Sharded state dict for a mixer: its own head-local parameters are TP-sharded along the given axes, children
    use their own `sharded_state_dict`, and fused column-parallel weights are split into their logical parts so that
    checkpoints reshard across TP sizes (rows of a fused weight interleave across ranks)."""
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    own: dict = {}
    module._save_to_state_dict(own, "", keep_vars=True)
    fsdp2 = {name: t for name, t in own.items() if _fsdp2_dp_sharded(t)}
    sharded = make_sharded_tensors_for_checkpoint(
        {n: t for n, t in own.items() if n not in fsdp2}, prefix, local_param_axes, sharded_offsets,
        tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"],
    )
    for name, param in fsdp2.items():
        sharded[f"{prefix}{name}"] = _fsdp2_sharded_tensor(
            f"{prefix}{name}", param, local_param_axes.get(name), tp_group, sharded_offsets
        )
    for name, child in module.named_children():
        sharded.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata, tp_group))
    for key, (sections, names) in (fused_splits or {}).items():
        if _fsdp2_dp_sharded(module.get_parameter(key)):
            # torch FSDP2 shards the TP-local fused rows again over DP (contiguous row blocks that cut across the
            # parts), so the parts cannot be named separately: the fused tensor is saved as Megatron's helper lays it
            # out (TP x DP row blocks). Such checkpoints resume at the same TP size; they do not reshard over TP.
            continue
        sharded[f"{prefix}{key}"] = _split_tensor_factory(sharded[f"{prefix}{key}"], sections, names, 0)
    return sharded


def _fsdp2_sharded_tensor(
    key: str, param: torch.Tensor, tp_axis: int | None, tp_group: torch.distributed.ProcessGroup | None,
    prepend_offsets: tuple,
) -> ShardedTensor:
    """The checkpoint entry of a torch-FSDP2 parameter of a mixer. FSDP2 splits this TP rank's parameter along dim 0
    over DP like `torch.chunk`, unevenly where dim 0 does not divide (the mixers' leading dims are small: 3 q/k/v
    sources, a few heads), which Megatron's helper cannot express (it assumes equal pieces); the entry therefore names
    its rows explicitly (an irregular grid, which dist-checkpointing hands to torch DCP). The data is the DTensor's
    own local tensor object: the optimizer state is matched to model entries by identity."""
    local = param._local_tensor
    whole = tuple(param.shape)  # the DTensor's global shape = this TP rank's full parameter
    dp_rank, dp_size = param.device_mesh.get_local_rank(), param.device_mesh.size()
    rows = -(-whole[0] // dp_size)
    start = min(dp_rank * rows, whole[0])
    if local.shape[0] != min(rows, whole[0] - start):
        raise AssertionError(f"{key}: FSDP2 shard of {local.shape[0]} rows, expected torch.chunk's split of {whole}")
    tp_rank, tp_size = tp_rank_and_size(tp_group)
    shape, offset = list(whole), [0] * len(whole)
    if tp_axis is not None:
        shape[tp_axis] *= tp_size
        offset[tp_axis] = tp_rank * whole[tp_axis]
    offset[0] += start
    entry = ShardedTensor(
        key=key, data=local, dtype=local.dtype, local_shape=tuple(local.shape),
        global_shape=(*(size for _, _, size in prepend_offsets), *shape),
        global_offset=(*(rank for _, rank, _ in prepend_offsets), *offset),
        axis_fragmentations=None,  # irregular: validated by DCP
        replica_id=(0, 0 if tp_axis is not None else tp_rank, 0),  # every FSDP2 shard is a main replica
        prepend_axis_num=len(prepend_offsets),
    )
    entry.validate_metadata_integrity()
    entry.is_torch_fsdp2_param = True  # Megatron's marker, as its own helper sets it
    return entry


def _fsdp2_dp_sharded(param: torch.Tensor) -> bool:
    """Whether `param` is a torch-FSDP2 DTensor sharded over more than one data-parallel rank (Megatron marks the
    parameters its FSDP2 wrapper shards with `is_torch_fsdp2_param`)."""
    from torch.distributed.tensor import DTensor

    return bool(getattr(param, "is_torch_fsdp2_param", False)) and isinstance(param, DTensor) \
        and param.device_mesh.size() > 1
