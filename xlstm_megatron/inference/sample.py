"""A text sample from a checkpoint directory in one call (what `xlstm-megatron train` writes after training)."""

from __future__ import annotations


def _sample_worker(load: str, prompt: str, tokens: int, seed: int, out: list[str]) -> None:
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    from xlstm_megatron.inference.generate import generate
    from xlstm_megatron.inference.loading import load_model, resolve_checkpoint
    from xlstm_megatron.runs.launch import init_parallel, shutdown_parallel

    source = resolve_checkpoint(load, tensor_parallel=1)
    init_parallel(seed=seed)
    try:
        tokenizer = build_tokenizer(source.args)
        ids = tokenizer.tokenize(prompt) if prompt else [tokenizer.eod]
        result = generate(load_model(source), [ids], tokens, temperature=0.8, top_k=40, seed=seed,
                          vocab_limit=tokenizer.vocab_size)
        out.append(prompt + tokenizer.detokenize(list(result.tokens[0])))
    finally:
        shutdown_parallel()


def sample_text(load: str, prompt: str, tokens: int, seed: int) -> str:
    """A continuation of `prompt` by the latest checkpoint under `load`, sampled at temperature 0.8, top-k 40 (one
    process, TP 1: dist checkpoints reshard)."""
    from xlstm_megatron.runs.launch import run_processes

    out: list[str] = []
    run_processes(_sample_worker, 1, args=(load, prompt, tokens, seed, out))
    return out[0]
