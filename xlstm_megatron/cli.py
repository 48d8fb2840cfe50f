"""`xlstm-megatron`: the console command (train, preprocess, generate, evaluate, lm-eval, convert, study)."""

from __future__ import annotations

import sys

USAGE = """usage: xlstm-megatron <command> [options]

commands:
  train       train an xLSTM with Megatron's pretrain() (YAML and/or Megatron flags; torchrun, srun, or --nproc N)
  preprocess  jsonl / text files -> Megatron indexed dataset (.bin/.idx)
  generate    continue a prompt from a checkpoint with constant-memory recurrent decoding
  evaluate    loss / perplexity per token position beyond the training length (CSV + plot)
  lm-eval     lm-evaluation-harness tasks on a checkpoint (pip install 'xlstm-megatron[eval]')
  convert     Hugging Face xLSTM <-> Megatron dist checkpoint; official `xlstm` v1 -> Megatron
  study       scaling studies: run a grid of families x sizes x budgets x LRs, collect a CSV, fit scaling laws

`xlstm-megatron <command> --help` lists the options of a command."""


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from xlstm_megatron.compat.quiet import quiet_known_warnings

    quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from xlstm_megatron.inference.sample import sample_text
        from xlstm_megatron.training.command import train_main

        return train_main(rest, sample_text)
    if command == "preprocess":
        from xlstm_megatron.data.preprocess import preprocess_main

        return preprocess_main(rest)
    if command == "convert":
        from xlstm_megatron.convert.cli import convert_main

        return convert_main(rest)
    if command == "generate":
        from xlstm_megatron.inference.cli import generate_main

        return generate_main(rest)
    if command == "evaluate":
        from xlstm_megatron.inference.evaluate_cli import evaluate_main

        return evaluate_main(rest)
    if command == "lm-eval":
        from xlstm_megatron.inference.lm_eval_cli import lm_eval_main

        return lm_eval_main(rest)
    if command == "study":
        from xlstm_megatron.inference.sample import sample_text
        from xlstm_megatron.studies.cli import study_main
        from xlstm_megatron.training.command import add_runner_args, train_main

        return study_main(rest, lambda argv: train_main(argv, sample_text), add_runner_args)
    return _fail(f"unknown command {command!r}; see `xlstm-megatron --help`")


if __name__ == "__main__":
    sys.exit(main())
