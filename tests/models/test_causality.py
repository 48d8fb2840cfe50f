"""Every layer kind is causal: changing token t changes no logit before t (and does change logits at t)."""

from __future__ import annotations

import pytest
import torch

from tests.megatron.dist import run_distributed
from tests.models.helpers import build_model, randomize_tp_invariant, tiny_config


def _prefix_and_suffix_change(block: str, cfg: dict, t: int):
    model = build_model(tiny_config(block, **cfg), 50, 12)
    randomize_tp_invariant(model, seed=1, std=0.2)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % 50
    with torch.no_grad():
        a, b = model(tokens, None, None), model(changed, None, None)
    return (a[:, :t] - b[:, :t]).abs().max().item(), (a[:, t:] - b[:, t:]).abs().max().item()


@pytest.mark.parametrize("block,cfg", [
    ("large", dict(num_layers=2, hidden_size=32, num_attention_heads=2, mlstm_chunk_size=4)),
    ("v1", dict(num_layers=3, hidden_size=64, num_attention_heads=4, slstm_num_heads=2, xlstm_pattern="m*s",
                mlstm_chunk_size=4)),
], ids=["large", "v1-with-attention"])
def test_causal(block, cfg):
    before, after = run_distributed(_prefix_and_suffix_change, world_size=1, args=(block, cfg, 7))[0]
    assert before == 0.0 and after > 1e-3


def _mixer_refusals() -> list[str]:
    from megatron.core.packed_seq_params import PackedSeqParams

    model = build_model(tiny_config("v1", num_layers=2, hidden_size=32, num_attention_heads=2, slstm_num_heads=2,
                                    xlstm_pattern="ms", mlstm_chunk_size=4), 50, 8)
    x = torch.zeros(8, 2, 32)
    offsets = torch.tensor([0, 4, 8], dtype=torch.int32)
    cases = [dict(packed_seq_params=PackedSeqParams(qkv_format="sbhd")),
             dict(packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=offsets)),  # 2 rows: not THD
             dict(attention_mask=torch.zeros(2, 1, 8, 8)),  # float: not Megatron's bool mask
             dict(attention_bias=torch.zeros(1)), dict(rotary_pos_emb=torch.zeros(1)), dict(not_an_attention_input=1)]
    seen = []
    for layer in model.decoder.layers:
        mixer = layer.self_attention
        mixer(x, attention_mask=None, sequence_len_offset=None)  # what a plain causal step passes: accepted
        for kwargs in cases:
            with pytest.raises((ValueError, TypeError)) as error:
                mixer(x, **kwargs)
            seen.append(str(error.value))
    return seen


def test_mixers_refuse_what_they_cannot_honour():
    """Packed inputs the mixers cannot read, attention biases and rotary embeddings would change the result: one line
    each, never silently ignored (mLSTM and sLSTM mixers)."""
    seen = run_distributed(_mixer_refusals, world_size=1)[0]
    assert len(seen) == 12 and all("\n" not in s for s in seen)
    assert sum("in the 'thd' format" in s for s in seen) == 2 and sum("come as one row" in s for s in seen) == 2
    assert sum("bool attention mask" in s for s in seen) == 2 and sum("unexpected arguments" in s for s in seen) == 2
