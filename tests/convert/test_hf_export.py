"""Our Megatron checkpoints -> Hugging Face: bitwise round trips, and checkpoints saved at TP=2 or PP=2 (by
runs.checkpoint, from a model built through runs.model) export to directories that transformers loads offline with our
logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.convert.hf_models import convert, hf_logits, load_hf, random_hf_model
from tests.megatron.dist import run_distributed

SEQ = 20


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


ROUND_TRIPS = {
    "single": (dict(vocab_size=64, hidden_size=96, num_hidden_layers=2, num_heads=2, chunk_size=8), "50GB"),
    "fused-sharded": (dict(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_heads=2, chunk_size=4,
                           weight_mode="fused", qk_dim_factor=0.25, v_dim_factor=0.5, ffn_proj_factor=1.5,
                           ffn_round_up_to_multiple_of=32, bos_token_id=7, eos_token_id=9), "20KB"),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_hf_to_megatron_to_hf_is_bitwise(case, tmp_path):
    config, shard = ROUND_TRIPS[case]
    hf = random_hf_model(seed=11, **config)
    hf.save_pretrained(tmp_path / "hf", max_shard_size=shard)
    [(rc1, err1), (rc2, err2)] = convert(
        ["hf-to-megatron", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "ckpt"],
        ["megatron-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "back", "--max-shard-size", shard],
    )
    assert rc1 == 0 and rc2 == 0, err1 + err2
    before, after = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    cfg_before = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg_after = json.loads((tmp_path / "back" / "config.json").read_text())
    assert {k: cfg_after.get(k) for k in cfg_before} == cfg_before
    tokens = torch.randint(0, config["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hf_logits(load_hf(tmp_path / "back"), tokens), hf_logits(hf, tokens), atol=0, rtol=0)


def test_bf16_checkpoint_exports_bf16_or_upcast(tmp_path):
    """fp32 HF -> bf16 checkpoint -> bf16 (default: the checkpoint's dtype) or fp32 HF; bf16 HF imports as bf16."""
    hf = random_hf_model(seed=4, vocab_size=32, hidden_size=64, num_hidden_layers=1, num_heads=2, chunk_size=8)
    hf.save_pretrained(tmp_path / "hf")
    results = convert(
        ["hf-to-megatron", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "ckpt", "--dtype", "bf16"],
        ["megatron-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "bf16"],
        ["megatron-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "fp32", "--dtype", "fp32"],
        ["hf-to-megatron", "--hf-dir", tmp_path / "bf16", "--out", tmp_path / "ckpt2"],
        ["megatron-to-hf", "--ckpt", tmp_path / "ckpt2", "--out", tmp_path / "bf16_again"],
    )
    assert all(rc == 0 for rc, _ in results), results
    original = _tensors(tmp_path / "hf")
    bf16, fp32, again = (_tensors(tmp_path / d) for d in ("bf16", "fp32", "bf16_again"))
    for name, t in original.items():
        assert bf16[name].dtype == torch.bfloat16 and torch.equal(bf16[name], t.to(torch.bfloat16)), name
        assert fp32[name].dtype == torch.float32 and torch.equal(fp32[name], t.to(torch.bfloat16).float()), name
        assert again[name].dtype == torch.bfloat16 and torch.equal(again[name], bf16[name]), name
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


LARGE = ["--xlstm-block", "large", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2",
         "--mlstm-chunk-size", "8"]
VOCAB = 48


def _large_args(tp: int, pp: int):
    """Megatron args of the Large test model (validated at TP=1: validate_args asks the GPU architecture for TP > 1)
    laid out at TP/PP, vocab exactly VOCAB."""
    from xlstm_megatron.runs.args import megatron_args
    from xlstm_megatron.runs.checkpoint import with_layout

    args = megatron_args([*LARGE, "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
                          "--micro-batch-size", "1", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
                          "--transformer-impl", "local"])
    args.padded_vocab_size = VOCAB
    return with_layout(args, tp, pp)


def _save_checkpoint(root: str, tp: int, pp: int, seed: int) -> None:
    """A logically fixed random model built at TP/PP through runs.model, saved by runs.checkpoint at iteration 7."""
    from megatron.core import parallel_state as ps

    from tests.megatron.dist import reinit_model_parallel
    from tests.models.helpers import randomize_tp_invariant
    from xlstm_megatron.runs.checkpoint import save_weights_checkpoint
    from xlstm_megatron.runs.model import build_xlstm_model

    reinit_model_parallel(tp=tp, pp=pp)
    args = _large_args(tp, pp)
    model = build_xlstm_model(args, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    randomize_tp_invariant(model, seed=seed)
    save_weights_checkpoint([model], root, 7, args)


def _tp1_logits(seed: int, tokens: torch.Tensor) -> torch.Tensor:
    from tests.models.helpers import randomize_tp_invariant
    from xlstm_megatron.runs.model import build_xlstm_model

    model = build_xlstm_model(_large_args(1, 1))
    randomize_tp_invariant(model, seed=seed)
    with torch.no_grad():
        return model.eval()(tokens, None, None)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_checkpoint_saved_at_tp_or_pp_exports_to_hf_with_our_logits(tp, pp, tmp_path):
    seed = 17
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    run_distributed(_save_checkpoint, world_size=2, args=(str(tmp_path / "ckpt"), tp, pp, seed), timeout=180)
    [(rc, err)] = convert(["megatron-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "hf"])
    assert rc == 0, err
    ours = run_distributed(_tp1_logits, world_size=1, args=(seed, tokens))[0]
    theirs = hf_logits(load_hf(tmp_path / "hf"), tokens)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "xlstm" and config["num_blocks"] == 2 and config["dtype"] == "float32"
