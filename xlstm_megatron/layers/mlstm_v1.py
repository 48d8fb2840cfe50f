"""The v1 (NeurIPS 2024) mLSTM mixer: the pre-up-projection block's inner layer.

    x [S, B, E] -> in_proj (column-parallel: x_m | z, this rank's heads' channels of the up-projection)
      x_c = SiLU(causal depthwise conv(x_m));  q, k = headwise(x_c);  v = headwise(x_m)
      i, f = Linear(cat[q, k, v]) per head   <- reads every head's channels: one small all-reduce over TP
      h = GroupNorm(mLSTM cell(q, k, v, i, f)) + skip * x_c;  y = out_proj(h * SiLU(z))   (row-parallel)

The gate projection is the only cross-head operation. Each rank multiplies its own channels with its column slice of
the gate weight; the partial sums of all heads are all-reduced, and each rank keeps its heads (backward: all-gather).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from xlstm_megatron.layers.config import XLSTMConfig
from xlstm_megatron.layers.parallel_utils import (
    HeadParallelMixer,
    fill_fused_rows,
    local_count,
    mixer_sharded_state_dict,
)
from xlstm_megatron.layers.recurrent_context import conv_with_state, mlstm_with_state, recurrent_context_of
from xlstm_megatron.ops.headwise import headwise_linear
from xlstm_megatron.ops.init import mlstm_forget_gate_bias, normal_init_method, small_init_std
from xlstm_megatron.ops.norms import head_norm


@dataclass
class MLSTMV1MixerSubmodules:
    in_proj: ModuleSpec | type | None = None
    out_proj: ModuleSpec | type | None = None


def conv_init_(t: torch.Tensor, kernel_size: int) -> None:
    """torch's default Conv1d init for a depthwise filter (fan-in = kernel size), as the official blocks use."""
    bound = 1.0 / math.sqrt(kernel_size)
    t.uniform_(-bound, bound)


class MLSTMV1Mixer(HeadParallelMixer):
    def __init__(
        self,
        config: XLSTMConfig,
        submodules: MLSTMV1MixerSubmodules,
        layer_number: int = 1,
        pg_collection: ProcessGroupCollection | None = None,
        name: str | None = None,
        **_: object,
    ) -> None:
        super().__init__(config, layer_number, pg_collection)

        E, NH, inner, bs = config.hidden_size, config.num_attention_heads, config.mlstm_inner_size, \
            config.mlstm_qkv_block_size
        self.num_heads, self.inner = NH, inner
        self.head_dim = inner // NH
        self.local_heads = local_count(NH, self.tp_size, "num_attention_heads")
        self.local_inner = self.local_heads * self.head_dim
        self.split_sizes, self.split_names = [self.local_inner] * 2, ["x", "z"]  # local rows of in_proj
        self.in_proj = build_module(
            submodules.in_proj, E, 2 * inner, config=config, init_method=config.init_method, gather_output=False,
            bias=config.add_bias_linear, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="mlstm_v1_in",
            tp_group=self.tp_group,
        )
        self.out_proj = build_module(
            submodules.out_proj, inner, E, config=config, init_method=config.output_layer_init_method,
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=True, is_expert=False,
            tp_comm_buffer_name="mlstm_v1_out", tp_group=self.tp_group,
        )

        local = self.local_parameter
        small = normal_init_method(small_init_std(E))
        K = config.conv_kernel_size
        conv_w, conv_b = torch.empty(inner, K), torch.empty(inner)
        conv_init_(conv_w, K)
        conv_init_(conv_b, K)
        self.conv_weight, self.conv_bias = local(conv_w), local(conv_b)
        qkv = []
        for _ in range(3):
            w = torch.empty(inner // bs, bs, bs)
            small(w)  # official: small init with the embedding dim, not the inner one
            qkv.append(local(w))
        self.q_weight, self.k_weight, self.v_weight = qkv
        # Gate weight [source (q, k, v), channel, head, gate (i, f)]; this rank holds its own channels.
        self.gate_weight = local(torch.zeros(3, inner, NH, 2), dim=1)
        # Two 1-D biases (not one [NH, 2] tensor): Megatron exempts 1-D parameters from weight decay, as the
        # official model's nn.Linear biases are.
        self.igate_bias = local(torch.randn(NH) * 0.1)
        self.fgate_bias = local(mlstm_forget_gate_bias(NH))
        self.learnable_skip = local(torch.ones(inner))
        self.norm_weight = local(torch.zeros(inner))
        self.recompute_cell = config.recomputes("mlstm_cell")
        if config.perform_initialization:
            fill_fused_rows(self.in_proj.weight, [(inner, small), (inner, small)], self.tp_rank, self.tp_size)

    def forward(
        self, hidden_states: torch.Tensor, inference_context: object = None, **attention_inputs: object
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states: [S(/tp under sequence parallel), B, E] -> ([same], bias). With a
        `RecurrentInferenceContext`, conv and cell continue from this layer's stored state and store the new one."""
        cfg: XLSTMConfig = self.config
        context = recurrent_context_of(inference_context)
        proj, _ = self.in_proj(hidden_states)  # [S, B, 2 * local_inner]
        x_m, z = proj.chunk(2, dim=-1)
        S, B = proj.shape[:2]
        doc_starts = self.document_starts(attention_inputs, B, S, proj.device, generating=context is not None)
        h = self.local_heads
        state = None if context is None else context.get(self.layer_number)
        if context is None:
            x_conv = self.causal_conv(x_m.transpose(0, 1), self.conv_weight, self.conv_bias, doc_starts)
        else:
            x_conv, conv_state = conv_with_state(
                x_m.transpose(0, 1), self.conv_weight, self.conv_bias, None if state is None else state[0]
            )
        x_c = F.silu(x_conv.transpose(0, 1))
        q, k = headwise_linear(x_c, self.q_weight), headwise_linear(x_c, self.k_weight)
        v = headwise_linear(x_m, self.v_weight)

        gates = self._gate_preactivations(torch.cat([q, k, v], dim=-1))  # [S, B, h, 2]
        i, f = (gates[..., g].permute(1, 2, 0) for g in range(2))

        def heads(t: torch.Tensor) -> torch.Tensor:  # [S, B, h*d] -> [B, h, S, d]
            return t.reshape(S, B, h, self.head_dim).permute(1, 2, 0, 3)

        if context is None:
            cell = partial(self.mlstm_cell, doc_starts=doc_starts)
            out = self.run_cell(self.recompute_cell, cell, heads(q), heads(k), heads(v), i, f)
        else:
            out, cell_state = mlstm_with_state(
                heads(q), heads(k), heads(v), i, f, None if state is None else state[1:],
                chunk_size=cfg.mlstm_chunk_size, eps=cfg.mlstm_eps, kernel=cfg.mlstm_kernel,
            )
            context.set(self.layer_number, (conv_state, *cell_state))
        out = head_norm(out.permute(2, 0, 1, 3), self.norm_weight, eps=cfg.head_norm_eps, weight_offset=1.0)
        out = out.reshape(S, B, self.local_inner) + self.learnable_skip * x_c
        return self.out_proj(out * F.silu(z))

    def _gate_preactivations(self, qkv_local: torch.Tensor) -> torch.Tensor:
        """[S, B, 3*local_inner] (this rank's q | k | v channels) -> [S, B, local heads, 2] gate pre-activations."""
        # partial sums over this rank's channels, all heads, as W^T x^T with W^T contiguous: autograd then forms the
        # skinny weight gradient as dy^T x, which BLAS does ~10x faster on CPU than x^T dy (the einsum's choice)
        w_t = self.gate_weight.to(qkv_local.dtype).flatten(0, 1).flatten(1).t().contiguous()  # [NH*2, 3*local_inner]
        partial = (w_t @ qkv_local.flatten(0, 1).t()).t().contiguous().unflatten(0, qkv_local.shape[:2])
        full = reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
        mine = scatter_to_tensor_model_parallel_region(full, group=self.tp_group)  # backward: all-gather
        return mine.unflatten(-1, (self.local_heads, 2)) + torch.stack([self.igate_bias, self.fgate_bias], dim=-1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        axes = dict.fromkeys(
            ["conv_weight", "conv_bias", "q_weight", "k_weight", "v_weight", "igate_bias", "fgate_bias",
             "learnable_skip", "norm_weight"], 0,
        )
        axes["gate_weight"] = 1
        return mixer_sharded_state_dict(
            self, prefix, sharded_offsets, metadata, self.tp_group, axes,
            fused_splits={"in_proj.weight": (self.split_sizes, self.split_names)},
        )
