"""Text -> Megatron indexed dataset (``<prefix>_<key>_document.bin/.idx``), like Megatron-LM's
``tools/preprocess_data.py`` (which the megatron-core wheel does not ship).

Inputs: ``.jsonl``/``.json`` files (one JSON object per line; each ``--json-keys`` field is one document) or any other
file as plain UTF-8 text (the whole file is one document, stored under the key ``text``). Inputs are read in the
order given; documents keep that order in the output whatever the number of workers, so the output is byte-identical
for any ``--workers``. Documents whose text is empty are skipped (counted in the summary).

All checks (inputs exist, outputs absent unless ``--overwrite``, tokenizer arguments) run before anything is written.
Outputs are written to temporary names and renamed into place only after the whole run succeeded, so a failure
never leaves partial files or destroys an existing dataset.

Workers are ``spawn``-ed processes (safe with torch and the Rust tokenizer's threads); this module imports
Megatron-Core lazily so that they start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xlstm_megatron.data.errors import DataConfigError
from xlstm_megatron.data.tokenizer import (
    TOKENIZER_TYPES,
    TextTokenizer,
    TokenizerSpec,
    check_bpe_training_args,
    train_bpe_tokenizer,
)

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json")
TRAIN_BPE = "TrainBPE"


def output_prefix_for_key(output_prefix: str | Path, key: str) -> str:
    """Megatron's naming: ``<output_prefix>_<key>_document`` (the ``--data-path`` prefix, without .bin/.idx)."""
    return f"{output_prefix}_{key}_document"


@dataclass
class PreprocessSummary:
    """What a preprocessing run wrote, per JSON key."""

    prefixes: dict[str, str] = field(default_factory=dict)
    documents: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    skipped_empty: dict[str, int] = field(default_factory=dict)


# --- reading and encoding ---------------------------------------------------------------------------------------


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSON_SUFFIXES


def _iter_records(inputs: Sequence[Path]) -> Iterator[tuple[str, str, bool]]:
    """``(where, raw, is_json)`` per document source: a JSON line, or a whole text file."""
    for path in inputs:
        if _is_jsonl(path):
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield f"{path}:{lineno}", line, True
        else:
            yield str(path), path.read_text(encoding="utf-8"), False


def _record_texts(where: str, raw: str, is_json: bool, keys: Sequence[str]) -> list[str]:
    if not is_json:
        return [raw]
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataConfigError(f"{where}: not valid JSON ({e.msg}); fix or remove that line") from None
    texts = []
    for key in keys:
        value = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            raise DataConfigError(f"{where}: no string field {key!r}; fix the line or pass the right --json-keys")
        texts.append(value)
    return texts


class _Encoder:
    """Turns one record into one token array per key (EOD appended if asked), in the on-disk dtype."""

    def __init__(self, tokenizer: TextTokenizer, keys: Sequence[str], append_eod: bool, dtype: type) -> None:
        self.tokenizer, self.keys, self.append_eod, self.dtype = tokenizer, list(keys), append_eod, dtype

    def __call__(self, record: tuple[str, str, bool]) -> list[np.ndarray]:
        out = []
        for text in _record_texts(*record, self.keys):
            ids = self.tokenizer.encode(text) if text else []
            if ids and self.append_eod:
                ids.append(self.tokenizer.eod_id)
            out.append(np.asarray(ids, dtype=self.dtype))
        return out


_worker_encoder: _Encoder | None = None


def _init_worker(spec: TokenizerSpec, keys: Sequence[str], append_eod: bool, dtype: type) -> None:
    global _worker_encoder
    _worker_encoder = _Encoder(spec.load(), keys, append_eod, dtype)


def _encode_in_worker(record: tuple[str, str, bool]) -> list[np.ndarray]:
    assert _worker_encoder is not None, "worker not initialised"
    return _worker_encoder(record)


# --- the run ------------------------------------------------------------------------------------------------------


def check_preprocess_args(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    json_keys: Sequence[str],
    workers: int,
    overwrite: bool,
) -> list[Path]:
    """All input/output checks; raises :class:`DataConfigError`, writes nothing. Returns the input paths."""
    if not inputs:
        raise DataConfigError("no input files; pass --input FILE [FILE ...]")
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise DataConfigError(f"input file {str(p)!r} does not exist; pass an existing .jsonl or text file")
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise DataConfigError(f"--json-keys must be distinct names, got {list(json_keys)}")
    if any(not _is_jsonl(p) for p in paths) and list(json_keys) != ["text"]:
        raise DataConfigError("plain-text inputs are stored under the key 'text'; use --json-keys text")
    if workers < 1:
        raise DataConfigError(f"--workers must be >= 1, got {workers}")
    if str(output_prefix).endswith((".bin", ".idx")) or Path(output_prefix).name == "":
        raise DataConfigError(f"--output-prefix {str(output_prefix)!r} must be a path prefix, without .bin/.idx")
    if not overwrite:
        for key in json_keys:
            prefix = output_prefix_for_key(output_prefix, key)
            for path in (prefix + ".bin", prefix + ".idx"):
                if os.path.exists(path):
                    raise DataConfigError(f"output {path!r} already exists; pass --overwrite to replace it")
    return paths


def preprocess_files(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tokenizer: TokenizerSpec,
    *,
    json_keys: Sequence[str] = ("text",),
    workers: int = 1,
    append_eod: bool = False,
    overwrite: bool = False,
    chunksize: int = 16,
) -> PreprocessSummary:
    """Tokenize ``inputs`` into one Megatron ``IndexedDataset`` per JSON key (see module docstring).

    Args:
        inputs: .jsonl/.json or plain-text files, read in this order.
        output_prefix: outputs are ``<output_prefix>_<key>_document.bin/.idx``; parent folders are created.
        tokenizer: what to load (in this process and in each worker).
        json_keys: JSON fields to tokenize, one dataset each.
        workers: encoding processes; 1 encodes in this process.
        append_eod: append the tokenizer's EOD id after each document (what GPT pretraining wants).
        overwrite: replace existing outputs (only once the new ones are complete).
        chunksize: records per task sent to a worker.

    Returns:
        The written prefixes (for ``--data-path``) and document/token counts per key.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    paths = check_preprocess_args(inputs, output_prefix, json_keys, workers, overwrite)
    tok = tokenizer.load()
    dtype = DType.optimal_dtype(tok.vocab_size)  # uint16 below 65500 ids, as Megatron's tool does
    summary = PreprocessSummary()
    finals = {key: output_prefix_for_key(output_prefix, key) for key in json_keys}
    tmp_suffix = f".tmp-{os.getpid()}"
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    builders: dict[str, IndexedDatasetBuilder] = {}
    try:
        for key in json_keys:
            builders[key] = IndexedDatasetBuilder(finals[key] + ".bin" + tmp_suffix, dtype=dtype)
        records = _iter_records(paths)
        if workers == 1:
            encoded = map(_Encoder(tok, json_keys, append_eod, dtype), records)
            _write_all(encoded, builders, json_keys, summary)
        else:
            ctx = multiprocessing.get_context("spawn")
            initargs = (tokenizer, list(json_keys), append_eod, dtype)
            with ctx.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
                encoded = pool.imap(_encode_in_worker, records, chunksize=chunksize)
                _write_all(encoded, builders, json_keys, summary)
        for key, builder in builders.items():
            builder.finalize(finals[key] + ".idx" + tmp_suffix)
        for key, prefix in finals.items():  # all temporaries are complete: move them into place
            for ext in (".bin", ".idx"):
                os.replace(prefix + ext + tmp_suffix, prefix + ext)
            summary.prefixes[key] = prefix
    finally:
        for key in json_keys:
            if key in builders:
                builders[key].data_file.close()
            for ext in (".bin", ".idx"):
                Path(finals[key] + ext + tmp_suffix).unlink(missing_ok=True)
    return summary


def _write_all(encoded, builders, keys: Sequence[str], summary: PreprocessSummary) -> None:
    for key in keys:
        summary.documents[key] = summary.tokens[key] = summary.skipped_empty[key] = 0
    for arrays in encoded:
        for key, ids in zip(keys, arrays, strict=True):
            if ids.size == 0:
                summary.skipped_empty[key] += 1
                continue
            builders[key].add_document(ids, [ids.size])
            summary.documents[key] += 1
            summary.tokens[key] += int(ids.size)


def _training_texts(paths: Sequence[Path], keys: Sequence[str]) -> Iterator[str]:
    """The first key's texts; all keys are checked, so bad input fails before the tokenizer is saved."""
    for record in _iter_records(paths):
        yield _record_texts(*record, keys)[0]


# --- CLI --------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xlstm-megatron preprocess",
        description="Tokenize jsonl/text files into Megatron indexed datasets (<prefix>_<key>_document.bin/.idx).",
    )
    p.add_argument("--input", nargs="+", required=True, help=".jsonl/.json files (one object per line) or text files")
    p.add_argument("--output-prefix", required=True, help="outputs are <prefix>_<key>_document.bin/.idx")
    p.add_argument("--tokenizer-type", required=True, choices=[*TOKENIZER_TYPES, TRAIN_BPE])
    p.add_argument(
        "--tokenizer-model",
        help="tokenizer.json or its directory (HuggingFaceTokenizer), .model file (SentencePieceTokenizer), "
        "or the directory to save the trained tokenizer in (TrainBPE)",
    )
    p.add_argument("--vocab-file", help="GPT2BPETokenizer vocab.json")
    p.add_argument("--merge-file", help="GPT2BPETokenizer merges.txt")
    p.add_argument("--vocab-size", type=int, help="vocabulary size (TrainBPE, NullTokenizer)")
    p.add_argument("--eod-token", help="end-of-document token text, if the tokenizer files do not define one")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields to tokenize (default: text)")
    p.add_argument("--workers", type=int, default=1, help="encoding processes (default: 1)")
    p.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (and a TrainBPE tokenizer)")
    return p


def preprocess_main(argv: list[str] | None = None) -> int:
    """``xlstm-megatron preprocess``: returns 0 on success, 2 on bad input (a one-line ``error:`` on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        if args.tokenizer_type == TRAIN_BPE:
            if args.tokenizer_model is None:
                raise DataConfigError("TrainBPE needs --tokenizer-model DIR, where the trained tokenizer is saved")
            out_dir = Path(args.tokenizer_model)
            check_bpe_training_args(args.vocab_size, out_dir, args.overwrite)
            paths = check_preprocess_args(args.input, args.output_prefix, args.json_keys, args.workers, args.overwrite)
            train_bpe_tokenizer(_training_texts(paths, args.json_keys), args.vocab_size, out_dir,
                                overwrite=args.overwrite)  # fmt: skip
            spec = TokenizerSpec("HuggingFaceTokenizer", tokenizer_model=str(out_dir))
        else:
            spec = TokenizerSpec(
                args.tokenizer_type,
                tokenizer_model=args.tokenizer_model,
                vocab_file=args.vocab_file,
                merge_file=args.merge_file,
                vocab_size=args.vocab_size,
                eod_token=args.eod_token,
            )
            spec.validate()
        summary = preprocess_files(
            args.input,
            args.output_prefix,
            spec,
            json_keys=args.json_keys,
            workers=args.workers,
            append_eod=args.append_eod,
            overwrite=args.overwrite,
        )
    except DataConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key, prefix in summary.prefixes.items():
        print(
            f"{prefix}: {summary.documents[key]} documents, {summary.tokens[key]} tokens"
            f" ({summary.skipped_empty[key]} empty skipped)"
        )
    return 0


# --- demo data --------------------------------------------------------------------------------------------------


def prepare_demo_data(
    out_dir: str | Path, vocab_size: int = 4096, *, max_plays: int | None = None, workers: int = 1
) -> tuple[str, str]:
    """Shakespeare corpus -> trained byte-level BPE -> indexed dataset, under ``out_dir``. Idempotent.

    Writes ``<out_dir>/<name>.jsonl``, ``<out_dir>/<name>-bpe<V>-tokenizer/`` and
    ``<out_dir>/<name>-bpe<V>_text_document.bin/.idx`` (EOD appended per document), where ``<name>`` is
    ``shakespeare`` (or ``shakespeare-<N>plays`` with ``max_plays``). Each output that already exists is reused;
    all are written atomically, so an existing one is complete.

    Returns:
        ``(data_prefix, tokenizer_dir)``: pass them as ``--data-path`` and
        ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model``.
    """
    from xlstm_megatron.data.corpus import read_jsonl, write_demo_corpus

    out_dir = Path(out_dir)
    name = "shakespeare" if max_plays is None else f"shakespeare-{max_plays}plays"
    corpus = out_dir / f"{name}.jsonl"
    tokenizer_dir = out_dir / f"{name}-bpe{vocab_size}-tokenizer"
    output_prefix = out_dir / f"{name}-bpe{vocab_size}"
    data_prefix = output_prefix_for_key(output_prefix, "text")
    check_bpe_training_args(vocab_size, tokenizer_dir, overwrite=True)
    if not corpus.is_file():
        write_demo_corpus(corpus, max_plays)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        train_bpe_tokenizer(read_jsonl(corpus), vocab_size, tokenizer_dir, overwrite=True)
    if not (os.path.isfile(data_prefix + ".bin") and os.path.isfile(data_prefix + ".idx")):
        spec = TokenizerSpec("HuggingFaceTokenizer", tokenizer_model=str(tokenizer_dir))
        preprocess_files([corpus], output_prefix, spec, workers=workers, append_eod=True, overwrite=True)
    return data_prefix, str(tokenizer_dir)
