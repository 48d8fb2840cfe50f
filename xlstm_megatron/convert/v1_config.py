"""The official v1 `xLSTMLMModelConfig` (YAML/JSON, as given to `xLSTMLMModel`) -> our v1 model settings.

Missing fields take the official dataclass defaults (restated here: the package is not imported). A config may sit
under a top-level `model:` key, as in the official experiment files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from xlstm_megatron.convert.errors import ConvertError

MLSTM_LAYER_DEFAULTS = dict(conv1d_kernel_size=4, qkv_proj_blocksize=4, num_heads=4, proj_factor=2.0,
                            round_proj_up_dim_up=True, round_proj_up_to_multiple_of=64)
SLSTM_LAYER_DEFAULTS = dict(num_heads=4, conv1d_kernel_size=4, group_norm_weight=True, backend="cuda",
                            function="slstm", num_states=4, num_gates=4, forward_clipval=None)
FEEDFORWARD_DEFAULTS = dict(proj_factor=1.3, act_fn="gelu", round_proj_up_dim_up=True, round_proj_up_to_multiple_of=64,
                            ff_type="ffn_gated", bias=False)
STACK_DEFAULTS = dict(num_blocks=1, embedding_dim=128, add_post_blocks_norm=True, bias=False, slstm_at=[],
                      vocab_size=-1, tie_weights=False, context_length=-1)
ACTIVATIONS = {"gelu": "gelu", "swish": "silu"}  # official act_fn name -> our ffn_activation


@dataclass(frozen=True)
class V1Layout:
    """What the state-dict mapping needs besides the model config."""

    pattern: str
    mlstm_heads: int
    slstm_heads: int
    slstm_backend: str
    context_length: int
    """The official config's context_length (recorded as the checkpoint's --seq-length when > 0)."""


def read_v1_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConvertError(f"--config {path} does not exist")
    try:
        doc = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConvertError(f"{path} is not valid JSON/YAML: {e}".splitlines()[0]) from None
    if isinstance(doc, dict) and isinstance(doc.get("model"), dict):
        doc = doc["model"]
    if not isinstance(doc, dict) or "embedding_dim" not in doc and "num_blocks" not in doc:
        raise ConvertError(f"{path} is not an xLSTMLMModelConfig (no embedding_dim / num_blocks)")
    return doc


def _up_dim(factor: float, dim: int, cfg: dict[str, Any]) -> int:
    """The official UpProjConfigMixin width."""
    multiple = cfg["round_proj_up_to_multiple_of"]
    x = factor * dim / multiple
    return int((math.ceil(x) if cfg["round_proj_up_dim_up"] else math.floor(x)) * multiple)


def _section(cfg: dict[str, Any], *path: str) -> dict[str, Any] | None:
    for key in path:
        if not isinstance(cfg, dict) or cfg.get(key) is None:
            return None
        cfg = cfg[key]
    return cfg


def model_kwargs_from_v1(cfg: dict[str, Any]) -> tuple[dict[str, Any], int, V1Layout]:
    """(make_xlstm_config kwargs of family 'v1', vocab size, layout) of an official xLSTMLMModelConfig."""
    top = {**STACK_DEFAULTS, **cfg}
    E, n = int(top["embedding_dim"]), int(top["num_blocks"])
    for key, bad, what in (("tie_weights", True, "tied embedding and output weights"), ("bias", True, "biases"),
                           ("add_post_blocks_norm", False, "no final norm")):
        if bool(top.get(key)) == bad:
            raise ConvertError(f"v1 config has {key}={bad} ({what}), which our v1 model does not support")
    if int(top["vocab_size"]) <= 0:
        raise ConvertError("v1 config has no vocab_size; set it to the model's vocabulary size")
    mblock, sblock = _section(cfg, "mlstm_block"), _section(cfg, "slstm_block")
    slstm_at = list(range(n)) if mblock is None or top["slstm_at"] == "all" else list(top["slstm_at"])
    if any(not 0 <= i < n for i in slstm_at):
        raise ConvertError(f"v1 config slstm_at={slstm_at} has positions outside 0..{n - 1}")
    if slstm_at and sblock is None:
        raise ConvertError("v1 config places sLSTM blocks (slstm_at) but has no slstm_block")
    pattern = "".join("s" if i in slstm_at else "m" for i in range(n))
    kwargs: dict[str, Any] = dict(num_layers=n, hidden_size=E, xlstm_pattern=pattern)
    m = {**MLSTM_LAYER_DEFAULTS, **(_section(cfg, "mlstm_block", "mlstm") or {})}
    s = {**SLSTM_LAYER_DEFAULTS, **(_section(cfg, "slstm_block", "slstm") or {})}
    ff = {**FEEDFORWARD_DEFAULTS, **(_section(cfg, "slstm_block", "feedforward") or {})}
    kernels = set()
    if "m" in pattern:
        inner = _up_dim(m["proj_factor"], E, m)
        ours = int(math.ceil(m["proj_factor"] * E / 64) * 64)
        if inner != ours:
            raise ConvertError(f"v1 mLSTM up-projection width {inner} is not round_up(proj_factor x E, 64)={ours}, "
                               "the only rounding our v1 block implements")
        kwargs.update(mlstm_proj_factor=float(m["proj_factor"]), mlstm_qkv_block_size=int(m["qkv_proj_blocksize"]))
        kernels.add(int(m["conv1d_kernel_size"]))
    if "s" in pattern:
        unsupported = {"function": "slstm", "num_states": 4, "num_gates": 4, "forward_clipval": None,
                       "group_norm_weight": True}
        for key, want in unsupported.items():
            if s.get(key) != want:
                raise ConvertError(f"v1 sLSTM setting {key}={s.get(key)!r} is not supported (only {want!r})")
        if s["backend"] not in ("vanilla", "cuda"):
            raise ConvertError(f"v1 sLSTM backend {s['backend']!r} is unknown; use 'vanilla' or 'cuda'")
        if ff["ff_type"] != "ffn_gated" or ff["bias"]:
            raise ConvertError("v1 sLSTM feedforward must be 'ffn_gated' without bias")
        if ff["act_fn"] not in ACTIVATIONS:
            raise ConvertError(f"v1 feedforward act_fn={ff['act_fn']!r} is not supported; use {sorted(ACTIVATIONS)}")
        kwargs.update(slstm_num_heads=int(s["num_heads"]), ffn_hidden_size=_up_dim(ff["proj_factor"], E, ff),
                      ffn_proj_factor=float(ff["proj_factor"]), ffn_activation=ACTIVATIONS[ff["act_fn"]])
        kernels.add(int(s["conv1d_kernel_size"]))
    if len(kernels) > 1 or 0 in kernels:
        raise ConvertError(f"v1 conv1d_kernel_size differs between mLSTM and sLSTM or is 0 ({sorted(kernels)}); "
                           "our v1 model has one causal conv width > 0")
    kwargs["conv_kernel_size"] = kernels.pop()
    mlstm_heads = int(m["num_heads"]) if "m" in pattern else int(s["num_heads"])
    kwargs["num_attention_heads"] = mlstm_heads
    layout = V1Layout(pattern, mlstm_heads, int(s["num_heads"]), str(s["backend"]), int(top["context_length"]))
    return kwargs, int(top["vocab_size"]), layout
