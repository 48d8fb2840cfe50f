"""A short text sample at the end of training, through the same pipeline schedule as training (any TP/PP).

Each new token re-runs the whole prefix: fine for a few dozen tokens. Constant-memory recurrent generation is the
inference tier's job.
"""

from __future__ import annotations

from typing import Any

import torch

from xlstm_megatron.data.tokenizer import TextTokenizer


@torch.no_grad()
def generate_text(
    state: Any, run: Any, tokenizer: TextTokenizer, prompt: str, new_tokens: int,
    temperature: float = 0.8, top_k: int = 40,
) -> str:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    ids = tokenizer.encode(prompt) or [tokenizer.eod_id]
    generator = torch.Generator().manual_seed(run.seed)  # same draws on every rank of a pipeline
    pad_to = run.tensor_model_parallel_size if state.config.sequence_parallel else 1
    for chunk in state.model:
        chunk.eval()
    for _ in range(new_tokens):
        context = ids[-run.seq_length:]
        length = -(-len(context) // pad_to) * pad_to
        tokens = torch.full((1, length), tokenizer.eod_id, dtype=torch.long)
        tokens[0, : len(context)] = torch.tensor(context)
        tokens = tokens.to(device)
        last = len(context) - 1

        def forward_step(_iterator, model, tokens=tokens, last=last):
            logits = model(tokens, None, None)

            def pick(output: torch.Tensor):
                full = gather_from_tensor_model_parallel_region(output[:, last].float()).cpu()[0]
                probs = torch.softmax(full[: tokenizer.vocab_size] / temperature, dim=-1)
                top = torch.topk(probs, min(top_k, probs.numel()))
                choice = top.indices[torch.multinomial(top.values, 1, generator=generator)]
                return torch.zeros(()), {"next": choice}

            return logits, pick

        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=[None] * len(state.model) if len(state.model) > 1 else None,
            model=state.model, num_microbatches=1, seq_length=length, micro_batch_size=1, forward_only=True,
        )
        nxt = (out[0]["next"] if out else torch.zeros(1, dtype=torch.long)).to(device)
        if ps.get_pipeline_model_parallel_world_size() > 1:  # the last stage sampled; tell the others
            torch.distributed.broadcast(nxt, src=ps.get_pipeline_model_parallel_last_rank(),
                                        group=ps.get_pipeline_model_parallel_group())
        ids.append(int(nxt))
    for chunk in state.model:
        chunk.train()
    return tokenizer.decode(ids)
