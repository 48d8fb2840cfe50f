"""Megatron's MambaLayer with TransformerLayer's calling convention, so that a TransformerBlock can hold it.

Megatron runs MambaLayer only inside its HybridStack; the TransformerBlock that XLSTMModel uses builds each layer
with a stage-local number and `vp_stage`, calls it with the attention keywords and expects (hidden_states, context)
back. Imported only when a Mamba spec is built (importing MambaLayer pulls in Megatron's inference code).
"""

from __future__ import annotations

from typing import Any

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.utils import get_pg_rank
from torch import Tensor


class MambaStackLayer(MambaLayer):
    def __init__(self, config: TransformerConfig, submodules: MambaLayerSubmodules, layer_number: int = 1,
                 pg_collection: ProcessGroupCollection | None = None, vp_stage: int | None = None,
                 name: str | None = None) -> None:
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        # global numbering, as TransformerLayer does: checkpoints and FP8 contexts key layers by it
        offset = get_transformer_layer_offset(config, vp_stage, get_pg_rank(pg_collection.pp))
        super().__init__(config, submodules, layer_number=layer_number + offset, pg_collection=pg_collection,
                         pp_layer_offset=offset, name=name)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, rotary_pos_emb: Tensor | None = None,
                rotary_pos_cos: Tensor | None = None, rotary_pos_sin: Tensor | None = None,
                rotary_pos_cos_sin: Tensor | None = None, attention_bias: Tensor | None = None,
                inference_context: Any = None, packed_seq_params: Any = None, sequence_len_offset: Any = None,
                padding_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        """TransformerBlock's keywords: the causal mask is what a scan computes anyway and Mamba honours packed
        sequences itself; what would change the result (position embeddings, attention bias, cross-attention or
        padding masks) is refused with one line."""
        given = {"rotary_pos_emb": rotary_pos_emb, "rotary_pos_cos": rotary_pos_cos, "rotary_pos_sin": rotary_pos_sin,
                 "rotary_pos_cos_sin": rotary_pos_cos_sin, "attention_bias": attention_bias,
                 "context_mask": context_mask, "padding_mask": padding_mask}
        refused = sorted(name for name, value in given.items() if value is not None)
        if refused:
            raise ValueError(f"the Mamba layer ('M') cannot honour {', '.join(refused)}; drop it for this pattern")
        out = super().forward(hidden_states, attention_mask, inference_context=inference_context,
                              packed_seq_params=packed_seq_params)
        return out, context
