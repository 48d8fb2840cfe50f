"""CPU fwd+bwd timing of the sLSTM cell: ours (fast, reference) vs the official xlstm vanilla backend.

All three run in the same process on the same data (official sLSTMCell, backend="vanilla", random recurrent
weights, mapped to our (wx, r, b) layout). Prints a table with ratios against the official backend and writes
bench/results/slstm_cpu.json.

    .venv/bin/python bench/slstm_cpu.py            # full shapes
    .venv/bin/python bench/slstm_cpu.py --quick    # small shapes, few repeats (smoke test)
    .venv/bin/python bench/slstm_cpu.py --threads 1  # less sensitive to other load on a shared CPU
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xlstm.blocks.slstm.cell import sLSTMCell, sLSTMCellConfig  # noqa: E402

from bench.run_env import run_env, write_result  # noqa: E402
from xlstm_megatron.ops.slstm import slstm, slstm_reference  # noqa: E402

FULL_SHAPES = [(8, 256, 4, 64), (4, 512, 4, 32), (16, 128, 4, 128)]  # (B, S, NH, DH)
QUICK_SHAPES = [(4, 64, 4, 32), (2, 128, 2, 16)]


def _official_cell(nh: int, dh: int) -> sLSTMCell:
    cfg = sLSTMCellConfig(hidden_size=nh * dh, num_heads=nh, backend="vanilla", dtype="float32",
                          recurrent_weight_init="standard", bias_init="powerlaw_blockdependent")
    return sLSTMCell(cfg)


def _time(fn: Callable[[], None], repeats: int) -> float:
    """Median wall time (s) of fn over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_shape(bsz: int, seq: int, nh: int, dh: int, repeats: int, with_reference: bool) -> dict:
    torch.manual_seed(0)
    cell = _official_cell(nh, dh)
    x = torch.randn(bsz, seq, 4 * nh * dh, requires_grad=True)
    g_out = torch.randn(bsz, nh, seq, dh)  # official output layout BNSH

    def run_official() -> None:
        y, _ = cell(x)
        torch.autograd.backward(y, g_out)

    # Our layout: wx (B, S, NH, 4, DH); official input is (B, S, gate, head, dh); internal R (NH, 4 DH_out, DH_in)
    # and bias (gate, head, dh) flattened.
    wx = x.detach().view(bsz, seq, 4, nh, dh).transpose(2, 3).contiguous().requires_grad_()
    r = cell._recurrent_kernel.detach().view(nh, 4, dh, dh).permute(0, 3, 1, 2).contiguous().requires_grad_()
    b = cell._bias.detach().view(4, nh, dh).transpose(0, 1).contiguous().requires_grad_()
    g_ours = g_out.transpose(1, 2).contiguous()

    def run(fn: Callable) -> Callable[[], None]:
        def go() -> None:
            y, _ = fn(wx, r, b)
            torch.autograd.backward(y, g_ours)

        return go

    with torch.no_grad():  # sanity: the three agree on this data
        y_off = cell(x)[0].transpose(1, 2)
        err = (slstm(wx, r, b)[0] - y_off).abs().max().item()
    row = {"B": bsz, "S": seq, "NH": nh, "DH": dh, "max_abs_diff_fast_vs_official": err}
    row["official_vanilla_s"] = _time(run_official, repeats)
    row["ours_fast_s"] = _time(run(slstm), repeats)
    row["ours_reference_s"] = _time(run(slstm_reference), repeats) if with_reference else None
    row["speedup_fast_vs_official"] = row["official_vanilla_s"] / row["ours_fast_s"]
    if with_reference:
        row["speedup_reference_vs_official"] = row["official_vanilla_s"] / row["ours_reference_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes and 2 repeats (smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--no-reference", action="store_true", help="skip timing the (slow) per-step reference")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "slstm_cpu.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    repeats = args.repeats or (2 if args.quick else 5)

    rows = [bench_shape(*s, repeats=repeats, with_reference=not args.no_reference) for s in shapes]

    print(f"sLSTM fwd+bwd on CPU, fp32, median of {repeats} (torch threads {torch.get_num_threads()})")
    hdr = f"{'B':>3} {'S':>5} {'NH':>3} {'DH':>4} | {'official ms':>11} {'fast ms':>9} {'ref ms':>9} | " \
          f"{'fast x':>7} {'ref x':>6}"
    print(hdr)
    print("-" * len(hdr))
    for row in rows:
        ref_ms = f"{row['ours_reference_s'] * 1e3:9.1f}" if row["ours_reference_s"] else f"{'-':>9}"
        ref_x = f"{row['speedup_reference_vs_official']:6.2f}" if row["ours_reference_s"] else f"{'-':>6}"
        print(f"{row['B']:>3} {row['S']:>5} {row['NH']:>3} {row['DH']:>4} | {row['official_vanilla_s'] * 1e3:11.1f} "
              f"{row['ours_fast_s'] * 1e3:9.1f} {ref_ms} | {row['speedup_fast_vs_official']:7.2f} {ref_x}")
    print("x = official vanilla time / ours (higher is faster)")

    result = {
        "benchmark": "slstm_cpu fwd+bwd (fp32)",
        "quick": args.quick,
        "repeats": repeats,
        "machine": run_env(),
        "results": rows,
    }
    write_result(args.out, result)
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")


if __name__ == "__main__":
    main()
