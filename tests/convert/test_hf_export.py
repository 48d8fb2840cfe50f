"""Our checkpoints -> Hugging Face: bitwise round trips, and checkpoints the trainer saved at TP=2 or PP=2 export to
directories that transformers loads offline with our logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.convert.hf_models import convert, hf_logits, load_hf, random_hf_model, trainer_state, zero_lr_step
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


LARGE = dict(xlstm_block="large", num_layers=2, hidden_size=64, num_attention_heads=2, mlstm_chunk_size=8)
VOCAB = 48


def _save_trained_checkpoint(root: str, tp: int, pp: int, seed: int) -> None:
    """A full trainer checkpoint (model + distributed optimizer + scheduler) of a logically fixed random model."""
    from tests.models.helpers import randomize_tp_invariant
    from xlstm_megatron.training import checkpoint as ckpt_io
    from xlstm_megatron.training.run_config import dump_run_config

    path = Path(root)
    if torch.distributed.get_rank() == 0:
        path.mkdir()
        doc = {"model": LARGE, "train": {"vocab_size": VOCAB, "make_vocab_size_divisible_by": 1}}
        (path / "run_config.yaml").write_text(yaml.safe_dump(doc))
    torch.distributed.barrier()
    state, run, _ = trainer_state(path, tp=tp, pp=pp, seq=SEQ, load=False)
    zero_lr_step(state)  # the distributed optimizer has state to save only after a step
    for chunk in state.inner:
        randomize_tp_invariant(chunk, seed=seed)
    ckpt_io.save_checkpoint(path, 7, state.inner, state.optimizer, state.scheduler,
                            ckpt_io.architecture(state.config, VOCAB), {}, True)
    if torch.distributed.get_rank() == 0:  # what the trainer leaves next to its checkpoints
        (path / "run_config.yaml").write_text(dump_run_config(LARGE, run))


def _tp1_logits(seed: int, tokens: torch.Tensor) -> torch.Tensor:
    from tests.models.helpers import build_model, randomize_tp_invariant, tiny_config

    cfg = {k: v for k, v in LARGE.items() if k != "xlstm_block"}
    model = build_model(tiny_config("large", **cfg), VOCAB, SEQ)
    randomize_tp_invariant(model, seed=seed)
    with torch.no_grad():
        return model.eval()(tokens, None, None)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_checkpoint_saved_at_tp_or_pp_exports_to_hf_with_our_logits(tp, pp, tmp_path):
    seed = 17
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    run_distributed(_save_trained_checkpoint, world_size=2, args=(str(tmp_path / "ckpt"), tp, pp, seed), timeout=180)
    [(rc, err)] = convert(["megatron-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "hf"])
    assert rc == 0, err
    ours = run_distributed(_tp1_logits, world_size=1, args=(seed, tokens))[0]
    theirs = hf_logits(load_hf(tmp_path / "hf"), tokens)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "xlstm" and config["num_blocks"] == 2 and config["dtype"] == "float32"
