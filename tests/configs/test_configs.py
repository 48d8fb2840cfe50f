"""Every YAML in configs/ loads, validates and states its exact parameter count; `count_parameters` equals the real
parameter count of built models (tiny-scaled variants of every config, every config at full size on the meta device,
and variants with attention layers, biases, GQA, a non-gated MLP and shared embeddings)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.megatron.dist import run_distributed
from xlstm_megatron.models.param_count import LAYER_KEYS, count_parameters
from xlstm_megatron.training.batches import padded_vocab_size
from xlstm_megatron.training.run_config import RunConfig, add_run_args, load_run_config
from xlstm_megatron.training.trainer import build_model_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG_PATHS = sorted((ROOT / "configs").rglob("*.yaml"))
CONFIG_IDS = [str(p.relative_to(ROOT / "configs")) for p in CONFIG_PATHS]
TINY_VOCAB = 128

# Code paths no shipped config uses: '*' attention layers (with GQA), linear biases, a plain MLP, tied embeddings.
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


def _load(path: Path) -> tuple[dict[str, Any], RunConfig, dict[str, Any]]:
    args = add_run_args(argparse.ArgumentParser()).parse_args(["--config", str(path)])
    model, run = load_run_config(args)
    return model, run, yaml.safe_load(path.read_text()).get("info") or {}


def _counted_vocab(run: RunConfig, info: dict[str, Any], path: Path) -> int:
    assert run.vocab_size is not None, f"{path}: set train.vocab_size so the parameter count does not depend on data"
    vocab = padded_vocab_size(run, None)  # what training builds: vocab_size padded to a multiple of 64 x TP
    assert info.get("vocab_size") == vocab, f"{path}: info.vocab_size should be the padded vocab {vocab}"
    return vocab


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=CONFIG_IDS)
def test_config_loads_validates_and_states_its_parameter_count(path: Path):
    model, run, info = _load(path)
    config = build_model_config(model, dataclasses.replace(run, bf16=False))  # bf16 is refused on CPU only
    assert isinstance(info.get("source"), str) and info["source"].strip(), f"{path}: info.source is missing"
    assert isinstance(info.get("parameters"), int), f"{path}: info.parameters must be an integer"
    vocab = _counted_vocab(run, info, path)
    assert info["parameters"] == count_parameters(config, vocab)


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


def _tiny_config(model_kwargs: dict[str, Any]):
    """The config at a small hidden size (first that validates), every other architecture field kept."""
    from tests.models.helpers import tiny_config

    kwargs = {k: v for k, v in model_kwargs.items() if k != "ffn_hidden_size"}  # derive it from ffn_proj_factor
    block = kwargs.pop("xlstm_block", "large")
    errors = []
    for hidden in (64, 128, 256):
        try:
            return tiny_config(block, **{**kwargs, "hidden_size": hidden, "mlstm_chunk_size": 16})
        except ValueError as e:
            errors.append(str(e))
    raise ValueError(f"no tiny hidden size fits {model_kwargs}: {errors}")


def _build_all(tiny: dict[str, tuple[dict[str, Any], bool]], full: dict[str, tuple[dict[str, Any], int]]):
    import torch

    from tests.models.helpers import build_model, tiny_config

    results = {}
    for name, (kwargs, share) in tiny.items():
        config = _tiny_config(kwargs)
        model = build_model(config, TINY_VOCAB, 32, share_embeddings_and_output_weights=share)
        results[f"tiny:{name}"] = _measure(model, config, TINY_VOCAB, share)
    for name, (kwargs, vocab) in full.items():
        kwargs = dict(kwargs)
        config = tiny_config(kwargs.pop("xlstm_block", "large"), perform_initialization=False, **kwargs)
        with torch.device("meta"):  # full size, no memory: parameters are shapes only
            model = build_model(config, vocab, 2048)
        assert all(p.is_meta for p in model.parameters())
        results[f"meta:{name}"] = _measure(model, config, vocab, False)
    return results


@pytest.fixture(scope="module")
def built() -> dict[str, dict[str, Any]]:
    tiny: dict[str, tuple[dict[str, Any], bool]] = dict(EXTRA_VARIANTS)
    full: dict[str, tuple[dict[str, Any], int]] = {}
    for path, name in zip(CONFIG_PATHS, CONFIG_IDS, strict=True):
        model, run, _ = _load(path)
        tiny[name] = (model, False)
        if run.vocab_size is not None:  # else the first test fails for this config; the others still run
            full[name] = (model, padded_vocab_size(run, None))
    return run_distributed(_build_all, world_size=1, args=(tiny, full), timeout=240)[0]


@pytest.mark.parametrize("name", [*CONFIG_IDS, *EXTRA_VARIANTS])
def test_count_equals_built_tiny_model(built, name: str):
    result = built[f"tiny:{name}"]
    assert result["real"] == result["expected"]


@pytest.mark.parametrize("name", CONFIG_IDS)
def test_count_equals_full_size_model_on_meta_device(built, name: str):
    if f"meta:{name}" not in built:
        pytest.skip("no train.vocab_size: the count is undefined (test_config_loads_... fails for it)")
    result = built[f"meta:{name}"]
    assert result["real"] == result["expected"]
    assert sum(result["real"].values()) == _load(ROOT / "configs" / name)[2].get("parameters")
