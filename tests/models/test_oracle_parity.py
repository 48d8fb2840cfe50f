"""Our Megatron models with weights mapped from the official `xlstm` package equal the official logits (TP=1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.megatron.dist import run_distributed
from tests.models.helpers import build_model, official_v1_model, tiny_config
from xlstm_megatron.convert.official import large_to_megatron, v1_to_megatron


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (also in norms and biases that init to constants), so no mapping error hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _our_logits_and_loss(block: str, cfg_kwargs: dict, vocab: int, state: dict, tokens, labels):
    cfg = tiny_config(block, **cfg_kwargs)
    model = build_model(cfg, vocab, tokens.shape[1])
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(tokens, None, None)
        loss = model(tokens, None, None, labels=labels)
    return logits, loss


LARGE_CASES = [
    # (E, NH, blocks, S, vocab, our chunk, oracle chunk): the oracle needs S % chunk == 0, ours does not
    (64, 4, 2, 24, 97, 8, 8),
    (96, 2, 3, 32, 50, 12, 16),
    (32, 1, 1, 8, 31, 3, 4),
]


@pytest.mark.parametrize("E,NH,L,S,V,chunk,oracle_chunk", LARGE_CASES)
def test_large_matches_official_xlstm_large(E, NH, L, S, V, chunk, oracle_chunk):
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    torch.manual_seed(E + S)
    official = xLSTMLarge(xLSTMLargeConfig(
        embedding_dim=E, num_heads=NH, num_blocks=L, vocab_size=V, return_last_states=True, mode="train",
        chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
        step_kernel="native", autocast_kernel_dtype="float32", chunk_size=oracle_chunk,
    ))
    _randomize(official, seed=E * 7 + L)
    tokens = torch.randint(0, V, (2, S))
    labels = torch.randint(0, V, (2, S))
    with torch.no_grad():
        ref_logits = official(tokens)
    ref_logits = ref_logits[0] if isinstance(ref_logits, tuple) else ref_logits
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, V), labels.reshape(-1), reduction="none").reshape(2, S)

    state = large_to_megatron(official.state_dict(), L)
    cfg = dict(num_layers=L, hidden_size=E, num_attention_heads=NH, mlstm_chunk_size=chunk, mlstm_backward="exact")
    logits, loss = run_distributed(
        _our_logits_and_loss, world_size=1, args=("large", cfg, V, state, tokens, labels)
    )[0]
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)


V1_CASES = [
    # (E, NH mLSTM, NH sLSTM, pattern, S, vocab)
    (64, 4, 4, "msm", 20, 61),
    (32, 2, 2, "sm", 13, 40),
    (64, 1, 2, "mms", 9, 33),
]


@pytest.mark.parametrize("E,NHm,NHs,pattern,S,V", V1_CASES)
def test_v1_stack_matches_official_xlstm(E, NHm, NHs, pattern, S, V):
    torch.manual_seed(E + S)
    official, _ = official_v1_model(E, NHm, NHs, pattern, S, V)
    _randomize(official, seed=E + len(pattern))
    tokens = torch.randint(0, V, (2, S))
    labels = torch.randint(0, V, (2, S))
    with torch.no_grad():
        ref_logits = official(tokens)
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, V), labels.reshape(-1), reduction="none").reshape(2, S)

    state = v1_to_megatron(official.state_dict(), pattern, NHm, NHs)
    cfg = dict(num_layers=len(pattern), hidden_size=E, num_attention_heads=NHm, slstm_num_heads=NHs,
               xlstm_pattern=pattern, mlstm_chunk_size=8)
    logits, loss = run_distributed(_our_logits_and_loss, world_size=1, args=("v1", cfg, V, state, tokens, labels))[0]
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
