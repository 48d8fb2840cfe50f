"""Megatron-training's model-builder hook: `XLSTMModelConfig` makes `megatron.training` build an `XLSTMModel`.

`gpt_config_from_args(args, config=xlstm_config, model_config_cls=XLSTMModelConfig)` gives a GPT model config whose
builder makes our model (with the output-logit soft cap, which a plain GPTModel built from `--spec` lacks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from megatron.core.pipeline_parallel.utils import (
    is_pp_first_stage,
    is_pp_last_stage,
    is_vp_first_stage,
    is_vp_last_stage,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig
from megatron.training.vocab_utils import calculate_padded_vocab_size

from xlstm_megatron.models.xlstm_model import XLSTMModel


@dataclass(kw_only=True)
class XLSTMModelConfig(GPTModelConfig):
    builder: ClassVar[str] = "xlstm_megatron.models.builder.XLSTMModelBuilder"


class XLSTMModelBuilder(GPTModelBuilder):
    def build_model(
        self,
        pg_collection: ProcessGroupCollection,
        pre_process: bool | None = None,
        post_process: bool | None = None,
        vp_stage: int | None = None,
    ) -> XLSTMModel:
        cfg = self._model_config
        if cfg.vocab_size is None:
            raise ValueError("vocab_size must be set before building the model; pass --vocab-size or a tokenizer")
        vocab = cfg.vocab_size
        if cfg.should_pad_vocab:
            vocab = calculate_padded_vocab_size(
                vocab, cfg.make_vocab_size_divisible_by, cfg.transformer.tensor_model_parallel_size
            )
        vp_size = cfg.virtual_pipeline_model_parallel_size
        if pre_process is None:
            pre_process = is_vp_first_stage(vp_stage=vp_stage, vp_size=vp_size) and is_pp_first_stage(pg_collection.pp)
        if post_process is None:
            post_process = is_vp_last_stage(vp_stage=vp_stage, vp_size=vp_size) and is_pp_last_stage(pg_collection.pp)
        return XLSTMModel(
            cfg.transformer, vocab, cfg.seq_length, pre_process=pre_process, post_process=post_process,
            share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
            parallel_output=cfg.parallel_output, vp_stage=vp_stage, pg_collection=pg_collection,
        )
