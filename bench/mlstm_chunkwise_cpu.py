"""CPU fwd+bwd of the chunkwise mLSTM cell: ours (both backward semantics) vs mlstm_kernels' native chunkwise.

(a) One shape, all four implementations timed interleaved in this process on the same data; ratio = theirs / ours.
(b) Our chunkwise fwd+bwd vs sequence length: time, bytes saved for backward (saved_tensors_hooks) and the peak RSS
    growth of one fwd+bwd measured in a fresh subprocess per point, to show linear memory.
Writes bench/results/mlstm_chunkwise_cpu.json.

    .venv/bin/python bench/mlstm_chunkwise_cpu.py            # B1 NH4 S2048 DQK64 DV128; S 512 .. 32768
    .venv/bin/python bench/mlstm_chunkwise_cpu.py --quick    # small shapes, few repeats (smoke test)
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlstm_kernels.torch.chunkwise.native import (  # noqa: E402
    mlstm_chunkwise__native_autograd,
    mlstm_chunkwise__native_custbw,
)

from bench.run_env import run_env, write_result  # noqa: E402
from xlstm_megatron.ops.mlstm import mlstm_chunkwise  # noqa: E402

IMPLS: dict[str, Callable] = {
    "ours exact": lambda q, k, v, i, f, L: mlstm_chunkwise(q, k, v, i, f, chunk_size=L, backward="exact"),
    "ours constant": lambda q, k, v, i, f, L: mlstm_chunkwise(q, k, v, i, f, chunk_size=L, backward="constant"),
    "mlstm_kernels native_custbw": lambda q, k, v, i, f, L: mlstm_chunkwise__native_custbw(q, k, v, i, f, chunk_size=L),
    "mlstm_kernels native_autograd": lambda q, k, v, i, f, L: mlstm_chunkwise__native_autograd(
        q, k, v, i, f, chunk_size=L
    ),
}
# ours vs its counterpart in semantics
BASELINE_OF = {"ours exact": "mlstm_kernels native_autograd", "ours constant": "mlstm_kernels native_custbw"}


def _inputs(B: int, NH: int, S: int, DQK: int, DV: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, NH, S, DQK), (B, NH, S, DQK), (B, NH, S, DV), (B, NH, S), (B, NH, S)]
    ins = [torch.randn(s, generator=g) for s in shapes]
    ins[4] += 3.0  # forget-gate bias as initialised in xLSTM
    return [t.requires_grad_() for t in ins]


def _fwd_bwd(impl: Callable, ins: list[torch.Tensor], dh: torch.Tensor, chunk: int) -> None:
    for t in ins:
        t.grad = None
    impl(*ins, chunk).backward(dh)


def bench_impls(B: int, NH: int, S: int, DQK: int, DV: int, chunk: int, repeats: int) -> dict:
    ins = _inputs(B, NH, S, DQK, DV)
    dh = torch.randn(B, NH, S, DV)
    times: dict[str, list[float]] = {name: [] for name in IMPLS}
    for impl in IMPLS.values():  # warm-up
        _fwd_bwd(impl, ins, dh, chunk)
    for _ in range(repeats):  # interleaved, so that load changes hit all implementations alike
        for name, impl in IMPLS.items():
            t0 = time.perf_counter()
            _fwd_bwd(impl, ins, dh, chunk)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    rows = {name: {"median_ms": 1e3 * med[name], "min_ms": 1e3 * best[name]} for name in IMPLS}
    for name, base in BASELINE_OF.items():  # ratio baseline / ours, from medians and from minima
        rows[name] |= {"baseline": base, "speedup_median": med[base] / med[name]}
        rows[name] |= {"speedup_min": best[base] / best[name]}
    return {"shape": {"B": B, "NH": NH, "S": S, "DQK": DQK, "DV": DV, "chunk_size": chunk}, "repeats": repeats} | {
        "results": rows
    }


def _saved_bytes(ins: list[torch.Tensor], chunk: int, backward: str) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlstm_chunkwise(*ins, chunk_size=chunk, backward=backward)
    return total


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _child_peak_rss(args: argparse.Namespace, S: int, backward: str) -> float:
    """Peak RSS growth (MiB) of one fwd+bwd, in a fresh interpreter so that earlier allocations do not mask it."""
    flags = {"--B": args.B, "--NH": args.NH, "--DQK": args.DQK, "--DV": args.DV, "--chunk": args.chunk}
    cmd = [sys.executable, __file__, "--rss-child", str(S), backward, "--threads", str(args.threads)]
    cmd += [str(x) for item in flags.items() for x in item]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def rss_child(args: argparse.Namespace) -> None:
    S, backward = int(args.rss_child[0]), args.rss_child[1]
    ins = _inputs(args.B, args.NH, S, args.DQK, args.DV)
    dh = torch.randn(args.B, args.NH, S, args.DV)
    mlstm_chunkwise(*(t[:, :, :64] for t in ins), chunk_size=args.chunk, backward=backward)  # allocator warm-up
    before = _rss_kib()
    mlstm_chunkwise(*ins, chunk_size=args.chunk, backward=backward).backward(dh)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print((peak - before) / 1024)


def bench_lengths(args: argparse.Namespace) -> list[dict]:
    rows = []
    for S in args.seq_lens:
        ins = _inputs(args.B, args.NH, S, args.DQK, args.DV)
        dh = torch.randn(args.B, args.NH, S, args.DV)
        input_bytes = sum(t.numel() * t.element_size() for t in ins)
        row = {"S": S, "input_MiB": input_bytes / 2**20}
        for backward in ("exact", "constant"):
            impl = IMPLS[f"ours {backward}"]
            _fwd_bwd(impl, ins, dh, args.chunk)
            ts = []
            for _ in range(args.len_repeats):
                t0 = time.perf_counter()
                _fwd_bwd(impl, ins, dh, args.chunk)
                ts.append(time.perf_counter() - t0)
            row[backward] = {
                "median_ms": 1e3 * statistics.median(ts),
                "saved_MiB": _saved_bytes(ins, args.chunk, backward) / 2**20,
                "peak_rss_growth_MiB": None if args.no_rss else _child_peak_rss(args, S, backward),
            }
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (smoke test)")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--NH", type=int, default=4)
    p.add_argument("--S", type=int, default=2048, help="sequence length of the comparison (a)")
    p.add_argument("--DQK", type=int, default=64)
    p.add_argument("--DV", type=int, default=128)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--len-repeats", type=int, default=3)
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mlstm_chunkwise_cpu.json")
    p.add_argument("--rss-child", nargs=2, metavar=("S", "BACKWARD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return
    if args.quick:
        args.S, args.repeats, args.seq_lens, args.len_repeats = 512, 3, [256, 512, 1024, 2048], 2
        args.NH, args.DQK, args.DV = 2, 32, 64

    comparison = bench_impls(args.B, args.NH, args.S, args.DQK, args.DV, args.chunk, args.repeats)
    sh = comparison["shape"]
    print(
        f"(a) fwd+bwd, B{sh['B']} NH{sh['NH']} S{sh['S']} DQK{sh['DQK']} DV{sh['DV']} chunk {sh['chunk_size']}, "
        f"fp32, median of {args.repeats} (threads {torch.get_num_threads()})"
    )
    print(f"{'implementation':32s} {'median ms':>10s} {'min ms':>9s}   same-semantics baseline / ours (median, min)")
    for name, r in comparison["results"].items():
        ratio = f"{r['speedup_median']:.2f}x, {r['speedup_min']:.2f}x vs {r['baseline']}" if "baseline" in r else ""
        print(f"{name:32s} {r['median_ms']:10.1f} {r['min_ms']:9.1f}   {ratio}")

    lengths = bench_lengths(args)
    print(f"\n(b) ours fwd+bwd vs S, B{args.B} NH{args.NH} DQK{args.DQK} DV{args.DV} chunk {args.chunk}")
    print(
        f"{'S':>6s} {'input MiB':>9s} | {'exact ms':>9s} {'saved MiB':>9s} {'RSS+ MiB':>9s} | "
        f"{'const ms':>9s} {'saved MiB':>9s} {'RSS+ MiB':>9s}"
    )
    for r in lengths:
        cells = []
        for b in ("exact", "constant"):
            rss = r[b]["peak_rss_growth_MiB"]
            rss_cell = "-" if rss is None else f"{rss:.1f}"
            cells.append(f"{r[b]['median_ms']:9.1f} {r[b]['saved_MiB']:9.2f} {rss_cell:>9s}")
        print(f"{r['S']:6d} {r['input_MiB']:9.2f} | {cells[0]} | {cells[1]}")

    result = {
        "machine": run_env(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "comparison": comparison,
        "vs_sequence_length": lengths,
    }
    write_result(args.out, result)
    print(f"\nwrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")


if __name__ == "__main__":
    main()
