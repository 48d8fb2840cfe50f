"""`xlstm-megatron convert`: Hugging Face and official v1 checkpoints <-> Megatron checkpoints of our models.

    convert hf-to-megatron --hf-dir D --out CKPT [--dtype fp32|bf16]
    convert megatron-to-hf --ckpt CKPT [--iteration N] [--dtype fp32|bf16] [--max-shard-size 2GB] --out D
    convert xlstm-v1-to-megatron --state-dict F.pt --config V1.yaml --out CKPT [--dtype fp32|bf16]
    convert deepspeed-to-megatron --ckpt DS_DIR [--tag global_stepN] --out CKPT

Bad input ends with one `error: ...` line on stderr and exit status 2; nothing is written then (output goes to a
temporary directory next to --out and is renamed at the end; an existing --out is refused). The checkpoints are
Megatron's own format (`--load CKPT --finetune` continues training from an imported model); the architecture is the
one the checkpoint's saved args record.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlstm-megatron convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True, metavar="{hf-to-megatron,megatron-to-hf,"
                                                                           "xlstm-v1-to-megatron,deepspeed-to-megatron}")
    dtypes = ["fp32", "bf16"]
    p = sub.add_parser("hf-to-megatron", help="Hugging Face xLSTMForCausalLM directory -> our checkpoint")
    p.add_argument("--hf-dir", type=Path, required=True, help="directory with config.json and safetensors")
    p.add_argument("--out", type=Path, required=True, help="new checkpoint directory (train --load DIR --finetune)")
    p.add_argument("--dtype", choices=dtypes, help="saved weights dtype (default: bf16 for bf16 files, else fp32)")
    p = sub.add_parser("megatron-to-hf", help="our checkpoint (any TP/PP) -> Hugging Face directory")
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint directory (the run's --save, or one iter_*)")
    p.add_argument("--iteration", type=int, help="iteration to export (default: the latest)")
    p.add_argument("--dtype", choices=dtypes, help="dtype of the written weights (default: the checkpoint's)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--out", type=Path, required=True, help="new Hugging Face model directory")
    p = sub.add_parser("xlstm-v1-to-megatron", help="official v1 xLSTMLMModel state dict -> our checkpoint")
    p.add_argument("--state-dict", type=Path, required=True, help="torch.save'd xLSTMLMModel.state_dict()")
    p.add_argument("--config", type=Path, required=True, help="its xLSTMLMModelConfig as YAML or JSON")
    p.add_argument("--out", type=Path, required=True, help="new checkpoint directory")
    p.add_argument("--dtype", choices=dtypes, default="fp32", help="dtype of the saved weights")
    p = sub.add_parser("deepspeed-to-megatron", help="a `train --deepspeed` checkpoint (ZeRO 0-3) -> our checkpoint")
    p.add_argument("--ckpt", type=Path, required=True, help="the DeepSpeed run's --save directory")
    p.add_argument("--tag", help="DeepSpeed tag to export, e.g. global_step600 (default: its `latest`)")
    p.add_argument("--out", type=Path, required=True, help="new checkpoint directory")
    return parser


def convert_main(argv: list[str] | None = None) -> int:
    from xlstm_megatron.convert.errors import ConvertError
    from xlstm_megatron.runs.errors import ConfigError

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.direction == "hf-to-megatron":
            from xlstm_megatron.convert.hf import hf_to_megatron

            hf_to_megatron(args.hf_dir, args.out, args.dtype)
        elif args.direction == "megatron-to-hf":
            from xlstm_megatron.convert.hf import megatron_to_hf
            from xlstm_megatron.convert.hf_files import parse_size

            megatron_to_hf(args.ckpt, args.out, args.iteration, args.dtype, parse_size(args.max_shard_size))
        elif args.direction == "deepspeed-to-megatron":
            from xlstm_megatron.convert.deepspeed import deepspeed_to_megatron

            deepspeed_to_megatron(args.ckpt, args.out, args.tag)
        else:
            from xlstm_megatron.convert.v1 import v1_to_checkpoint

            v1_to_checkpoint(args.state_dict, args.config, args.out, args.dtype)
    except (ConvertError, ConfigError, OSError) as e:  # OSError: unreadable input, unwritable --out, full disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(convert_main())
