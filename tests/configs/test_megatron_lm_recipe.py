"""The Megatron-LM recipes of docs/megatron_lm.md build the models of the YAML configs they name.

Each recipe's MODEL_ARGS and TRAIN_ARGS go the way `launch/pretrain_xlstm.py` takes them: `parse_xlstm_args` (the
family applied), Megatron's `validate_args`, then `runs.model.build_xlstm_model` (`core_transformer_config_from_args(
args, config_class=XLSTMConfig)` and XLSTMModel): at full size on the meta device the model has exactly the YAML's
`info.parameters`, with no family warning; a tiny variant of the same flags runs forward and backward.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.megatron.dist import run_distributed

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "megatron_lm.md"
RECIPE = re.compile(r"<!-- recipe: (\S+) tokenizer_vocab=(\d+) -->\n```bash\n(.*?)\n```", re.DOTALL)
# Single process on CPU: no TP, local modules, CPU init (the recipes' TP and TE settings need GPUs).
CPU_ARGS = [
    "--tensor-model-parallel-size", "1", "--transformer-impl", "local", "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion", "--mock-data",
]


def _recipes() -> list[tuple[str, int, list[str]]]:
    out = []
    for config, vocab, script in RECIPE.findall(DOC.read_text()):
        arrays = dict(re.findall(r"(MODEL|TRAIN)_ARGS=\(\n(.*?)\n\)", script, re.DOTALL))
        argv = shlex.split(arrays["MODEL"], comments=True) + shlex.split(arrays["TRAIN"], comments=True)
        out.append((config, int(vocab), argv))
    return out


RECIPES = _recipes()


def _replace(argv: list[str], flag: str, *values: str) -> list[str]:
    """argv with `flag` and its values removed, then `flag values` appended (values empty: only removed)."""
    out, skip = [], False
    for a in argv:
        if skip and not a.startswith("--"):
            continue
        skip = a == flag
        if not skip:
            out.append(a)
    return out + ([flag, *values] if values else [])


def _build(argv: list[str], tokenizer_vocab: int, meta: bool):
    import contextlib
    import io

    import torch
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding
    from megatron.training.arguments import validate_args

    from xlstm_megatron.runs.args import parse_xlstm_args
    from xlstm_megatron.runs.model import build_xlstm_model, xlstm_config_from_args

    args, warnings = parse_xlstm_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        validate_args(args, {})
    args.padded_vocab_size = vocab_size_with_padding(tokenizer_vocab, args, logging_enabled=False)  # the tokenizer's
    if meta:
        config = xlstm_config_from_args(args, perform_initialization=False)
        with torch.device("meta"):
            model = build_xlstm_model(args, config)
        return sum(p.numel() for p in model.parameters()), config.layer_pattern, warnings
    model = build_xlstm_model(args)
    tokens = torch.randint(0, tokenizer_vocab, (2, args.seq_length))
    loss = model(tokens, None, None, labels=tokens).mean()
    loss.backward()
    return float(loss), all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(("config", "tokenizer_vocab", "argv"), RECIPES, ids=[r[0] for r in RECIPES])
def test_recipe_builds_the_config_model_at_full_size(config: str, tokenizer_vocab: int, argv: list[str]):
    info = yaml.safe_load((ROOT / config).read_text())["info"]
    count, pattern, warnings = run_distributed(_build, world_size=1, args=(argv + CPU_ARGS, tokenizer_vocab, True))[0]
    assert count == info["parameters"], f"{config}: pattern {pattern}"
    assert warnings == []  # the recipe asks for nothing the family would not build


@pytest.mark.parametrize(("config", "tokenizer_vocab", "argv"), RECIPES, ids=[r[0] for r in RECIPES])
def test_recipe_flags_train_a_tiny_model(config: str, tokenizer_vocab: int, argv: list[str]):
    tiny = [a for a in argv if a != "--bf16"]
    pattern = "msm" if "--slstm-num-heads" in argv else "mm"
    for flag, value in (("--num-layers", str(len(pattern))), ("--xlstm-pattern", pattern), ("--hidden-size", "64"),
                        ("--seq-length", "32"),
                        ("--micro-batch-size", "2"), ("--global-batch-size", "2"), ("--mlstm-chunk-size", "16")):
        tiny = _replace(tiny, flag, value)
    loss, grads_finite = run_distributed(_build, world_size=1, args=(tiny + CPU_ARGS, 256, False))[0]
    assert grads_finite and 0 < loss < 20


def test_doc_has_both_recipes():
    assert {r[0] for r in RECIPES} == {"configs/v1/xlstm71_125m.yaml", "configs/large/xlstm_7b.yaml"}
