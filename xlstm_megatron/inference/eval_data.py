"""Evaluation windows for position-wise loss: documents from a Megatron indexed dataset or a jsonl file, cut into
(N, L + 1) token windows (L predictions each).

Documents shorter than a window are either skipped (`skip`: every window is the start of one document, so a
window's position is the position in its document; documents longer than a window give their first window only)
or concatenated (`concat`: the documents, each ending in its end-of-document token, form one stream cut into
consecutive windows, as Megatron's GPTDataset samples them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

from xlstm_megatron.data.errors import DataConfigError
from xlstm_megatron.data.tokenizer import TextTokenizer

ShortDocs = Literal["skip", "concat"]
SHORT_DOCS: tuple[ShortDocs, ...] = ("skip", "concat")


def indexed_documents(prefix: str) -> list[np.ndarray]:
    """Every document of a Megatron indexed dataset (`prefix`.bin/.idx; a document's sequences joined)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from xlstm_megatron.data.datasets import check_data_prefixes

    check_data_prefixes([prefix])
    dataset = IndexedDataset(prefix)
    bounds = dataset.document_indices.copy()
    docs = [np.concatenate([dataset[i] for i in range(int(a), int(b))] or [np.zeros(0, np.int64)]).astype(np.int64)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    del dataset  # its arrays view an mmap; the copies above outlive it
    return docs


def jsonl_documents(path: str | Path, tokenizer: TextTokenizer, key: str = "text") -> list[np.ndarray]:
    """The `key` text of every line, tokenized with the end-of-document token appended (as `preprocess` does)."""
    path = Path(path)
    if not path.is_file():
        raise DataConfigError(f"--data {path} does not exist; pass a jsonl file or an indexed-dataset prefix")
    docs = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[key]
            except (ValueError, KeyError, TypeError):
                raise DataConfigError(f"{path}:{number} is not a JSON object with a {key!r} string; fix the line "
                                      "or pass --json-key") from None
            ids = tokenizer.encode(text) if text else []
            if ids:
                docs.append(np.asarray([*ids, tokenizer.eod_id], dtype=np.int64))
    return docs


def eval_windows(docs: list[np.ndarray], length: int, short_docs: ShortDocs = "skip",
                 max_windows: int | None = None) -> np.ndarray:
    """(N, length + 1) int64 windows (see the module docstring); a one-line DataConfigError if there are none."""
    need = length + 1
    if short_docs == "skip":
        windows = [d[:need] for d in docs if len(d) >= need]
    elif short_docs == "concat":
        stream = np.concatenate(docs) if docs else np.zeros(0, np.int64)
        windows = [stream[s : s + need] for s in range(0, len(stream) - need + 1, need)]
    else:
        raise DataConfigError(f"unknown --short-docs {short_docs!r}; use one of {', '.join(SHORT_DOCS)}")
    windows = windows[:max_windows] if max_windows else windows
    if not windows:
        longest = max((len(d) for d in docs), default=0)
        total = sum(len(d) for d in docs)
        hint = "use --short-docs concat, a shorter --eval-length, or more data" if short_docs == "skip" else \
            "use a shorter --eval-length or more data"
        raise DataConfigError(f"the data has no window of {need} tokens (eval length {length} + 1; {len(docs)} "
                              f"documents, longest {longest}, {total} tokens in all); {hint}")
    return np.stack(windows).astype(np.int64)


def check_token_range(windows: np.ndarray, vocab_size: int) -> None:
    """A one-line DataConfigError if the data holds ids the model has no embedding row for (another tokenizer)."""
    top = int(windows.max())
    if top >= vocab_size or int(windows.min()) < 0:
        raise DataConfigError(f"the data holds token id {top} but the checkpoint's model has {vocab_size} ids; the "
                              "data was tokenized with another tokenizer: preprocess it with the checkpoint's")
