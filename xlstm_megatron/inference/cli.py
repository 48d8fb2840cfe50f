"""`xlstm-megatron generate`: continue a prompt with a model from a Megatron checkpoint of ours.

    xlstm-megatron generate --load runs/demo --prompt "ROMEO." --max-new-tokens 64 [--nproc 2]

Loads the latest (or `--iteration`) checkpoint of the run directory (a `--save` directory of `xlstm-megatron train`,
or a converter's output; also one `iter_*` directory), builds the model its saved args define, loads the tokenizer
those args name (or `--tokenizer-model ...`), and prints each prompt's continuation (stdout of rank 0; a trailing
stop token is not printed). Runs under torchrun/srun or starts `--nproc` local processes, like `train`; the
tensor-parallel size defaults to the training run's.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from xlstm_megatron.data.tokenizer import TOKENIZER_TYPES, TokenizerSpec


@dataclass(frozen=True)
class _Request:
    prompts: list[str]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_at_eod: bool


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xlstm-megatron generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint directory (a run's --save, a converter's --out, or one "
                                                 "iter_* directory)")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    p.add_argument("--prompt", action="append", default=None, help="prompt text; repeat for a batch (default: '')")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--stop-at-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="end a continuation at the tokenizer's end-of-document token")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="HuggingFaceTokenizer")
    p.add_argument("--tokenizer-model", default=None, help="default: the tokenizer the run trained with")
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--eod-token", default=None)
    p.add_argument("--tensor-model-parallel-size", type=int, default=None, help="default: the training run's")
    p.add_argument("--nproc", type=int, default=None, help="local processes to start (default: the TP size)")
    return p


# Megatron tokenizer types whose files our loader reads under another name.
MEGATRON_TOKENIZER_TYPES = {"GPTSentencePieceTokenizer": "SentencePieceTokenizer"}


def _tokenizer_spec(args: argparse.Namespace, saved: argparse.Namespace) -> TokenizerSpec:
    """The tokenizer named by the flags, else the one the checkpoint's saved args name."""
    if args.tokenizer_model or args.vocab_file:
        return TokenizerSpec(args.tokenizer_type, tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                             merge_file=args.merge_file, eod_token=args.eod_token)
    kind = MEGATRON_TOKENIZER_TYPES.get(saved.tokenizer_type, saved.tokenizer_type)
    if kind == "NullTokenizer":  # megatron-core 0.19's: vocab_size ids, the last one end-of-document
        return TokenizerSpec("NullTokenizer", vocab_size=int(saved.vocab_size))
    return TokenizerSpec(kind, tokenizer_model=saved.tokenizer_model, vocab_file=saved.vocab_file,
                         merge_file=saved.merge_file, eod_token=args.eod_token)


def _logs_to_stderr() -> None:
    """The continuations own stdout: importing megatron.training's loop would point the root logger there (its
    `basicConfig` is a no-op once the root logger has a handler)."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)


def _worker(source, tokenizer_spec: TokenizerSpec, request: _Request) -> None:
    _logs_to_stderr()
    from xlstm_megatron.inference.generate import generate
    from xlstm_megatron.inference.loading import load_model
    from xlstm_megatron.runs.launch import init_parallel, shutdown_parallel

    env = init_parallel(source.tensor_model_parallel_size, 1, seed=source.args.seed)
    model = load_model(source)
    tokenizer = tokenizer_spec.load()
    prompts = [tokenizer.encode(text) or [tokenizer.eod_id] for text in request.prompts]
    stops = [tokenizer.eod_id] if request.stop_at_eod else []
    out = generate(
        model, prompts, request.max_new_tokens, temperature=request.temperature, top_k=request.top_k,
        top_p=request.top_p, stop_tokens=stops, seed=request.seed, vocab_limit=tokenizer.vocab_size,
    )
    if env.rank == 0:
        for new in out.tokens:
            print(tokenizer.decode(new[:-1] if new and new[-1] in stops else new), flush=True)
    shutdown_parallel()


def generate_main(argv: list[str] | None = None) -> int:
    from xlstm_megatron.data.errors import DataConfigError
    from xlstm_megatron.data.tokenizer import check_tokenizer_matches_model
    from xlstm_megatron.inference.generate import check_generation_support
    from xlstm_megatron.inference.loading import resolve_checkpoint
    from xlstm_megatron.inference.sampling import check_sampling_args
    from xlstm_megatron.runs.checkpoint import saved_args
    from xlstm_megatron.runs.errors import ConfigError
    from xlstm_megatron.runs.launch import launch_env, run_processes
    from xlstm_megatron.runs.model import xlstm_config_from_args

    _logs_to_stderr()
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    request = _Request(args.prompt or [""], args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       args.seed, args.stop_at_eod)
    try:  # everything that can be checked before a process starts
        check_sampling_args(request.temperature, request.top_k, request.top_p)
        if request.max_new_tokens < 0:
            raise ConfigError(f"--max-new-tokens must be >= 0, got {request.max_new_tokens}")
        source = resolve_checkpoint(args.load, args.iteration, args.tensor_model_parallel_size, args.seed)
        check_generation_support(xlstm_config_from_args(source.args))
        tokenizer_spec = _tokenizer_spec(args, saved_args(source.path))
        check_tokenizer_matches_model(tokenizer_spec.load(), source.vocab_size)
        env = launch_env()
        tp = source.tensor_model_parallel_size
        nproc = args.nproc or tp
        world = env.world_size if env.launched else nproc
        if world % tp:
            raise ConfigError(f"{world} processes cannot hold TP={tp}; use a multiple of {tp} processes (--nproc)")
    except (ConfigError, DataConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if env.launched:
        _worker(source, tokenizer_spec, request)
    else:
        run_processes(_worker, nproc, args=(source, tokenizer_spec, request))
    return 0


if __name__ == "__main__":
    sys.exit(generate_main())
