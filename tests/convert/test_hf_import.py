"""Hugging Face xLSTM -> our checkpoint: the trainer loads it at TP=1, TP=2 and PP=2 and computes HF's logits and
loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.convert.hf_models import convert, full_logits, hf_logits, random_hf_model, trainer_state, zero_lr_step
from tests.megatron.dist import run_distributed
from xlstm_megatron.convert.hf_config import model_kwargs_from_hf

SEQ = 20
CASES = {
    # HF's config.qk_dim rounds 48 up to 64 (used by its cache only); the weights and ours have 48 q/k rows.
    "qk-rounding": dict(vocab_size=64, hidden_size=96, num_hidden_layers=2, num_heads=2, chunk_size=8),
    # fused weights (qkv_opreact, ifgate_preact, proj_up_gate_z), sharded files, non-default widths/eps/caps/FFN.
    "fused-sharded": dict(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_heads=2, chunk_size=4,
                          weight_mode="fused", qk_dim_factor=0.25, v_dim_factor=0.5, ffn_proj_factor=1.5,
                          ffn_round_up_to_multiple_of=32, norm_eps=1e-2, eps=1e-3, gate_soft_cap=5.0,
                          output_logit_soft_cap=10.0),
    "four-heads": dict(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_heads=4, chunk_size=16,
                       gate_soft_cap=3.0, output_logit_soft_cap=50.0),
}
SHARD = {"fused-sharded": "20KB"}


def _trainer_outputs(ckpt: str, tokens: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per layout (TP, PP): logits (PP=1 only), logits after an lr=0 step, the saved iteration and the mean loss
    through the trainer's own pipeline schedule."""
    from pathlib import Path

    from xlstm_megatron.training.trainer import _mean_loss, _run_schedule

    out = {}
    batch = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones_like(tokens)}
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        state, run, common = trainer_state(Path(ckpt), tp=tp, pp=pp, seq=tokens.shape[1])
        loss = float(_mean_loss(_run_schedule(state, run, [batch], forward_only=True)))
        logits = after = None
        if pp == 1:
            logits = full_logits(state.inner[0], tokens)
            zero_lr_step(state)  # a step right after a weights-only load keeps the loaded weights
            after = full_logits(state.inner[0], tokens)
        out[tp, pp] = (logits, after, common["iteration"], loss)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_imported_model_matches_hf_at_tp1_tp2_and_pp2(case, tmp_path):
    hf = random_hf_model(seed=len(case), **CASES[case])
    hf.save_pretrained(tmp_path / "hf", max_shard_size=SHARD.get(case, "50GB"))
    g = torch.Generator().manual_seed(3)
    tokens, labels = (torch.randint(0, CASES[case]["vocab_size"], (2, SEQ), generator=g) for _ in range(2))
    ref = hf_logits(hf, tokens)
    ref_loss = float(F.cross_entropy(ref.reshape(-1, ref.shape[-1]), labels.reshape(-1)))

    [(rc, err)] = convert(["hf-to-megatron", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "ckpt"])
    assert rc == 0, err
    if case == "fused-sharded":
        assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    results = run_distributed(_trainer_outputs, world_size=2, args=(str(tmp_path / "ckpt"), tokens, labels),
                              timeout=180)
    for rank_result in results:
        for (tp, pp), (logits, after_step, saved_iteration, loss) in rank_result.items():
            assert saved_iteration == 0
            assert abs(loss - ref_loss) <= 1e-5, (tp, pp, loss, ref_loss)
            if logits is not None:
                torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0, msg=f"TP={tp}")
                torch.testing.assert_close(after_step, logits, atol=0, rtol=0, msg=f"TP={tp} after an lr=0 step")


def _bf16_step_keeps_weights(ckpt: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from pathlib import Path

    state, _, _ = trainer_state(Path(ckpt), tp=1, pp=1, seq=tokens.shape[1], bf16=True)
    tokens = tokens.cuda()
    before = full_logits(state.inner[0], tokens).float()
    zero_lr_step(state)
    return before, full_logits(state.inner[0], tokens).float()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 training (separate fp32 main params) needs a GPU")
def test_weights_only_load_refreshes_bf16_main_params(tmp_path):
    hf = random_hf_model(seed=8, **CASES["qk-rounding"])
    hf.save_pretrained(tmp_path / "hf")
    [(rc, err)] = convert(["hf-to-megatron", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "ckpt",
                           "--dtype", "bf16"])
    assert rc == 0, err
    tokens = torch.randint(0, CASES["qk-rounding"]["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(4))
    before, after = run_distributed(_bf16_step_keeps_weights, world_size=1, args=(str(tmp_path / "ckpt"), tokens),
                                    backend="nccl")[0]
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    torch.testing.assert_close(before, hf_logits(hf, tokens), atol=0.15, rtol=0.05)  # bf16 weights and activations


def test_config_mapping_follows_hf_fields():
    base = dict(model_type="xlstm", vocab_size=50, hidden_size=96, num_hidden_layers=3, num_heads=2)
    kwargs, vocab = model_kwargs_from_hf(base)
    assert vocab == 50 and kwargs["num_layers"] == 3 and kwargs["num_attention_heads"] == 2
    assert (kwargs["mlstm_qk_dim"], kwargs["mlstm_v_dim"]) == (48, 96)  # int(E * factor), not HF's rounded qk_dim
    assert kwargs["ffn_hidden_size"] == 256  # 2.667 * 96 = 256.03 -> HF rounding gives 256
    assert kwargs["mlstm_backward"] == "exact"  # HF's default kernel: chunkwise--native_autograd
    custbw, _ = model_kwargs_from_hf({**base, "chunkwise_kernel": "chunkwise--triton_xl_chunk", "norm_eps": 1e-5})
    assert custbw["mlstm_backward"] == "constant"
    assert custbw["layernorm_epsilon"] == custbw["head_norm_eps"] == 1e-5
    uncapped, _ = model_kwargs_from_hf({**base, "gate_soft_cap": None, "output_logit_soft_cap": None})
    assert uncapped["gate_soft_cap"] == uncapped["output_logit_soft_cap"] == 0.0


def test_converted_dir_is_a_train_config(tmp_path):
    """The run_config.yaml written next to the checkpoint keeps the HF vocabulary unpadded."""
    hf = random_hf_model(seed=5, vocab_size=40, hidden_size=64, num_hidden_layers=1, num_heads=2, chunk_size=8)
    hf.save_pretrained(tmp_path / "hf")
    [(rc, err)] = convert(["hf-to-megatron", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "ckpt",
                           "--dtype", "bf16"])
    assert rc == 0, err
    doc = yaml.safe_load((tmp_path / "ckpt" / "run_config.yaml").read_text())
    assert doc["train"] == {"vocab_size": 40, "make_vocab_size_divisible_by": 1}
    assert doc["model"]["xlstm_block"] == "large" and doc["model"]["hidden_size"] == 64
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial directory left
