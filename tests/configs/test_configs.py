"""Every YAML in configs/ becomes Megatron flags (`yaml_to_argv`), parses and validates through the run's own path
(`parse_xlstm_args` -> Megatron's `validate_args` -> `runs.model.xlstm_config_from_args`) and states its exact
parameter count; `count_parameters` equals the real parameter count of built models (tiny-scaled variants of every
config built from its flags, every config at full size on the meta device, and variants with attention layers, biases,
GQA, a non-gated MLP and shared embeddings)."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.megatron.dist import run_distributed
from xlstm_megatron.models.param_count import LAYER_KEYS

ROOT = Path(__file__).resolve().parents[2]
# run configs (configs/studies/ holds study files, which tests/studies checks)
CONFIG_PATHS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "studies")
CONFIG_IDS = [str(p.relative_to(ROOT / "configs")) for p in CONFIG_PATHS]
TINY_VOCAB = 128

# Code paths no shipped config uses: '*' attention layers (with GQA), linear biases, a plain MLP, tied embeddings.
# Built from XLSTMConfig directly: Megatron's flags cannot turn biases on or tie embeddings (the family refuses them).
EXTRA_VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    "large+attention+gqa+bias": (
        dict(xlstm_block="large", num_layers=3, num_attention_heads=4, xlstm_pattern="m*m", num_query_groups=2,
             add_bias_linear=True), False,
    ),
    "v1+attention+plain_mlp+qkv_bias": (
        dict(xlstm_block="v1", num_layers=4, num_attention_heads=4, xlstm_pattern="ms*m", gated_linear_unit=False,
             add_qkv_bias=True, slstm_num_heads=2), False,
    ),
    "v1+bias+shared_embeddings": (
        dict(xlstm_block="v1", num_layers=3, num_attention_heads=2, xlstm_pattern="smm", add_bias_linear=True,
             conv_kernel_size=3), True,
    ),
}


def runner_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Stand-in for the training engine's own flags that the YAMLs' `train:` sections use."""
    group = parser.add_argument_group("runner")
    for name, typ in (("nproc", int), ("demo_data_dir", str), ("demo_vocab_size", int), ("demo_max_plays", int),
                      ("eod_token", str), ("loss_curve", str), ("sample_prompt", str), ("sample_tokens", int)):
        group.add_argument("--" + name.replace("_", "-"), dest=name, type=typ)
    group.add_argument("--demo-data", action=argparse.BooleanOptionalAction, default=False)
    return parser


def _doc(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _argv(doc: dict[str, Any]) -> list[str]:
    from xlstm_megatron.runs.args import megatron_parser, yaml_to_argv

    return yaml_to_argv(doc, megatron_parser(runner_args))


def _config_and_vocab(argv: list[str], **overrides: Any):
    """What a run of these flags builds: validated Megatron args -> XLSTMConfig (at TP=1, PP=1 for this one-process
    check; the count is the logical model's) and the padded vocab."""
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    from xlstm_megatron.compat import pretrain_context
    from xlstm_megatron.runs.args import megatron_args, parse_xlstm_args
    from xlstm_megatron.runs.model import xlstm_config_from_args

    probe, _ = parse_xlstm_args(argv, runner_args)
    world = probe.tensor_model_parallel_size * probe.pipeline_model_parallel_size
    with pretrain_context():  # validate_args asks the GPU architecture when TP > 1: the CPU shims answer
        args = megatron_args(argv, runner_args, world_size=world)
    vocab = vocab_size_with_padding(args.vocab_size, args, logging_enabled=False)  # the tokenizer's, padded
    config = xlstm_config_from_args(args, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                    sequence_parallel=False, **overrides)
    return config, vocab, not args.untie_embeddings_and_output_weights


def _count_all(argvs: dict[str, list[str]]) -> dict[str, tuple[int, int, bool]]:
    from xlstm_megatron.models.param_count import count_parameters

    out = {}
    for name, argv in argvs.items():
        config, vocab, tied = _config_and_vocab(argv)
        out[name] = (count_parameters(config, vocab, tied), vocab, tied)
    return out


@pytest.fixture(scope="module")
def counted() -> dict[str, tuple[int, int, bool]]:
    argvs = {name: _argv(_doc(path)) for path, name in zip(CONFIG_PATHS, CONFIG_IDS, strict=True)}
    return run_distributed(_count_all, world_size=1, args=(argvs,), timeout=120)[0]  # TP>1 validation needs shims


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=CONFIG_IDS)
def test_config_loads_validates_and_states_its_parameter_count(counted, path: Path):
    info = _doc(path).get("info") or {}
    assert isinstance(info.get("source"), str) and info["source"].strip(), f"{path}: info.source is missing"
    assert isinstance(info.get("parameters"), int), f"{path}: info.parameters must be an integer"
    assert "vocab_size" in (_doc(path).get("train") or {}), f"{path}: set train.vocab_size (count independent of data)"
    count, vocab, tied = counted[str(path.relative_to(ROOT / "configs"))]
    assert info.get("vocab_size") == vocab, f"{path}: info.vocab_size should be the padded vocab {vocab}"
    assert not tied
    assert info["parameters"] == count


# ---- real models ----------------------------------------------------------------------------------------------------


def _part_of(name: str, pattern: str) -> str:
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("output_layer."):
        return "output_layer"
    if name.startswith("decoder.final_layernorm."):
        return "final_norm"
    index = int(name.split(".")[2])  # decoder.layers.<i>. ...
    return LAYER_KEYS[pattern[index]]


def _measure(model, config, vocab: int, share: bool) -> dict[str, Any]:
    from xlstm_megatron.models.param_count import parameter_breakdown

    real = dict.fromkeys(parameter_breakdown(config, vocab, share), 0)
    for name, p in model.named_parameters():
        real[_part_of(name, config.layer_pattern)] += p.numel()
    return {"real": real, "expected": parameter_breakdown(config, vocab, share)}


def _tiny_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """The config at a small hidden size and one process, every other architecture flag kept (FFN width derived)."""
    tiny = copy.deepcopy(doc)
    tiny["model"].pop("ffn_hidden_size", None)
    tiny["model"]["mlstm_chunk_size"] = 16
    tiny["train"].update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, sequence_parallel=False,
                         seq_length=32, vocab_size=TINY_VOCAB, make_vocab_size_divisible_by=64, bf16=False,
                         micro_batch_size=1, global_batch_size=None)
    return tiny


def _tiny_from_flags(argvs: list[list[str]]):
    """The first of the hidden-size variants whose flags validate, as (config, vocab) built through the args path."""
    errors = []
    for argv in argvs:
        try:
            return _config_and_vocab(argv)[:2]
        except ValueError as e:
            errors.append(str(e))
    raise ValueError(f"no tiny hidden size fits: {errors}")


def _build_all(tiny_flags: dict[str, list[list[str]]], extra: dict[str, tuple[dict[str, Any], bool]],
               full: dict[str, list[str]]):
    import torch

    from tests.models.helpers import build_model, tiny_config

    results = {}
    for name, argvs in tiny_flags.items():
        config, vocab = _tiny_from_flags(argvs)
        results[f"tiny:{name}"] = _measure(build_model(config, vocab, 32), config, vocab, False)
    for name, (kwargs, share) in extra.items():
        kwargs = dict(kwargs)
        config = tiny_config(kwargs.pop("xlstm_block"), hidden_size=64, mlstm_chunk_size=16, **kwargs)
        model = build_model(config, TINY_VOCAB, 32, share_embeddings_and_output_weights=share)
        results[f"tiny:{name}"] = _measure(model, config, TINY_VOCAB, share)
    for name, argv in full.items():
        config, vocab, _ = _config_and_vocab(argv, perform_initialization=False)
        with torch.device("meta"):  # full size, no memory: parameters are shapes only
            model = build_model(config, vocab, 2048)
        assert all(p.is_meta for p in model.parameters())
        results[f"meta:{name}"] = _measure(model, config, vocab, False)
    return results


@pytest.fixture(scope="module")
def built() -> dict[str, dict[str, Any]]:
    tiny: dict[str, list[list[str]]] = {}
    full: dict[str, list[str]] = {}
    for path, name in zip(CONFIG_PATHS, CONFIG_IDS, strict=True):
        doc = _doc(path)
        tiny_doc = _tiny_doc(doc)
        tiny[name] = [_argv(tiny_doc) + ["--hidden-size", str(h)] for h in (64, 128, 256)]  # CLI after YAML wins
        full[name] = _argv(doc)
    return run_distributed(_build_all, world_size=1, args=(tiny, EXTRA_VARIANTS, full), timeout=240)[0]


@pytest.mark.parametrize("name", [*CONFIG_IDS, *EXTRA_VARIANTS])
def test_count_equals_built_tiny_model(built, name: str):
    result = built[f"tiny:{name}"]
    assert result["real"] == result["expected"]


@pytest.mark.parametrize("name", CONFIG_IDS)
def test_count_equals_full_size_model_on_meta_device(built, name: str):
    result = built[f"meta:{name}"]
    assert result["real"] == result["expected"]
    assert sum(result["real"].values()) == _doc(ROOT / "configs" / name)["info"]["parameters"]
