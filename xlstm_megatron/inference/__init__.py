"""Generation with xLSTM models: constant-memory recurrent decoding through Megatron's forward path.

`generate(model, prompt_ids, max_new_tokens, ...)` for in-process use; `xlstm-megatron generate` (``cli.generate_main``)
loads a checkpoint written by `xlstm-megatron train`. The per-layer state container, `RecurrentInferenceContext`,
lives in the layers tier (the mixers read it) and is re-exported here.
"""

from xlstm_megatron.inference.generate import GenerationOutput, check_generation_support, generate
from xlstm_megatron.inference.sampling import next_tokens
from xlstm_megatron.layers.recurrent_context import RecurrentInferenceContext

__all__ = ["GenerationOutput", "RecurrentInferenceContext", "check_generation_support", "generate", "next_tokens"]
