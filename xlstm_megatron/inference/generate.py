"""Constant-memory generation with an `XLSTMModel`: prefill each prompt, then one recurrent step per new token.

Every mixer keeps a fixed-size recurrent state in a `RecurrentInferenceContext` that travels through GPTModel's
standard forward as `inference_context` (see `xlstm_megatron.layers.recurrent_context`), so memory does not grow with
the number of generated tokens, and the logits equal those of a full-sequence forward over prompt + generated tokens.

Prompts of different lengths need no padding: a recurrent model has no positions, so prompts are prefilled
separately (prompts of equal length share one forward, in chunks of `prefill_chunk_size` tokens), their states are
stacked into one batch, and every decode step advances all unfinished rows by one token. A row that emits a stop
token is finished and leaves the batch.

Tensor parallel: call `generate` on every rank of the tensor-parallel group with the same arguments; logits are
gathered over the vocab shards and the tokens of TP rank 0 are broadcast, so all ranks return the same result.
Not supported (one clear error each): pipeline parallelism, sequence parallelism (a one-token step cannot be split
over ranks; build the model with sequence_parallel=False: the weights are the same), and patterns with attention
layers ('*'), whose KV cache would grow with the sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from xlstm_megatron.inference.sampling import check_sampling_args, next_tokens
from xlstm_megatron.layers.recurrent_context import RecurrentInferenceContext


@dataclass
class GenerationOutput:
    tokens: list[list[int]]
    """New tokens of each prompt (a stop token that ended a sequence included)."""
    logits: list[Tensor] | None
    """With `return_logits`: per prompt (new tokens, vocab_limit or vocab) fp32: the logits each token was chosen from
    (before temperature and filters)."""
    state_nbytes: int
    """Largest size of the recurrent state during the run (this rank's share), in bytes."""


def _config(model: torch.nn.Module):
    while not hasattr(model, "decoder") and hasattr(model, "module"):  # DDP / Float16Module wrappers
        model = model.module
    return model.config


def check_generation_support(config) -> None:
    """Raise ValueError if a model with this config cannot generate here (see the module docstring)."""
    if "*" in config.layer_pattern:
        raise ValueError(
            f"generation supports recurrent layers only; pattern {config.layer_pattern!r} has attention layers ('*'), "
            "whose growing KV cache the constant-memory recurrent generation does not keep"
        )
    if config.pipeline_model_parallel_size > 1:
        raise ValueError("generation needs pipeline_model_parallel_size=1; load the checkpoint with PP=1")
    if config.sequence_parallel and config.tensor_model_parallel_size > 1:
        raise ValueError("generation needs sequence_parallel=False (a one-token step cannot be split over ranks); "
                         "build the model without it: the weights are the same")


def _as_prompts(prompt_ids: Sequence[Sequence[int]] | Tensor) -> list[list[int]]:
    prompts = prompt_ids.tolist() if isinstance(prompt_ids, Tensor) else [list(map(int, p)) for p in prompt_ids]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start an empty text with the end-of-document id)")
    return prompts


def _forward(model: torch.nn.Module, context: RecurrentInferenceContext, tokens: Tensor) -> Tensor:
    """Logits (B, S, V) of `tokens` (B, S), gathered over TP, continuing from and updating `context`."""
    logits = model(tokens, None, None, inference_context=context, runtime_gather_output=True)
    context.increment_sequence_len_offset(tokens.shape[1])
    return logits


def _prefill(
    model: torch.nn.Module, prompts: list[list[int]], chunk: int, device: torch.device
) -> tuple[RecurrentInferenceContext, Tensor]:
    """States after each prompt (rows in prompt order) and the last prompt position's logits (B, V)."""
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    contexts, last_logits, order = [], [], []
    for indices in by_length.values():
        context = RecurrentInferenceContext()
        tokens = torch.tensor([prompts[i] for i in indices], dtype=torch.long, device=device)
        for start in range(0, tokens.shape[1], chunk):
            logits = _forward(model, context, tokens[:, start : start + chunk])
        contexts.append(context)
        last_logits.append(logits[:, -1].float())
        order.extend(indices)
    context = contexts[0] if len(contexts) == 1 else RecurrentInferenceContext.cat(contexts)
    back = torch.argsort(torch.tensor(order))
    if len(contexts) > 1:
        context.select(back)
    return context, torch.cat(last_logits)[back.to(device)]


def _agree_over_tp(tokens: Tensor) -> Tensor:
    """Every TP rank continues with TP rank 0's tokens (ranks must never diverge, whatever the hardware)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if dist.is_initialized() and ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(tokens, src=ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
    return tokens


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]] | Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Iterable[int] = (),
    seed: int = 0,
    vocab_limit: int | None = None,
    prefill_chunk_size: int = 1024,
    return_logits: bool = False,
) -> GenerationOutput:
    """Continue each prompt by up to `max_new_tokens` tokens.

    Args:
        model: an `XLSTMModel` (possibly wrapped) with a recurrent pattern, TP any, PP 1, no sequence parallel.
        prompt_ids: token ids per prompt (lengths may differ), or a (B, S) tensor.
        temperature, top_k, top_p: see `sampling.next_tokens` (temperature 0: greedy).
        stop_tokens: ids that end a sequence (the stop token is kept in its output).
        seed: seed of the sampling generator (same seed, same tokens).
        vocab_limit: sample only ids below this (the tokenizer's vocab; the model's is padded). None: all.
        prefill_chunk_size: prompt tokens per prefill forward (bounds prefill activations for long prompts).
        return_logits: also return the raw logits of every step.
    """
    check_sampling_args(temperature, top_k, top_p)
    if max_new_tokens < 0 or prefill_chunk_size < 1:
        raise ValueError("max_new_tokens must be >= 0 and prefill_chunk_size >= 1")
    check_generation_support(_config(model))
    prompts = _as_prompts(prompt_ids)
    stops = {int(t) for t in stop_tokens}
    tokens: list[list[int]] = [[] for _ in prompts]
    logits_out: list[list[Tensor]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return GenerationOutput(tokens, [torch.empty(0) for _ in prompts] if return_logits else None, 0)

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        context, logits = _prefill(model, prompts, prefill_chunk_size, device)
        state_nbytes = context.nbytes()
        rows = torch.arange(len(prompts))  # prompt index of each batch row
        for step in range(max_new_tokens):
            logits = logits[:, :vocab_limit]
            chosen = _agree_over_tp(next_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                                generator=generator))
            finished = []
            for row, (index, token) in enumerate(zip(rows.tolist(), chosen.tolist(), strict=True)):
                tokens[index].append(token)
                if return_logits:
                    logits_out[index].append(logits[row].cpu())
                finished.append(token in stops)
            if step == max_new_tokens - 1 or all(finished):
                break
            if any(finished):
                keep = torch.tensor([not f for f in finished]).nonzero().squeeze(-1)
                rows, chosen = rows[keep], chosen[keep.to(device)]
                context.select(keep)
            logits = _forward(model, context, chosen[:, None])[:, -1].float()
            state_nbytes = max(state_nbytes, context.nbytes())
    finally:
        model.train(was_training)
    stacked = [torch.stack(steps) for steps in logits_out] if return_logits else None
    return GenerationOutput(tokens, stacked, state_nbytes)
