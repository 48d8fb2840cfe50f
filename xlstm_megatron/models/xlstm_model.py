"""`XLSTMModel`: Megatron's GPTModel with an xLSTM block spec, no position embedding and the output-logit soft cap.

Everything else (vocab-parallel embedding and output layer, pipeline stages, loss, sharded checkpoints) is
GPTModel's own code path.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection

from xlstm_megatron.layers.config import XLSTMConfig
from xlstm_megatron.layers.specs import as_xlstm_config, xlstm_block_spec
from xlstm_megatron.ops.softcap import soft_cap


def _soft_cap_hook(cap: float):
    def hook(_module: torch.nn.Module, _inputs: Any, output: tuple[torch.Tensor, Any]) -> tuple[torch.Tensor, Any]:
        logits, bias = output
        return soft_cap(logits, cap), bias

    return hook


class XLSTMModel(GPTModel):
    def __init__(
        self,
        config: XLSTMConfig,
        vocab_size: int,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        share_embeddings_and_output_weights: bool = False,
        parallel_output: bool = True,
        vp_stage: int | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        use_te: bool | None = None,
    ) -> None:
        config = as_xlstm_config(config)
        super().__init__(
            config=config,
            transformer_layer_spec=xlstm_block_spec(config, vp_stage=vp_stage, use_te=use_te),
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            parallel_output=parallel_output,
            position_embedding_type="none",
            vp_stage=vp_stage,
            pg_collection=pg_collection,
        )
        if post_process and config.output_logit_soft_cap:
            # A forward hook keeps GPTModel's post-processing (loss, parallel output) untouched.
            self.output_layer.register_forward_hook(_soft_cap_hook(config.output_logit_soft_cap))
