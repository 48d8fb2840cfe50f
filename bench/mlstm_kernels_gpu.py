"""GPU fwd and fwd+bwd of the mLSTM cell at the TFLA setup: ours-Triton vs ours-torch vs mlstm_kernels TFLA vs SDPA.

A fixed number of tokens per call (default 65,536 = B * S) for every S; head configurations (NH, DQK, DV):
8 x (256, 512) (xLSTM 7B) and 16 x (128, 256). Implementations, all timed in this process on the same inputs:
  ours triton c<L>   mlstm_chunkwise_triton, backward="constant", chunk L (default 64 and 128); states recomputed in
                     backward (the default); "... kept" keeps them instead (--kept-states)
  ours torch         mlstm_chunkwise (pure torch), backward="constant", chunk 64
  tfla xl_chunk      mlstm_kernels chunkwise triton_xl_chunk (chunk 128), when installed and working
  sdpa flash         torch scaled_dot_product_attention, causal, flash backend, same NH, head dim DQK for q, k, v
Ratios are time / time of the first "ours triton" entry of the same shape. Every mLSTM row also records its output's
error against the fp32 torch chunkwise on the same inputs (a wrong kernel is a result too). Errors (OOM, missing
kernels) are recorded and the run goes on. Writes bench/results/mlstm_kernels_gpu.json (machine, versions, commit,
date, all rows).

    .venv/bin/python bench/mlstm_kernels_gpu.py                 # full sweep, bf16
    .venv/bin/python bench/mlstm_kernels_gpu.py --seq-lens 2048 8192 --reps 10
    .venv/bin/python bench/mlstm_kernels_gpu.py --dry-run       # print the plan (no GPU needed)
    TRITON_INTERPRET=1 .venv/bin/python bench/mlstm_kernels_gpu.py --smoke --device cpu --out /tmp/m.json
                                                                # tiny shapes through every code path (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run_env import device_times_ms, run_env, write_result  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_HEADS = ["8x256x512", "16x128x256"]
DEFAULT_SEQ_LENS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
SMOKE = {"tokens": 64, "seq_lens": [16, 32], "heads": ["2x16x32"], "chunks": [16], "warmup": 0, "reps": 1,
         "dtype": "fp16"}  # fp16: the interpreter's bf16 tl.dot is wrong

Impl = Callable[[list[torch.Tensor]], torch.Tensor]


def _impls(chunks: list[int], kept_states: bool, names: set[str] | None) -> dict[str, Impl]:
    """Name -> fn(inputs) -> output; inputs are [q, k, v, i, f]. Missing packages give an impl that raises."""
    impls: dict[str, Impl] = {}

    def ours_triton(chunk: int, recompute: bool) -> Impl:
        def run(ins):
            from xlstm_megatron.ops.mlstm.triton import mlstm_chunkwise_triton

            return mlstm_chunkwise_triton(*ins, chunk_size=chunk, backward="constant", recompute_states=recompute)

        return run

    for c in chunks:
        impls[f"ours triton c{c}"] = ours_triton(c, True)
        if kept_states:
            impls[f"ours triton c{c} kept"] = ours_triton(c, False)

    def ours_torch(ins):
        from xlstm_megatron.ops.mlstm import mlstm_chunkwise

        return mlstm_chunkwise(*ins, chunk_size=64, backward="constant")

    def tfla(ins):
        from mlstm_kernels.torch.chunkwise.triton_xl_chunk import mlstm_chunkwise__xl_chunk

        return mlstm_chunkwise__xl_chunk(*ins, chunk_size=128, autocast_kernel_dtype=ins[0].dtype)

    def sdpa(ins):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = ins
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    impls |= {"ours torch": ours_torch, "tfla xl_chunk": tfla, "sdpa flash": sdpa}
    return {n: f for n, f in impls.items() if names is None or n in names}


def _inputs(impl: str, shape: dict, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """The same q, k, v, i, f for every mLSTM implementation (q, k, v for SDPA) of a shape."""
    B, NH, S, DQK, DV = (shape[k] for k in ("B", "NH", "S", "DQK", "DV"))
    g = torch.Generator(device=device).manual_seed(0)
    if impl == "sdpa flash":
        shapes = [(B, NH, S, DQK)] * 3
    else:
        shapes = [(B, NH, S, DQK), (B, NH, S, DQK), (B, NH, S, DV), (B, NH, S), (B, NH, S)]
    ins = [torch.randn(s, generator=g, device=device, dtype=dtype) for s in shapes]
    if impl != "sdpa flash":
        ins[3], ins[4] = ins[3].float(), ins[4].float() + 3.0  # fp32 gates; forget-gate bias as initialised
    return [t.requires_grad_() for t in ins]


def _h_error(h: torch.Tensor, ins: list[torch.Tensor]) -> float:
    """max |h - h_ref| / max(1, max |h_ref|), h_ref: the fp32 torch chunkwise on the same inputs."""
    from xlstm_megatron.ops.mlstm import mlstm_chunkwise

    with torch.no_grad():
        ref = mlstm_chunkwise(*(t.detach().float() for t in ins), chunk_size=64)
        return ((h.float() - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


def bench_one(impl: str, fn: Impl, shape: dict, dtype: torch.dtype, device: str, warmup: int, reps: int) -> dict:
    row = {"impl": impl, **shape}
    ins = None
    try:
        ins = _inputs(impl, shape, dtype, device)
        h = fn(ins)
        if impl != "sdpa flash":
            row["h_err_vs_fp32_torch"] = _h_error(h, ins)
        dh = torch.randn_like(h)
        h = None

        def fwd():
            fn(ins)

        def fwd_bwd():
            for t in ins:
                t.grad = None
            fn(ins).backward(dh)

        cuda = device == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        fwd_ms = device_times_ms(fwd, warmup, reps, device)
        bwd_ms = device_times_ms(fwd_bwd, warmup, reps, device)
        row |= {
            "fwd_ms": statistics.median(fwd_ms),
            "fwd_bwd_ms": statistics.median(bwd_ms),
            "fwd_bwd_min_ms": min(bwd_ms),
            "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        }
        row["fwd_bwd_tokens_per_s"] = shape["B"] * shape["S"] / (row["fwd_bwd_ms"] / 1e3)
    except Exception as exc:  # noqa: BLE001 - a failing implementation is a result, not the end of the run
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    finally:
        ins = None  # free the inputs before the next implementation
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def _plan(args: argparse.Namespace) -> list[dict]:
    shapes = []
    for heads in args.heads:
        NH, DQK, DV = (int(x) for x in heads.split("x"))
        for S in args.seq_lens:
            if args.tokens % S:
                raise SystemExit(f"--tokens {args.tokens} is not a multiple of S={S}")
            shapes.append({"B": args.tokens // S, "NH": NH, "S": S, "DQK": DQK, "DV": DV})
    return shapes


def _print_rows(rows: list[dict]) -> None:
    print(f"{'NH':>3s} {'DQK':>4s} {'DV':>4s} {'B':>4s} {'S':>6s} {'implementation':22s} {'fwd ms':>8s} "
          f"{'fwd+bwd ms':>10s} {'tok/s':>9s} {'GiB':>6s} {'vs ours':>7s} {'h err':>8s}")
    for r in rows:
        head = f"{r['NH']:3d} {r['DQK']:4d} {r['DV']:4d} {r['B']:4d} {r['S']:6d} {r['impl']:22s}"
        if "error" in r:
            print(f"{head} error: {r['error']}")
            continue
        ratio = f"{r['ratio_vs_ours']:6.2f}x" if "ratio_vs_ours" in r else ""
        mem = f"{r['peak_mem_GiB']:6.2f}" if r["peak_mem_GiB"] is not None else "     -"
        err = f"{r['h_err_vs_fp32_torch']:8.1e}" if "h_err_vs_fp32_torch" in r else ""
        print(f"{head} {r['fwd_ms']:8.2f} {r['fwd_bwd_ms']:10.2f} {r['fwd_bwd_tokens_per_s']:9.3g} "
              f"{mem} {ratio:>7s} {err:>8s}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65536, help="B * S per call")
    p.add_argument("--seq-lens", type=int, nargs="+", default=DEFAULT_SEQ_LENS)
    p.add_argument("--heads", nargs="+", default=DEFAULT_HEADS, help="NHxDQKxDV head configurations")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--chunks", type=int, nargs="+", default=[64, 128], help="chunk sizes of ours-triton")
    p.add_argument("--kept-states", action="store_true", help="also time ours-triton keeping the chunk states")
    p.add_argument("--impls", nargs="+", default=None, help="subset of implementation names (default: all)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mlstm_kernels_gpu.json")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: only with --smoke (Triton rows need TRITON_INTERPRET=1 there)")
    p.add_argument("--smoke", action="store_true", help=f"tiny plan {SMOKE} through every code path")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the environment, run nothing")
    args = p.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    elif args.device == "cpu":
        raise SystemExit("--device cpu is for --smoke runs only; GPU timings need --device cuda")

    shapes = _plan(args)
    impls = _impls(args.chunks, args.kept_states, None if args.impls is None else set(args.impls))
    env = run_env()
    if args.dry_run:
        print(json.dumps(env, indent=2))
        print(f"dtype {args.dtype}, {args.tokens} tokens per call, warmup {args.warmup}, reps {args.reps}")
        print(f"implementations: {', '.join(impls)}")
        for s in shapes:
            print(f"  NH {s['NH']:3d} DQK {s['DQK']:4d} DV {s['DV']:4d}  B {s['B']:4d} S {s['S']:6d}")
        print(f"{len(shapes) * len(impls)} measurements; results would go to {args.out}")
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (use --dry-run to see the plan)")

    dtype, rows = DTYPES[args.dtype], []
    result = {"machine": env, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "rows": rows}
    for shape in shapes:
        block = [bench_one(name, fn, shape, dtype, args.device, args.warmup, args.reps) for name, fn in impls.items()]
        base = next((r for r in block if r["impl"].startswith("ours triton") and "error" not in r), None)
        for r in block:
            if base is not None and "error" not in r:
                r["ratio_vs_ours"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
        rows += block
        _print_rows(block)
        write_result(args.out, result)  # after every shape: a cut-off run keeps its rows
    print(f"\nall rows (dtype {args.dtype}, median of {args.reps}; vs ours = fwd+bwd time / first ours-triton; "
          f"h err = max |h - fp32 torch| / max(1, max |h|))")
    _print_rows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
