"""The v1 sLSTM mixer: the post-up-projection block's inner layer (its gated FFN is Megatron's MLP).

    x [S, B, E] -> this rank's heads' channels -> x_c = SiLU(causal conv(x))
      gates: i, f from x_c; z, o from x (block-diagonal per head) -> sLSTM recurrence (block-diagonal R per head)
      -> GroupNorm -> all heads gathered back to [S, B, E]   (no output projection)

Memory mixing happens only within a head, so heads are split over tensor-parallel ranks with no communication
inside the recurrence: the input is replicated (or all-gathered under sequence parallel) and the output's head
channels are all-gathered (and re-split along the sequence under sequence parallel).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)

from xlstm_megatron.layers.config import XLSTMConfig
from xlstm_megatron.layers.mlstm_v1 import conv_init_
from xlstm_megatron.layers.parallel_utils import (
    HeadParallelMixer,
    local_count,
    mixer_sharded_state_dict,
)
from xlstm_megatron.layers.recurrent_context import conv_with_state, recurrent_context_of
from xlstm_megatron.ops.headwise import headwise_linear
from xlstm_megatron.ops.init import normal_init_method, slstm_forget_gate_bias, small_init_std
from xlstm_megatron.ops.kernels import slstm_kernel
from xlstm_megatron.ops.norms import head_norm

GATES = ("i", "f", "z", "o")
SLSTM_NO_CONTEXT_PARALLEL = (
    "sLSTM layers ('s') cannot be split over the sequence: memory mixing makes the recurrence strictly sequential, "
    "so context-parallel ranks would run one after another (no speed-up); use TP/PP/DP or a pattern without 's'"
)


class SLSTMMixer(HeadParallelMixer):
    def __init__(
        self,
        config: XLSTMConfig,
        submodules: object = None,
        layer_number: int = 1,
        pg_collection: ProcessGroupCollection | None = None,
        name: str | None = None,
        **_: object,
    ) -> None:
        super().__init__(config, layer_number, pg_collection)
        if self.cp_size > 1:
            raise ValueError(f"context parallel size {self.cp_size}: {SLSTM_NO_CONTEXT_PARALLEL}")
        E, NH = config.hidden_size, config.slstm_heads
        self.head_dim = E // NH
        self.local_heads = local_count(NH, self.tp_size, "slstm_num_heads")
        self.local_width = self.local_heads * self.head_dim

        local = self.local_parameter
        K, DH = config.conv_kernel_size, self.head_dim
        conv_w, conv_b = torch.empty(E, K), torch.empty(E)
        conv_init_(conv_w, K)
        conv_init_(conv_b, K)
        self.conv_weight, self.conv_bias = local(conv_w), local(conv_b)
        gate_w = torch.empty(NH, 4, DH, DH)  # [head, gate (i, f, z, o), out, in]
        normal_init_method(small_init_std(E))(gate_w)
        self.gate_weight = local(gate_w)
        self.recurrent_weight = local(torch.zeros(NH, DH, 4, DH))  # [head, in, gate, out]
        bias = torch.zeros(NH, 4, DH)
        bias[:, 1] = slstm_forget_gate_bias(DH, layer_number - 1, config.num_layers)
        self.bias = local(bias)
        self.norm_weight = local(torch.zeros(E))
        self.recompute_cell = config.recomputes("slstm_cell")

    def forward(
        self, hidden_states: torch.Tensor, inference_context: object = None, **attention_inputs: object
    ) -> tuple[torch.Tensor, None]:
        """hidden_states: [S(/tp under sequence parallel), B, E] -> ([same], None). With a
        `RecurrentInferenceContext`, conv and recurrence continue from this layer's stored state and store the new
        one."""
        cfg: XLSTMConfig = self.config
        context = recurrent_context_of(inference_context)
        if cfg.sequence_parallel and self.tp_size > 1:
            x = gather_from_sequence_parallel_region(hidden_states, group=self.tp_group)
        else:
            x = copy_to_tensor_model_parallel_region(hidden_states, group=self.tp_group)
        start = self.tp_rank * self.local_width
        x = x[..., start : start + self.local_width].transpose(0, 1)  # [B, S, local width]
        doc_starts = self.document_starts(attention_inputs, *x.shape[:2], x.device, generating=context is not None)
        state = None if context is None else context.get(self.layer_number)
        if context is None:
            x_conv = self.causal_conv(x, self.conv_weight, self.conv_bias, doc_starts)
        else:
            x_conv, conv_state = conv_with_state(
                x, self.conv_weight, self.conv_bias, None if state is None else state[0]
            )
        x_c = F.silu(x_conv)
        if context is None:
            y = self.run_cell(self.recompute_cell, partial(self._cell, doc_starts=doc_starts), x, x_c,
                              self.gate_weight, self.recurrent_weight, self.bias)  # [B, S, h, DH]
        else:
            y, cell_state = self._cell(x, x_c, self.gate_weight, self.recurrent_weight, self.bias,
                                       None if state is None else state[1:], with_state=True)
            context.set(self.layer_number, (conv_state, *cell_state))
        y = head_norm(y, self.norm_weight, eps=cfg.head_norm_eps, weight_offset=1.0).flatten(-2)
        y = gather_from_tensor_model_parallel_region(y.transpose(0, 1).contiguous(), group=self.tp_group)
        if cfg.sequence_parallel and self.tp_size > 1:
            y = scatter_to_sequence_parallel_region(y, group=self.tp_group)
        return y, None

    def _cell(self, x: torch.Tensor, x_c: torch.Tensor, gate_weight: torch.Tensor, recurrent_weight: torch.Tensor,
              bias: torch.Tensor, initial_state: tuple | None = None, with_state: bool = False,
              doc_starts: torch.Tensor | None = None):
        """Gate pre-activations W x (i, f from the conv'd input, z, o from the input) and the recurrence. x, x_c:
        [B, S, local width] -> y [B, S, h, DH] (and the final state with `with_state`). W x is
        inside because it exists only for the cell: recomputing it keeps 4 x fewer bytes than keeping it."""
        cfg: XLSTMConfig = self.config
        B, S = x.shape[:2]
        h, DH = self.local_heads, self.head_dim
        w = gate_weight.to(x.dtype)  # [h, gate (i, f, z, o), DH out, DH in]
        wx_if = headwise_linear(x_c, w[:, :2].flatten(1, 2)).reshape(B, S, h, 2, DH)
        wx_zo = headwise_linear(x, w[:, 2:].flatten(1, 2)).reshape(B, S, h, 2, DH)
        y, state = slstm_kernel(
            torch.cat([wx_if, wx_zo], dim=3), recurrent_weight, bias, kernel=cfg.slstm_kernel,
            forget_gate=cfg.slstm_forget_gate, initial_state=initial_state, doc_starts=doc_starts,
        )
        return (y, state) if with_state else y

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        axes = dict.fromkeys(["conv_weight", "conv_bias", "gate_weight", "recurrent_weight", "bias", "norm_weight"], 0)
        return mixer_sharded_state_dict(self, prefix, sharded_offsets, metadata, self.tp_group, axes)
