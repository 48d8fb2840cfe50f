"""Data for the training loop: tokenizer, datasets and the deterministic per-rank microbatch schedule.

Which samples a rank reads depends only on (iteration, data-parallel rank), so a resumed run reads exactly what an
uninterrupted one would. Every tensor-parallel rank reads its batch itself (no broadcast); ranks of middle pipeline
stages read nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from xlstm_megatron.data.tokenizer import TextTokenizer, TokenizerSpec
from xlstm_megatron.training.run_config import ConfigError, RunConfig


@dataclass
class DataSources:
    """Resolved data inputs (demo data prepared, files checked) — cheap to pickle to worker processes."""

    data_path: list[str] | None
    tokenizer: TokenizerSpec | None
    mock: bool


def resolve_data_sources(run: RunConfig) -> DataSources:
    """Validate the data flags and prepare the demo corpus if asked; raises one-line errors before training."""
    from xlstm_megatron.data.datasets import check_data_prefixes, parse_data_path

    chosen = [name for name, on in (("demo_data", run.demo_data), ("mock_data", run.mock_data),
                                    ("data_path", bool(run.data_path))) if on]
    if len(chosen) != 1:
        raise ConfigError(f"choose exactly one of --data-path, --demo-data, --mock-data (got {chosen or 'none'})")
    if run.mock_data:
        return DataSources(None, None, True)
    if run.demo_data:
        from xlstm_megatron.data.preprocess import prepare_demo_data

        prefix, tok_dir = prepare_demo_data(run.demo_data_dir, run.demo_vocab_size, max_plays=run.demo_max_plays)
        return DataSources([prefix], TokenizerSpec("HuggingFaceTokenizer", tokenizer_model=tok_dir), False)
    prefixes, _ = parse_data_path(run.data_path)
    check_data_prefixes(prefixes)
    spec = TokenizerSpec(run.tokenizer_type, tokenizer_model=run.tokenizer_model, vocab_file=run.vocab_file,
                         merge_file=run.merge_file, vocab_size=run.vocab_size, eod_token=run.eod_token)
    spec.validate()
    return DataSources(list(run.data_path), spec, False)


def padded_vocab_size(run: RunConfig, tokenizer: TextTokenizer | None) -> int:
    """The model's vocab: the tokenizer's (or --vocab-size), padded so every TP rank holds an equal slice."""
    base = run.vocab_size or (tokenizer.vocab_size if tokenizer is not None else None)
    if base is None:
        raise ConfigError("mock data has no tokenizer: set --vocab-size")
    if tokenizer is not None and run.vocab_size is not None and tokenizer.vocab_size > run.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens but vocab_size={run.vocab_size}; raise --vocab-size "
            "or use the matching tokenizer"
        )
    multiple = run.make_vocab_size_divisible_by * run.tensor_model_parallel_size
    return -(-base // multiple) * multiple


def num_microbatches(run: RunConfig, dp_size: int) -> int:
    gbs = global_batch_size(run, dp_size)
    return gbs // (run.micro_batch_size * dp_size)


def global_batch_size(run: RunConfig, dp_size: int) -> int:
    gbs = run.global_batch_size or run.micro_batch_size * dp_size
    if gbs % (run.micro_batch_size * dp_size):
        raise ConfigError(
            f"global_batch_size={gbs} is not a multiple of micro_batch_size x data-parallel size "
            f"= {run.micro_batch_size} x {dp_size}; change one of them"
        )
    return gbs


@dataclass
class TrainData:
    tokenizer: TextTokenizer | None
    train: Any
    valid: Any


def build_train_data(run: RunConfig, sources: DataSources, dp_size: int) -> TrainData:
    """Datasets on every rank that needs data (first and last pipeline stages, all TP ranks)."""
    from megatron.core import parallel_state as ps

    from xlstm_megatron.data.datasets import build_gpt_datasets

    tokenizer = sources.tokenizer.load() if sources.tokenizer is not None else None
    gbs = global_batch_size(run, dp_size)
    eval_samples = run.eval_iters * gbs
    needs_data = ps.is_pipeline_first_stage(ignore_virtual=True) or ps.is_pipeline_last_stage(ignore_virtual=True)
    if tokenizer is None:  # mock data: Megatron's synthetic documents over --vocab-size ids
        from xlstm_megatron.data.tokenizer import load_tokenizer

        tokenizer_for_data = load_tokenizer("NullTokenizer", vocab_size=run.vocab_size)
    else:
        tokenizer_for_data = tokenizer
    train, valid, _ = build_gpt_datasets(
        tokenizer_for_data,
        seq_length=run.seq_length,
        data_path=sources.data_path,
        mock=sources.mock,
        split=run.split,
        num_samples=(run.train_iters * gbs, eval_samples, 0),
        seed=run.seed,
        cache_dir=run.data_cache_dir,
        is_built_on_rank=lambda: needs_data,
    )
    return TrainData(tokenizer, train if needs_data else None, valid if needs_data else None)


def _collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("tokens", "labels", "loss_mask")}


def microbatches(
    dataset: Any, iteration: int, run: RunConfig, dp_rank: int, dp_size: int
) -> Iterator[dict[str, torch.Tensor] | None]:
    """This rank's microbatches of global batch `iteration`: the DP rank's contiguous slice, in order.

    Ranks without data (middle pipeline stages) get None for every microbatch.
    """
    gbs, mbs = global_batch_size(run, dp_size), run.micro_batch_size
    n = num_microbatches(run, dp_size)
    start = iteration * gbs + dp_rank * n * mbs
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    for m in range(n):
        if dataset is None:
            yield None
            continue
        first = start + m * mbs
        batch = _collate([dataset[i % len(dataset)] for i in range(first, first + mbs)])
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
