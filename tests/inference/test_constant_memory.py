"""Generation memory does not grow with the number of generated tokens: 16 vs 1024 new tokens in a fresh process."""

from __future__ import annotations

import resource
import time

from tests.megatron.dist import run_distributed
from tests.models.helpers import build_model, randomize_tp_invariant, tiny_config

CFG = dict(num_layers=3, hidden_size=32, num_attention_heads=2, slstm_num_heads=2, xlstm_pattern="msm",
           mlstm_chunk_size=4)
PROMPTS = [[1, 2, 3, 4, 5], [6, 7]]


def _expected_state_bytes(config, batch: int) -> int:
    """fp32 states of the v1 stack (TP=1): mLSTM conv + (C, n, m); sLSTM conv + (y, c, n, m)."""
    K, E = config.conv_kernel_size, config.hidden_size
    inner, nh = config.mlstm_inner_size, config.num_attention_heads
    dh = inner // nh
    per_layer = {
        "m": (K - 1) * inner + nh * dh * dh + nh * dh + nh,
        "s": (K - 1) * E + 4 * E,
    }
    return 4 * batch * sum(per_layer[s] for s in config.layer_pattern)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _measure() -> dict:
    from xlstm_megatron.inference import generate

    config = tiny_config("v1", **CFG)
    model = build_model(config, 64, 16)
    randomize_tp_invariant(model, seed=2)
    out = {"expected": _expected_state_bytes(config, len(PROMPTS))}
    for n in (16, 1024):
        start = time.perf_counter()
        result = generate(model, PROMPTS, n, temperature=1.0, seed=0)
        out[n] = dict(
            state_nbytes=result.state_nbytes, tokens=sum(map(len, result.tokens)), seconds=time.perf_counter() - start,
            rss=_rss_bytes(), peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        )
    return out


def test_state_size_and_rss_do_not_grow_with_generated_tokens():
    (out,) = run_distributed(_measure, world_size=1, timeout=240)
    short, long = out[16], out[1024]
    print(
        f"\nstate: {short['state_nbytes']} B after 16 tokens, {long['state_nbytes']} B after 1024 "
        f"(expected {out['expected']} B); "
        f"peak RSS {short['peak_rss'] / 2**20:.1f} -> {long['peak_rss'] / 2**20:.1f} MiB, "
        f"RSS {short['rss'] / 2**20:.1f} -> {long['rss'] / 2**20:.1f} MiB; "
        f"{long['tokens'] / long['seconds']:.0f} tokens/s at batch {len(PROMPTS)}"
    )
    assert short["tokens"] == 16 * len(PROMPTS) and long["tokens"] == 1024 * len(PROMPTS)
    assert short["state_nbytes"] == long["state_nbytes"] == out["expected"]
    # A cache growing per token would add >= 1008 steps x (state of a few KiB or activations): tens of MiB.
    assert long["peak_rss"] - short["peak_rss"] < 8 * 2**20
