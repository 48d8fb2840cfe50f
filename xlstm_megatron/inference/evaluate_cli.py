"""`xlstm-megatron evaluate`: validation loss and perplexity per token position, beyond the training length.

    xlstm-megatron evaluate --load runs/demo --data data/demo_text_document --eval-length 2048 [--segment-length 512]

Loads the latest (or `--iteration`) checkpoint of a run (`xlstm-megatron train`'s `--save`, either model family),
cuts the data (an indexed-dataset prefix, or a jsonl file tokenized with the checkpoint's tokenizer) into windows of
`--eval-length` + 1 tokens, and writes `<out>.csv` (position bucket, mean loss, perplexity, token count) and
`<out>.png` (loss and perplexity against position, log-x, the training length marked); rank 0 prints one summary
line. Every input check runs before any process starts or any model is built.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xlstm_megatron.data.tokenizer import TOKENIZER_TYPES
from xlstm_megatron.inference.eval_data import SHORT_DOCS


@dataclass(frozen=True)
class _Job:
    windows: np.ndarray
    """(N, L + 1) token windows."""
    segment_length: int | None
    micro_batch_size: int
    bucket_width: int
    out: str
    title: str
    train_length: int
    short_docs: str


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xlstm-megatron evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint directory (a run's --save or one iter_* directory)")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    p.add_argument("--data", required=True, help="indexed-dataset prefix (P_text_document, without .bin/.idx) or a "
                                                 "jsonl file (tokenized with the checkpoint's tokenizer)")
    p.add_argument("--json-key", default="text", help="jsonl field holding a document's text")
    p.add_argument("--eval-length", type=int, default=None,
                   help="tokens predicted per window; a multiple of the training length (default: 4x it)")
    p.add_argument("--segment-length", type=int, default=None,
                   help="xLSTM only: run each window in segments of this many tokens carrying the recurrent state "
                        "(bounds activation memory; default: one forward per window)")
    p.add_argument("--short-docs", choices=SHORT_DOCS, default="skip",
                   help="documents shorter than a window: skip them (positions are document positions) or "
                        "concatenate all documents into one stream cut into windows")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows (default: all)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="windows per forward")
    p.add_argument("--bucket-width", type=int, default=0,
                   help="positions per bucket; 0: doubling buckets 1, 2-3, 4-7, ... (default)")
    p.add_argument("--out", default="position_loss", help="output prefix: writes OUT.csv and OUT.png")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="HuggingFaceTokenizer")
    p.add_argument("--tokenizer-model", default=None, help="default: the tokenizer the run trained with")
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--eod-token", default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tensor-model-parallel-size", type=int, default=None, help="default: the training run's")
    p.add_argument("--nproc", type=int, default=None, help="local processes to start (default: the TP size)")
    return p


def _documents(args: argparse.Namespace, saved) -> list[np.ndarray]:
    from xlstm_megatron.data.tokenizer import check_tokenizer_matches_model
    from xlstm_megatron.inference.cli import _tokenizer_spec  # the checkpoint's tokenizer, as `generate` reads it
    from xlstm_megatron.inference.eval_data import indexed_documents, jsonl_documents

    data = args.data
    if Path(data + ".idx").exists() or Path(data + ".bin").exists():
        return indexed_documents(data)
    tokenizer = _tokenizer_spec(args, saved).load()
    check_tokenizer_matches_model(tokenizer, int(saved.padded_vocab_size))
    return jsonl_documents(data, tokenizer, args.json_key)


def _check_lengths(args: argparse.Namespace, train_length: int, recurrent: bool) -> int:
    from xlstm_megatron.runs.errors import ConfigError

    length = args.eval_length or 4 * train_length
    if length < train_length or length % train_length:
        raise ConfigError(f"--eval-length {length} must be a positive multiple of the training length {train_length} "
                          f"(e.g. {4 * train_length})")
    if args.segment_length is not None:
        if not recurrent:
            raise ConfigError("--segment-length needs a recurrent xLSTM (no attention layers): a Transformer's "
                              "segments would need its KV cache; drop --segment-length")
        if args.segment_length < 1:
            raise ConfigError(f"--segment-length must be >= 1, got {args.segment_length}")
    for flag, value in (("--micro-batch-size", args.micro_batch_size), ("--max-windows", args.max_windows or 1)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.bucket_width < 0:
        raise ConfigError(f"--bucket-width must be >= 0 (0: doubling buckets), got {args.bucket_width}")
    return length


def _summary(acc, job: _Job, csv_path: Path, png_path: Path) -> str:
    import math

    S, L = job.train_length, acc.length
    inside = acc.mean(1, S)
    text = (f"{job.title}: {len(job.windows)} windows x {L} tokens ({job.short_docs}); "
            f"loss {inside:.4f} (ppl {math.exp(inside):.2f}) at positions 1-{S}")
    if L > S:
        beyond, last = acc.mean(S + 1, L), acc.mean(L - S + 1, L)
        text += (f", {beyond:.4f} (ppl {math.exp(beyond):.2f}) at {S + 1}-{L}, "
                 f"{last:.4f} (ppl {math.exp(last):.2f}) at {L - S + 1}-{L}")
    return text + f"; wrote {csv_path}, {png_path}"


def _worker(source, job: _Job) -> None:
    import torch

    from xlstm_megatron.inference.cli import _logs_to_stderr
    from xlstm_megatron.inference.loading import load_model
    from xlstm_megatron.inference.position_loss import (
        PositionLoss,
        plot_position_loss,
        token_losses,
        write_csv,
    )
    from xlstm_megatron.runs.launch import init_parallel, shutdown_parallel

    _logs_to_stderr()
    env = init_parallel(source.tensor_model_parallel_size, 1, seed=source.args.seed)
    model = load_model(source)
    device = next(model.parameters()).device
    windows = torch.from_numpy(job.windows)
    acc = PositionLoss(windows.shape[1] - 1)
    for start in range(0, len(windows), job.micro_batch_size):
        batch = windows[start : start + job.micro_batch_size].to(device)
        acc.add(token_losses(model, batch, job.segment_length))
    if env.rank == 0:
        rows = acc.rows(job.bucket_width)
        csv_path = write_csv(rows, job.out + ".csv")
        png_path = plot_position_loss(rows, job.out + ".png", job.title, job.train_length)
        print(_summary(acc, job, csv_path, png_path), flush=True)
    shutdown_parallel()


def evaluate_main(argv: list[str] | None = None) -> int:
    from xlstm_megatron.data.errors import DataConfigError
    from xlstm_megatron.inference.cli import _logs_to_stderr
    from xlstm_megatron.inference.eval_data import check_token_range, eval_windows
    from xlstm_megatron.inference.loading import resolve_checkpoint
    from xlstm_megatron.runs.errors import ConfigError
    from xlstm_megatron.runs.launch import launch_env, run_processes
    from xlstm_megatron.runs.model import is_transformer

    _logs_to_stderr()
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:  # everything that can be checked before a process starts
        source = resolve_checkpoint(args.load, args.iteration, args.tensor_model_parallel_size, args.seed)
        saved = source.args
        recurrent = not is_transformer(saved) and "*" not in (saved.xlstm_pattern or "m")
        length = _check_lengths(args, int(saved.seq_length), recurrent)
        windows = eval_windows(_documents(args, saved), length, args.short_docs, args.max_windows)
        check_token_range(windows, source.vocab_size)
        env = launch_env()
        tp = source.tensor_model_parallel_size
        nproc = args.nproc or tp
        if (env.world_size if env.launched else nproc) % tp:
            raise ConfigError(f"{nproc} processes cannot hold TP={tp}; use a multiple of {tp} processes (--nproc)")
    except (ConfigError, DataConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    family = "Transformer" if is_transformer(saved) else f"xLSTM ({saved.xlstm_block})"
    title = f"{family} {source.path.parent.name}/{source.path.name}, trained at {saved.seq_length}"
    job = _Job(windows, args.segment_length, args.micro_batch_size, args.bucket_width, args.out, title,
               int(saved.seq_length), args.short_docs)
    if env.launched:
        _worker(source, job)
    else:
        run_processes(_worker, nproc, args=(source, job))
    return 0


if __name__ == "__main__":
    sys.exit(evaluate_main())
