"""Train/valid/test GPT datasets from indexed-dataset prefixes (or mock data) via Megatron-Core's builder.

``build_gpt_datasets`` wraps ``BlendedMegatronDatasetBuilder`` + ``GPTDatasetConfig`` (``GPTDataset``, or
``MockGPTDataset`` for ``mock=True``) and checks its input first, so bad input fails with one
:class:`DataConfigError` line before any index is built or any cache file written.

Each sample is a dict of ``tokens`` [S] and ``labels`` [S] (int64; ``labels`` is ``tokens`` shifted left by one
within a window of S + 1 consecutive tokens of the concatenated, shuffled documents), ``loss_mask`` [S] (float32),
``position_ids`` [S] (int64) and, with ``create_attention_mask=True``, ``attention_mask`` [1, S, S] (bool).
A blend adds ``dataset_id``.

Single process: nothing to initialise. The builder only touches ``torch.distributed`` when it is initialised, and
``is_built_on_rank`` is never called otherwise.

Under ``torch.distributed`` (e.g. from ``megatron.training``): call ``build_gpt_datasets`` on every rank (it has
barriers). Global rank 0 builds the document/sample/shuffle indices and saves them under ``cache_dir``; after a
barrier the other ranks load them, so ``cache_dir`` must be readable by all ranks (a shared filesystem across nodes).
Ranks where ``is_built_on_rank()`` is False get ``None`` datasets; the default (:func:`default_is_built_on_rank`) is
Megatron's GPT rule: tensor-parallel rank 0 on the first or last pipeline stage.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Callable, Sequence

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, IndexedDataset

from xlstm_megatron.data.errors import DataConfigError
from xlstm_megatron.data.tokenizer import TextTokenizer, check_tokenizer_matches_model

__all__ = [
    "build_gpt_datasets",
    "check_data_prefixes",
    "check_indexed_files",
    "check_tokenizer_matches_model",
    "default_is_built_on_rank",
    "parse_data_path",
    "parse_split",
]

SPLIT_NAMES = ("train", "valid", "test")


def parse_data_path(data_path: str | Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Megatron ``--data-path`` syntax: ``p1 p2 ...`` (weights from dataset sizes) or ``w1 p1 w2 p2 ...``.

    Returns:
        ``(prefixes, weights)``; ``weights`` is None for an unweighted list.
    """
    items = data_path.split() if isinstance(data_path, str) else [str(x) for x in data_path]
    if not items:
        raise DataConfigError("empty --data-path; pass PREFIX [PREFIX ...] or W1 PREFIX1 W2 PREFIX2 ...")

    def as_weight(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:
            return None

    firsts = [as_weight(s) for s in items[0::2]]
    if len(items) % 2 == 0 and all(w is not None for w in firsts):
        weights = [float(w) for w in firsts]
        if any(w <= 0 for w in weights):
            raise DataConfigError(f"--data-path weights must be > 0, got {weights}")
        return items[1::2], weights
    if any(as_weight(s) is not None for s in items):
        raise DataConfigError(
            f"--data-path {' '.join(items)!r} mixes weights and prefixes; use 'W1 P1 W2 P2 ...' or 'P1 P2 ...'"
        )
    return items, None


def parse_split(split: str) -> list[float]:
    """``"98,2,0"`` -> normalised [train, valid, test] shares; raises :class:`DataConfigError` when malformed."""
    parts = [p.strip() for p in str(split).split(",")]
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", p) for p in parts):
        raise DataConfigError(f"--split {split!r} must be up to three non-negative numbers, e.g. 98,2,0")
    if sum(float(p) for p in parts) <= 0:
        raise DataConfigError(f"--split {split!r} must not be all zeros")
    return parse_and_normalize_split(str(split))


def check_data_prefixes(prefixes: Sequence[str]) -> None:
    """Raise :class:`DataConfigError` unless every prefix has its ``.bin`` and ``.idx`` file."""
    for prefix in prefixes:
        if prefix.endswith((".bin", ".idx")):
            raise DataConfigError(f"data path {prefix!r} must be a prefix; drop the {prefix[-4:]} suffix")
        missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            raise DataConfigError(
                f"data prefix {prefix!r} has no {' / '.join(prefix + e for e in missing)}; create it with "
                "`xlstm-megatron preprocess --input FILE --output-prefix P ...` (the prefix is P_text_document)"
            )
        check_indexed_files(prefix)


_HEADER_BYTES = len(_INDEX_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence and document counts


def check_indexed_files(prefix: str) -> None:
    """Raise :class:`DataConfigError` unless ``prefix.idx`` is a complete Megatron index and ``prefix.bin`` holds
    exactly the tokens it points at. Megatron's reader asserts on a bad header and otherwise maps whatever bytes are
    there: a truncated ``.idx`` or ``.bin`` (a copy or preprocessing cut short) fails deep inside the dataset
    builder of every rank, or, worse, reads past the end at some sample. Reads the header and the length table only.
    """
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    fix = f"run `xlstm-megatron preprocess` again for {prefix!r} (or copy both files again)"
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[: len(_INDEX_HEADER)] != _INDEX_HEADER:
        what = "is truncated" if len(head) < _HEADER_BYTES else "does not start with Megatron's index header"
        raise DataConfigError(f"{idx} {what} ({size} bytes); it is not a Megatron indexed-dataset index: {fix}")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[len(_INDEX_HEADER):])
    codes = {d.value for d in DType}
    if version != 1 or code not in codes:
        raise DataConfigError(f"{idx} has index version {version} and dtype code {code} (want 1 and one of "
                              f"{sorted(codes)}); the file is damaged: {fix}")
    plain = _HEADER_BYTES + 12 * n_seq + 8 * n_doc  # int32 lengths, int64 pointers, int64 document indices
    if size not in (plain, plain + n_seq):  # (+ one int8 mode per sequence: multimodal)
        raise DataConfigError(f"{idx} is {size} bytes but its header ({n_seq} sequences, {n_doc} documents) needs "
                              f"{plain}; the file is truncated or damaged: {fix}")
    table = np.memmap(idx, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(table, dtype=np.int32, count=n_seq, offset=_HEADER_BYTES)
    docs = np.frombuffer(table, dtype=np.int64, count=n_doc, offset=_HEADER_BYTES + 12 * n_seq)
    if (lengths < 0).any() or n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq or (np.diff(docs) < 0).any():
        raise DataConfigError(f"{idx} has inconsistent sequence lengths or document boundaries; the file is "
                              f"damaged: {fix}")
    item = DType.size(DType.dtype_from_code(code))
    want = int(lengths.sum(dtype=np.int64)) * item
    del lengths, docs, table  # views of the mmap
    have = os.path.getsize(bin_)
    if have != want:
        raise DataConfigError(f"{bin_} is {have} bytes but {idx} indexes {want} bytes of tokens; the "
                              f"{'.bin is truncated' if have < want else 'two files do not belong together'}: {fix}")


def default_is_built_on_rank() -> bool:
    """Megatron's GPT rule: build on TP rank 0 of the first/last pipeline stage; True without model parallelism."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return True
    first_or_last = ps.is_pipeline_first_stage(ignore_virtual=True) or ps.is_pipeline_last_stage(ignore_virtual=True)
    return first_or_last and ps.get_tensor_model_parallel_rank() == 0


def check_splits_have_tokens(
    prefixes: Sequence[str], split_vector: list[float], sizes: Sequence[int | None], seq_length: int
) -> None:
    """A split that is asked for samples (size None or > 0) but gets no tokens would make Megatron's epoch count loop
    forever; refuse it."""
    matrix = convert_split_vector_to_split_matrix(split_vector)
    index_log = logging.getLogger(IndexedDataset.__module__)
    for prefix in prefixes:
        level = index_log.level
        index_log.setLevel(logging.WARNING)  # it logs its counts at INFO: a pre-start check prints nothing
        try:
            dataset = IndexedDataset(prefix)
        finally:
            index_log.setLevel(level)
        # Copy: the array views the index mmap, which the dataset closes when it is garbage collected.
        lengths = dataset.sequence_lengths.copy()
        del dataset
        n = lengths.shape[0]
        for name, bounds, size in zip(SPLIT_NAMES, matrix, sizes, strict=True):
            if bounds is None or size == 0:
                continue
            beg, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))
            if int(lengths[beg:end].sum()) == 0:
                raise DataConfigError(
                    f"the {name} split of {prefix!r} gets {end - beg} of its {n} documents and no tokens; "
                    f"give {name} a larger --split share, use more data, or request 0 {name} samples"
                )


def build_gpt_datasets(
    tokenizer: TextTokenizer,
    *,
    seq_length: int,
    data_path: str | Sequence[str] | None = None,
    mock: bool = False,
    split: str = "98,2,0",
    num_samples: Sequence[int | None] = (None, None, None),
    seed: int = 1234,
    cache_dir: str | None = None,
    model_vocab_size: int | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = False,
    is_built_on_rank: Callable[[], bool] = default_is_built_on_rank,
    num_dataset_builder_threads: int = 1,
) -> tuple[object | None, object | None, object | None]:
    """Build the (train, valid, test) datasets; a split with no ``split`` share is ``None``.

    Args:
        tokenizer: gives EOD (for masks) and the vocab size; also hashed into the index cache names.
        seq_length: S, tokens per sample.
        data_path: ``--data-path`` blend (see :func:`parse_data_path`); excludes ``mock``.
        mock: use ``MockGPTDataset`` (synthetic documents, no files); excludes ``data_path``.
        split: ``--split`` shares of each prefix's documents for train/valid/test (ignored for mock data).
        num_samples: samples wanted per split; ``None`` = one pass over the split's documents. Weighted blends
            need a number for every split with a share. More samples than one pass repeats (reshuffled) epochs.
        seed: seed of the document and sample shuffles.
        cache_dir: where index caches go (Megatron's ``--data-cache-path``); ``None`` = Megatron's default,
            ``<prefix>/cache/GPTDataset_indices`` (a folder named like the prefix).
        model_vocab_size: when given, the tokenizer must fit it (:func:`check_tokenizer_matches_model`).
        reset_position_ids, reset_attention_mask, eod_mask_loss, create_attention_mask: Megatron's GPT options.
        is_built_on_rank: see module docstring; only called under ``torch.distributed``.
        num_dataset_builder_threads: threads building the per-prefix datasets of a blend.
    """
    if seq_length < 1:
        raise DataConfigError(f"seq_length must be >= 1, got {seq_length}")
    sizes = list(num_samples)
    if len(sizes) != 3 or any(s is not None and (not isinstance(s, int) or s < 0) for s in sizes):
        raise DataConfigError(f"num_samples must be three non-negative ints or None (train, valid, test), got {sizes}")
    if model_vocab_size is not None:
        check_tokenizer_matches_model(tokenizer, model_vocab_size)
    if mock and data_path is not None:
        raise DataConfigError("pass either a data path or mock data, not both")
    if mock:
        blend, split_arg, cls = None, None, MockGPTDataset
    else:
        if data_path is None:
            raise DataConfigError("no data: pass --data-path PREFIX (from `xlstm-megatron preprocess`) or --mock-data")
        prefixes, weights = parse_data_path(data_path)
        split_vector = parse_split(split)
        check_data_prefixes(prefixes)
        if weights is not None:
            for name, share, size in zip(SPLIT_NAMES, split_vector, sizes, strict=True):
                if share > 0 and size is None:
                    raise DataConfigError(f"a weighted --data-path needs the number of {name} samples; pass it")
        check_splits_have_tokens(prefixes, split_vector, sizes, seq_length)
        blend, split_arg, cls = (prefixes, weights), split, GPTDataset

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split_arg,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        num_dataset_builder_threads=num_dataset_builder_threads,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(cls, sizes, is_built_on_rank, config).build()
    return train, valid, test
