"""Hugging Face xLSTM -> our Megatron checkpoint: the model its saved args define loads it at TP=1, TP=2 and PP=2 and
computes HF's logits and loss (through Megatron's pipeline schedule)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.convert.hf_models import checkpoint_model, convert, full_logits, hf_logits, random_hf_model, schedule_loss
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


def _loaded_outputs(ckpt: str, tokens: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per layout (TP, PP): logits (PP=1 only), the saved iteration and the mean loss (last stage; None elsewhere)."""
    from pathlib import Path

    out = {}
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        model, common = checkpoint_model(Path(ckpt), tp=tp, pp=pp)
        logits = full_logits(model, tokens) if pp == 1 else None
        out[tp, pp] = (logits, common["iteration"], schedule_loss(model, tokens, labels))
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
    results = run_distributed(_loaded_outputs, world_size=2, args=(str(tmp_path / "ckpt"), tokens, labels),
                              timeout=180)
    for rank, rank_result in enumerate(results):
        for (tp, pp), (logits, saved_iteration, loss) in rank_result.items():
            assert saved_iteration == 0
            if pp == 1 or rank == 1:  # with PP=2 the loss exists on the last stage (rank 1)
                assert loss is not None and abs(loss - ref_loss) <= 1e-5, (tp, pp, loss, ref_loss)
            if logits is not None:
                torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0, msg=f"TP={tp}")


def _bf16_logits(ckpt: str, tokens: torch.Tensor) -> torch.Tensor:
    from pathlib import Path

    from megatron.core.transformer.module import Float16Module

    model, _ = checkpoint_model(Path(ckpt))
    assert next(model.parameters()).dtype == torch.bfloat16  # the saved args say --bf16
    model = Float16Module(model.config, model.cuda())
    return full_logits(model, tokens.cuda()).float()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 matmuls of the model need a GPU")
def test_bf16_checkpoint_computes_hf_logits(tmp_path):
    hf = random_hf_model(seed=8, **CASES["qk-rounding"])
    hf.save_pretrained(tmp_path / "hf")
    [(rc, err)] = convert(["hf-to-megatron", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "ckpt",
                           "--dtype", "bf16"])
    assert rc == 0, err
    tokens = torch.randint(0, CASES["qk-rounding"]["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(4))
    logits = run_distributed(_bf16_logits, world_size=1, args=(str(tmp_path / "ckpt"), tokens), backend="nccl")[0]
    torch.testing.assert_close(logits, hf_logits(hf, tokens), atol=0.15, rtol=0.05)  # bf16 weights and activations


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


def _saved_args(ckpt: str) -> dict:
    from xlstm_megatron.runs.checkpoint import architecture, resolve_checkpoint_dir, saved_args

    args = saved_args(resolve_checkpoint_dir(ckpt))
    return {"arch": architecture(args), "bf16": args.bf16, "vocab_size": args.vocab_size,
            "seq_length": args.seq_length, "no_save_optim": args.no_save_optim}


def test_converted_dir_is_a_megatron_checkpoint_with_the_hf_vocab(tmp_path):
    """The checkpoint's saved args record the architecture, the HF vocabulary unpadded, and no optimizer state."""
    hf = random_hf_model(seed=5, vocab_size=40, hidden_size=64, num_hidden_layers=1, num_heads=2, chunk_size=8)
    hf.save_pretrained(tmp_path / "hf")
    [(rc, err)] = convert(["hf-to-megatron", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "ckpt",
                           "--dtype", "bf16"])
    assert rc == 0, err
    saved = _saved_args(str(tmp_path / "ckpt"))
    assert saved["arch"]["padded_vocab_size"] == saved["vocab_size"] == 40
    assert saved["arch"]["xlstm_block"] == "large" and saved["arch"]["hidden_size"] == 64
    assert saved["arch"]["normalization"] == "RMSNorm" and saved["arch"]["untie_embeddings_and_output_weights"]
    assert saved["bf16"] and saved["no_save_optim"]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial directory left
