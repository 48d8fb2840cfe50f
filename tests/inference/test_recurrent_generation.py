"""Recurrent generation equals the full-sequence forward: step by step, prefill + steps, greedy decoding, TP=1 and 2."""

from __future__ import annotations

import pytest
import torch

from tests.megatron.dist import reinit_model_parallel, run_distributed
from tests.models.helpers import build_model, randomize_tp_invariant, tiny_config

CASES = {
    "large": ("large", dict(num_layers=2, hidden_size=32, num_attention_heads=2, mlstm_chunk_size=4)),
    "v1": ("v1", dict(num_layers=3, hidden_size=32, num_attention_heads=2, slstm_num_heads=2, xlstm_pattern="msm",
                      mlstm_chunk_size=4)),
}
VOCAB, S = 64, 11


def _model(block: str, cfg_kwargs: dict):
    model = build_model(tiny_config(block, **cfg_kwargs), VOCAB, S)
    randomize_tp_invariant(model, seed=11)
    return model.eval()


def _full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(model(tokens, None, None))


def _pieces_logits(model, tokens: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Logits of `tokens` fed through one RecurrentInferenceContext in consecutive pieces of the given lengths."""
    from xlstm_megatron.inference import RecurrentInferenceContext

    context, out, start = RecurrentInferenceContext(), [], 0
    with torch.no_grad():
        for n in pieces:
            out.append(model(tokens[:, start : start + n], None, None, inference_context=context,
                             runtime_gather_output=True))
            start += n
    assert start == tokens.shape[1]
    return torch.cat(out, dim=1)


def _parity(block: str, cfg_kwargs: dict, tokens: torch.Tensor, prompts: list[list[int]]) -> dict:
    from xlstm_megatron.inference import generate

    results = {}
    for tp in (2, 1):
        reinit_model_parallel(tp=tp)
        model = _model(block, cfg_kwargs)
        full = _full_logits(model, tokens)
        results[tp] = dict(
            full=full,
            steps=_pieces_logits(model, tokens, [1] * S),
            prefill_steps=_pieces_logits(model, tokens, [5, 1, 1, 1, 1, 1, 1]),
            prefill_pieces=_pieces_logits(model, tokens, [3, 6, 2]),
            greedy=generate(model, prompts, 6, temperature=0).tokens,
        )
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_recurrent_paths_equal_full_forward_tp1_tp2(case):
    block, cfg = CASES[case]
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (2, S), generator=g)
    prompts = [tokens[0, :4].tolist(), tokens[1, :7].tolist(), tokens[1, :4].tolist()]
    for result in run_distributed(_parity, world_size=2, tp=2, args=(block, cfg, tokens, prompts), timeout=240):
        for tp, r in result.items():
            assert r["full"].abs().max() > 0.1  # the comparison is not between near-zero logits
            for name in ("steps", "prefill_steps", "prefill_pieces"):
                torch.testing.assert_close(r[name], r["full"], atol=1e-5, rtol=1e-5, msg=f"TP={tp} {name}")
        torch.testing.assert_close(result[2]["full"], result[1]["full"], atol=1e-4, rtol=1e-4)
        assert result[2]["greedy"] == result[1]["greedy"]


def _generation_checks(block: str, cfg_kwargs: dict, prompts: list[list[int]]) -> dict:
    from xlstm_megatron.inference import generate

    model = _model(block, cfg_kwargs)
    out = {"greedy": generate(model, prompts, 8, temperature=0, return_logits=True)}
    # greedy against argmax of a full forward over prompt + tokens generated so far, for every step
    refs = []
    for prompt, new in zip(prompts, out["greedy"].tokens, strict=True):
        seq = torch.tensor([prompt + new])
        full = _full_logits(model, seq)[0, len(prompt) - 1 : -1]
        refs.append(full)
    out["full"] = refs
    out["top_k1"] = generate(model, prompts, 8, temperature=0.7, top_k=1, seed=3).tokens
    out["sampled"] = [generate(model, prompts, 8, temperature=1.5, top_p=0.9, seed=s).tokens for s in (1, 1, 2)]
    stop = out["greedy"].tokens[1][2]  # the third token of prompt 1: that prompt stops there
    out["stop"], out["stop_token"] = generate(model, prompts, 8, temperature=0, stop_tokens=[stop]).tokens, stop
    out["limited"] = generate(model, prompts, 8, temperature=1.0, vocab_limit=5, seed=4).tokens
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_sampling_and_stop_tokens(case):
    block, cfg = CASES[case]
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13]]  # different lengths, two of equal length
    (out,) = run_distributed(_generation_checks, world_size=1, args=(block, cfg, prompts), timeout=240)
    greedy = out["greedy"]
    for tokens, logits, full in zip(greedy.tokens, greedy.logits, out["full"], strict=True):
        assert len(tokens) == 8
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
        assert tokens == full.argmax(-1).tolist()
    assert out["top_k1"] == greedy.tokens
    same_a, same_b, other = out["sampled"]
    assert same_a == same_b and same_a != other
    assert same_a != greedy.tokens
    stop = out["stop_token"]
    for tokens, full_run in zip(out["stop"], greedy.tokens, strict=True):
        end = full_run.index(stop) + 1 if stop in full_run else len(full_run)
        assert tokens == full_run[:end]  # stops right after the stop token; other rows unaffected
    assert len(out["stop"][1]) <= 3
    assert all(0 <= t < 5 for tokens in out["limited"] for t in tokens)


def _refusals() -> list[str]:
    from xlstm_megatron.inference import generate

    messages = []
    for kwargs in (dict(xlstm_pattern="m*"), dict(xlstm_pattern="mm")):
        model = build_model(tiny_config("large", num_layers=2, hidden_size=32, num_attention_heads=2, **kwargs),
                            VOCAB, S)
        if kwargs["xlstm_pattern"] == "mm":
            model.config.sequence_parallel, model.config.tensor_model_parallel_size = True, 2  # as a TP+SP model
        try:
            generate(model, [[1, 2]], 2)
        except ValueError as e:
            messages.append(str(e))
    from megatron.core.inference.contexts import StaticInferenceContext

    try:
        model(torch.tensor([[1, 2]]), None, None, inference_context=StaticInferenceContext(1, 8))
    except NotImplementedError as e:
        messages.append(str(e))
    return messages


def test_unsupported_layouts_fail_with_one_clear_error():
    (messages,) = run_distributed(_refusals, world_size=1, timeout=120)
    assert len(messages) == 3
    assert "attention layers ('*')" in messages[0]
    assert "sequence_parallel=False" in messages[1]
    assert "RecurrentInferenceContext" in messages[2]
