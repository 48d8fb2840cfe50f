"""The xLSTM-Large (xLSTM 7B) mLSTM mixer, in the `self_attention` slot of a Megatron TransformerLayer.

    x [S, B, E] -> in_proj (column-parallel, one GEMM for q | k | v | o | i | f of this rank's heads)
      -> i, f = soft_cap(. + bias) -> mLSTM cell (chunkwise) -> per-head LayerNorm -> * sigmoid(o)
      -> out_proj (row-parallel) -> (y, bias)

Heads are split over tensor-parallel ranks; everything between the two projections is head-local, so the only
collectives are the ones inside the column/row-parallel linears (all-gather / reduce-scatter under sequence parallel).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from xlstm_megatron.layers.config import XLSTMConfig
from xlstm_megatron.layers.parallel_utils import (
    HeadParallelMixer,
    fill_fused_rows,
    local_count,
    mixer_sharded_state_dict,
)
from xlstm_megatron.layers.recurrent_context import mlstm_with_state, recurrent_context_of
from xlstm_megatron.ops.init import mlstm_forget_gate_bias, normal_init_method, small_init_std
from xlstm_megatron.ops.norms import head_norm
from xlstm_megatron.ops.softcap import soft_cap

# Input-gate bias of the official (HF) initialisation: the gate starts almost closed.
LARGE_INPUT_GATE_BIAS = -10.0


@dataclass
class MLSTMLargeMixerSubmodules:
    in_proj: ModuleSpec | type | None = None
    out_proj: ModuleSpec | type | None = None


class MLSTMLargeMixer(HeadParallelMixer):
    def __init__(
        self,
        config: XLSTMConfig,
        submodules: MLSTMLargeMixerSubmodules,
        layer_number: int = 1,
        pg_collection: ProcessGroupCollection | None = None,
        name: str | None = None,
        **_: object,
    ) -> None:
        super().__init__(config, layer_number, pg_collection)

        E, NH = config.hidden_size, config.num_attention_heads
        self.num_heads = NH
        self.qk_head_dim = config.mlstm_qk_width // NH
        self.v_head_dim = config.mlstm_v_width // NH
        self.local_heads = local_count(NH, self.tp_size, "num_attention_heads")
        h = self.local_heads
        # Local row layout of in_proj; the checkpoint stores each part as its own tensor.
        self.split_sizes = [h * self.qk_head_dim, h * self.qk_head_dim, h * self.v_head_dim, h * self.v_head_dim, h, h]
        self.split_names = ["q", "k", "v", "ogate", "igate", "fgate"]

        self.in_proj = build_module(
            submodules.in_proj,
            E,
            NH * (2 * self.qk_head_dim + 2 * self.v_head_dim + 2),
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="mlstm_in",
            tp_group=self.tp_group,
        )
        self.out_proj = build_module(
            submodules.out_proj,
            NH * self.v_head_dim,
            E,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="mlstm_out",
            tp_group=self.tp_group,
        )
        self.igate_bias = self.local_parameter(torch.full((NH,), LARGE_INPUT_GATE_BIAS))
        self.fgate_bias = self.local_parameter(mlstm_forget_gate_bias(NH))
        self.norm_weight = self.local_parameter(torch.ones(NH * self.v_head_dim))
        self.recompute_cell = config.recomputes("mlstm_cell")
        if config.perform_initialization:
            small = normal_init_method(small_init_std(E))
            qk, v = NH * self.qk_head_dim, NH * self.v_head_dim
            # Official (HF) init: q, k, v small-init; every gate projection starts at zero.
            parts = [(qk, small), (qk, small), (v, small), (v, None), (NH, None), (NH, None)]
            fill_fused_rows(self.in_proj.weight, parts, self.tp_rank, self.tp_size)

    def forward(
        self, hidden_states: torch.Tensor, inference_context: object = None, **attention_inputs: object
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states: [S(/tp under sequence parallel), B, E] -> ([same], bias). With a
        `RecurrentInferenceContext`, the cell continues from this layer's stored state and stores the new one."""
        cfg: XLSTMConfig = self.config
        context = recurrent_context_of(inference_context)
        proj, _ = self.in_proj(hidden_states)  # [S, B, local width]
        q, k, v, o, i, f = torch.split(proj, self.split_sizes, dim=-1)
        S, B = proj.shape[:2]
        doc_starts = self.document_starts(attention_inputs, B, S, proj.device, generating=context is not None)
        h = self.local_heads

        def heads(t: torch.Tensor, d: int) -> torch.Tensor:  # [S, B, h*d] -> [B, h, S, d]
            return t.reshape(S, B, h, d).permute(1, 2, 0, 3)

        i = soft_cap(i + self.igate_bias, cfg.gate_soft_cap).permute(1, 2, 0)
        f = soft_cap(f + self.fgate_bias, cfg.gate_soft_cap).permute(1, 2, 0)
        q, k, v = heads(q, self.qk_head_dim), heads(k, self.qk_head_dim), heads(v, self.v_head_dim)
        if context is None:
            cell = partial(self.mlstm_cell, doc_starts=doc_starts)
            out = self.run_cell(self.recompute_cell, cell, q, k, v, i, f)  # [B, h, S, DV]
        else:
            out, state = mlstm_with_state(
                q, k, v, i, f, context.get(self.layer_number), chunk_size=cfg.mlstm_chunk_size, eps=cfg.mlstm_eps,
                kernel=cfg.mlstm_kernel,
            )
            context.set(self.layer_number, state)
        out = head_norm(out.permute(2, 0, 1, 3), self.norm_weight, eps=cfg.head_norm_eps)  # [S, B, h, DV]
        out = out.reshape(S, B, h * self.v_head_dim) * torch.sigmoid(o)
        return self.out_proj(out)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        return mixer_sharded_state_dict(
            self, prefix, sharded_offsets, metadata, self.tp_group,
            local_param_axes={"igate_bias": 0, "fgate_bias": 0, "norm_weight": 0},
            fused_splits={"in_proj.weight": (self.split_sizes, self.split_names)},
        )
