"""Inference cost against context length: prefill time and per-token decode time, xLSTM against the Transformer.

Both models are built from Megatron arguments through `runs.model` (one gloo rank, Megatron's parallel state), with
the same width, depth and heads:

    xLSTM        xLSTM-Large blocks (all mLSTM); decode carries a fixed-size recurrent state
                 (`RecurrentInferenceContext`, as `xlstm-megatron generate` does): constant cost per token
    Transformer  the `--model-family transformer` baseline (Megatron's GPTModel, RoPE); decode uses Megatron's own
                 static KV cache (`StaticInferenceContext`), which runs on CPU with the project's CPU shims: the
                 cost per token grows with the context it attends to

For each context length S: prefill = one forward over S prompt tokens (all logits materialised, batch 1); decode =
`--decode-steps` one-token forwards after that prefill and one untimed step, median ms per token. Each family's
first length is also checked: the decoded logits equal a full forward's over prompt + decoded tokens. Writes the
JSON result (`bench/run_env.py`), a CSV and a PNG (log-log curves) next to it, and prints one line per point.

    python bench/inference_cost.py                          # writes bench/results/inference_cost.{json,csv,png}
    python bench/inference_cost.py --micro --out /tmp/ic.json
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run_env import device_times_ms, run_env, write_result  # noqa: E402

FAMILIES = {
    "xLSTM": ["--xlstm-block", "large"],
    "Transformer": ["--model-family", "transformer", "--no-rope-fusion"],
}


def _model(family: str, plan: dict[str, Any]) -> torch.nn.Module:
    from xlstm_megatron.runs.args import megatron_args
    from xlstm_megatron.runs.model import build_xlstm_model

    flags = [*FAMILIES[family], "--num-layers", str(plan["layers"]), "--hidden-size", str(plan["hidden"]),
             "--num-attention-heads", str(plan["heads"]), "--seq-length", str(plan["train_length"]),
             "--max-position-embeddings", str(plan["train_length"]), "--micro-batch-size", "1",
             "--tokenizer-type", "NullTokenizer", "--vocab-size", str(plan["vocab"]), "--transformer-impl", "local"]
    if family == "xLSTM":
        flags += ["--mlstm-chunk-size", str(plan["chunk"])]
    args = megatron_args(flags)
    args.padded_vocab_size = plan["vocab"]
    return build_xlstm_model(args).eval()


def _context(family: str, max_length: int):
    from megatron.core.inference.contexts.static_context import StaticInferenceContext

    from xlstm_megatron.layers.recurrent_context import RecurrentInferenceContext

    return RecurrentInferenceContext() if family == "xLSTM" else StaticInferenceContext(1, max_length)


def _step(model: torch.nn.Module, context, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of `tokens` (1, n) continuing from `context` (positions from its offset: RoPE needs them)."""
    offset = context.sequence_len_offset
    positions = torch.arange(offset, offset + tokens.shape[1])[None]
    logits = model(tokens, positions, None, inference_context=context)
    context.sequence_len_offset += tokens.shape[1]
    return logits


def _state_nbytes(family: str, context) -> int:
    if family == "xLSTM":
        return context.nbytes()
    return sum(t.numel() * t.element_size() for kv in context.key_value_memory_dict.values() for t in kv
               if torch.is_tensor(t))


@torch.no_grad()
def _decode_check(family: str, model: torch.nn.Module, tokens: torch.Tensor, prompt_length: int) -> float:
    """Max |logit difference| of prefill + step-by-step decode against one full forward over the same tokens."""
    prompt = tokens[:, :prompt_length]
    full = model(tokens, None, None).float()
    context = _context(family, tokens.shape[1])
    _step(model, context, prompt)
    decoded = torch.cat([_step(model, context, tokens[:, t : t + 1])[:, -1:].float()
                         for t in range(prompt.shape[1], tokens.shape[1])], dim=1)
    return float((decoded - full[:, prompt.shape[1]:]).abs().max())


@torch.no_grad()
def measure(family: str, plan: dict[str, Any], warmup: int, reps: int) -> list[dict[str, Any]]:
    from xlstm_megatron.compat import model_parallel_manual_seed

    model_parallel_manual_seed(1234)
    model = _model(family, plan)
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    steps = plan["decode_steps"]
    rows = []
    for S in plan["lengths"]:
        prompt = torch.randint(0, plan["vocab"], (1, S), generator=g)
        step_tokens = torch.randint(0, plan["vocab"], (1, steps + 1), generator=g)
        prefill_ms = statistics.median(device_times_ms(
            lambda prompt=prompt, S=S: _step(model, _context(family, S + steps + 1), prompt), warmup, reps, "cpu"))
        decode_ms = []
        for _ in range(reps):
            context = _context(family, S + steps + 1)
            _step(model, context, prompt)
            _step(model, context, step_tokens[:, :1])  # untimed: a first step pays one-time costs
            for t in range(1, steps + 1):
                token = step_tokens[:, t : t + 1]
                decode_ms += device_times_ms(lambda c=context, x=token: _step(model, c, x), 0, 1, "cpu")
        row = dict(family=family, context=S, prefill_ms=round(prefill_ms, 3),
                   prefill_tokens_per_s=round(S / prefill_ms * 1e3, 1),
                   decode_ms_per_token=round(statistics.median(decode_ms), 3),
                   state_bytes=_state_nbytes(family, context), params=params)
        if plan["lengths"][0] == S:  # correctness, once per family
            tokens = torch.cat([prompt, step_tokens[:, :4]], dim=1)
            row["decode_max_abs_err_vs_full_forward"] = _decode_check(family, model, tokens, S)
        rows.append(row)
        print(f"{family:11s} S={S:6d}  prefill {prefill_ms:9.1f} ms ({row['prefill_tokens_per_s']:8.0f} tok/s)  "
              f"decode {row['decode_ms_per_token']:7.2f} ms/token  state {row['state_bytes'] / 2**10:9.1f} KiB",
              flush=True)
    return rows


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Curves' shape, measured in this run: growth of each family's costs from the shortest to the longest context,
    and the Transformer / xLSTM ratio at every length."""
    by = {(r["family"], r["context"]): r for r in rows}
    lengths = sorted({r["context"] for r in rows})
    lo, hi = lengths[0], lengths[-1]
    out: dict[str, Any] = {"context_growth": hi / lo}
    for family in FAMILIES:
        for key in ("prefill_ms", "decode_ms_per_token", "state_bytes"):
            out[f"{family} {key} growth"] = round(by[(family, hi)][key] / by[(family, lo)][key], 3)
    for key in ("prefill_ms", "decode_ms_per_token"):
        out[f"Transformer/xLSTM {key}"] = {S: round(by[("Transformer", S)][key] / by[("xLSTM", S)][key], 3)
                                           for S in lengths}
    return out


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    fields = ["family", "context", "prefill_ms", "prefill_tokens_per_s", "decode_ms_per_token", "state_bytes", "params"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, label in zip(axes, ("prefill_ms", "decode_ms_per_token", "state_bytes"),
                              ("prefill time (ms)", "decode time per token (ms)", "inference state (bytes)"),
                              strict=True):
        for family in FAMILIES:
            points = [(r["context"], r[key]) for r in rows if r["family"] == family]
            ax.plot(*zip(*points, strict=True), "o-", label=family)
        ax.set_xscale("log")
        ax.set_yscale("log")
        lengths = sorted({r["context"] for r in rows})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _init_single_rank() -> None:
    from xlstm_megatron.runs.launch import init_parallel

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    init_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", action="store_true", help="micro config and lengths (a test's: seconds)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="context lengths")
    parser.add_argument("--decode-steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "inference_cost.json")
    a = parser.parse_args()
    if a.micro:
        plan = dict(layers=2, hidden=32, heads=2, vocab=64, chunk=8, train_length=16, lengths=[16, 64],
                    decode_steps=3)
        warmup, reps = 0, 1
    else:
        plan = dict(layers=4, hidden=128, heads=4, vocab=512, chunk=64, train_length=256,
                    lengths=[256, 512, 1024, 2048, 4096], decode_steps=16)
        warmup, reps = 1, 2
    plan["lengths"] = a.lengths or plan["lengths"]
    plan["decode_steps"] = a.decode_steps or plan["decode_steps"]
    _init_single_rank()
    torch.set_num_threads(a.threads)  # after init_parallel, which sizes threads to the machine
    rows = [row for family in FAMILIES for row in measure(family, plan, warmup, reps)]
    result = {"bench": "inference_cost", "env": run_env(), "plan": plan, "dtype": "float32",
              "transformer_decode": "Megatron StaticInferenceContext (KV cache)",
              "xlstm_decode": "RecurrentInferenceContext (fixed-size state)",
              "note": "batch 1, CPU wall clock; prefill: median forward over the context; decode: median ms of "
                      "one-token steps after that prefill",
              "rows": rows, "ratios": ratios(rows), "load_average_after_run": os.getloadavg()}
    write_result(a.out, result)
    write_csv(rows, a.out.with_suffix(".csv"))
    plot(rows, a.out.with_suffix(".png"), f"inference cost: {plan['layers']} layers, E {plan['hidden']}, CPU "
                                          f"{a.threads} threads")
    for key, value in result["ratios"].items():
        print(f"{key}: {value}")
    print(f"wrote {a.out} (+ .csv, .png)")


if __name__ == "__main__":
    main()
