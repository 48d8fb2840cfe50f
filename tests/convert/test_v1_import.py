"""Official v1 xLSTMLMModel state dict + config -> our Megatron checkpoint: the model its saved args define loads it
at TP=1 and TP=2 with the official logits."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

from tests.convert.hf_models import checkpoint_model, convert, full_logits
from tests.megatron.dist import run_distributed
from tests.models.helpers import official_v1_model

SEQ, VOCAB = 12, 40


def _official(E: int, NHm: int, NHs: int, pattern: str, seed: int):
    torch.manual_seed(seed)
    model, config = official_v1_model(E, NHm, NHs, pattern, SEQ, VOCAB)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, config


def _loaded_logits(ckpt: str, tokens: torch.Tensor) -> dict:
    from pathlib import Path

    out = {}
    for tp in (1, 2):
        model, common = checkpoint_model(Path(ckpt), tp=tp)
        out[tp] = (full_logits(model, tokens), common["iteration"])
    return out


def _architectures(*ckpts: str) -> list[dict]:
    from xlstm_megatron.runs.checkpoint import architecture, resolve_checkpoint_dir, saved_args

    return [architecture(saved_args(resolve_checkpoint_dir(c))) for c in ckpts]


def test_official_v1_model_converts_with_its_logits(tmp_path):
    model, config = _official(E=32, NHm=2, NHs=2, pattern="msm", seed=3)
    torch.save(model.state_dict(), tmp_path / "v1.pt")
    (tmp_path / "full.json").write_text(json.dumps(dataclasses.asdict(config)))  # every field, as the package has it
    minimal = {"model": {"embedding_dim": 32, "num_blocks": 3, "vocab_size": VOCAB, "slstm_at": [1],
                         "mlstm_block": {"mlstm": {"num_heads": 2}},
                         "slstm_block": {"slstm": {"num_heads": 2, "backend": "vanilla"}}}}
    (tmp_path / "minimal.yaml").write_text(yaml.safe_dump(minimal))  # official defaults fill the rest
    results = convert(
        ["xlstm-v1-to-megatron", "--state-dict", tmp_path / "v1.pt", "--config", tmp_path / "full.json",
         "--out", tmp_path / "ckpt"],
        ["xlstm-v1-to-megatron", "--state-dict", tmp_path / "v1.pt", "--config", tmp_path / "minimal.yaml",
         "--out", tmp_path / "ckpt_minimal"],
    )
    assert all(rc == 0 for rc, _ in results), results
    full, minimal = _architectures(str(tmp_path / "ckpt"), str(tmp_path / "ckpt_minimal"))
    assert full == minimal and full["xlstm_pattern"] == "msm" and full["padded_vocab_size"] == VOCAB

    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens)
    for rank_result in run_distributed(_loaded_logits, world_size=2, args=(str(tmp_path / "ckpt"), tokens)):
        for tp, (logits, iteration) in rank_result.items():
            assert iteration == 0
            torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0, msg=f"TP={tp}")


@pytest.mark.parametrize("edit,expected", [
    ({"tie_weights": True}, "tie_weights"),
    ({"slstm_block": {"slstm": {"num_heads": 2, "backend": "vanilla", "conv1d_kernel_size": 2}}}, "conv1d_kernel"),
    ({"slstm_block": {"slstm": {"num_heads": 2}, "feedforward": {"act_fn": "relu"}}}, "act_fn"),
])
def test_unsupported_v1_settings_are_refused(edit, expected):
    from xlstm_megatron.convert.errors import ConvertError
    from xlstm_megatron.convert.v1_config import model_kwargs_from_v1

    base = {"embedding_dim": 32, "num_blocks": 2, "vocab_size": VOCAB, "slstm_at": [1],
            "mlstm_block": {"mlstm": {"num_heads": 2}}, "slstm_block": {"slstm": {"num_heads": 2}}}
    with pytest.raises(ConvertError, match=expected):
        model_kwargs_from_v1({**base, **edit})
