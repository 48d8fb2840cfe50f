"""GPU fwd+bwd of an sLSTM layer's cell: ours fused Triton vs ours torch vs the official `xlstm` CUDA backend, and
the ratio to an mLSTM cell of the same width (the issue's target: sLSTM fused <= 2x the mLSTM layer's time).

Shapes (B, S, NH, DH) default to the v1 paper models' sLSTM blocks (4 heads of 192 / 256 / 384 / 512 / 640: the
xLSTM[7:1] 125M ... 2.7B) at 2048 tokens per sequence. All implementations are timed in this process on the same
inputs (CUDA events, median) and their outputs compared with the fp32 torch path; failing ones are recorded as errors.
"ours triton" rows record the launch mode the kernels chose ("sync": a head's columns over several programs with a
grid barrier per step; "steps": one launch per step; "loop": one program per head); "ours triton steps" and
"ours triton loop" (only when named in --impls) force a mode, to measure the choice. Writes
bench/results/slstm_kernels_gpu.json (machine, versions, commit, date, rows).

    .venv/bin/python bench/slstm_kernels_gpu.py                      # bf16 inputs, fp32 states
    .venv/bin/python bench/slstm_kernels_gpu.py --dry-run            # the plan, no GPU needed
    TRITON_INTERPRET=1 .venv/bin/python bench/slstm_kernels_gpu.py --smoke --device cpu --out /tmp/s.json   # CI
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

DEFAULT_SHAPES = ["8x2048x4x192", "8x2048x4x256", "8x2048x4x384", "8x2048x4x512", "8x2048x4x640",
                  "16x1024x8x64"]  # B x S x NH x DH
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SMOKE = {"shapes": ["2x8x2x16"], "warmup": 0, "reps": 1, "dtype": "fp32"}  # the interpreter's bf16 tl.dot is wrong


def _slstm_inputs(B: int, S: int, NH: int, DH: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    wx = torch.randn(B, S, NH, 4, DH, device=device, generator=g).to(dtype)
    r = torch.randn(NH, DH, 4, DH, device=device, generator=g) * DH**-0.5
    b = torch.randn(NH, 4, DH, device=device, generator=g)
    return [t.requires_grad_() for t in (wx, r, b)]


def _y_error(y: torch.Tensor, ins: list[torch.Tensor]) -> float:
    """max |y - y_ref| / max(1, max |y_ref|), y_ref: the fp32 torch sLSTM on the same inputs."""
    from xlstm_megatron.ops.slstm import slstm

    with torch.no_grad():
        ref = slstm(*(t.detach().float() for t in ins))[0]
        return ((y.float() - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


def _official_cell(NH: int, DH: int, dtype: torch.dtype) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The official sLSTM cell (CUDA backend, JIT-compiled on first use), fed our W x + b through its own weights
    (its own R and b: the timing is comparable, its output is not, so it gets no error column)."""
    from xlstm.blocks.slstm.cell import sLSTMCell, sLSTMCellConfig

    name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    cell = sLSTMCell(sLSTMCellConfig(hidden_size=NH * DH, num_heads=NH, backend="cuda", dtype=name)).cuda()

    def run(ins):
        wx = ins[0]
        B, S = wx.shape[:2]
        # Official input layout (B, S, 4 * NH * DH) with gates outermost.
        y, _ = cell(wx.permute(0, 1, 3, 2, 4).reshape(B, S, -1))
        return y

    return run


_PLANS: list = []  # the launch plans of the last "ours triton" call (forward, backward)


def _ours_triton(mode: str | None) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    def run(ins):
        from xlstm_megatron.ops.slstm.triton import launch, slstm_triton

        if not getattr(launch.run, "_recording", False):
            plain = launch.run

            def recording(*a, **k):
                _PLANS.append(plain(*a, **k))
                return _PLANS[-1]

            recording._recording = True
            launch.run = recording
        launch.forced_mode = mode
        _PLANS.clear()
        return slstm_triton(*ins)[0]

    return run


def _impls(names: set[str] | None) -> dict[str, Callable]:
    ours_triton = _ours_triton(None)

    def ours_torch(ins):
        from xlstm_megatron.ops.slstm import slstm

        return slstm(*ins)[0]

    impls = {"ours triton": ours_triton, "ours torch": ours_torch, "official cuda": None}
    forced = {f"ours triton {m}": _ours_triton(m) for m in ("sync", "steps", "loop")}  # only when named
    return {k: v for k, v in {**impls, **forced}.items() if (k in impls and names is None) or (names and k in names)}


def _fwd_bwd_ms(fn: Callable[[list[torch.Tensor]], torch.Tensor], ins: list[torch.Tensor], device: str, warmup: int,
                reps: int) -> float:
    dy = torch.randn_like(fn(ins))

    def step():
        for t in ins:
            t.grad = None
        fn(ins).backward(dy)

    return statistics.median(device_times_ms(step, warmup, reps, device))


def _mlstm_reference_ms(B: int, S: int, NH: int, DH: int, dtype: torch.dtype, device: str, warmup: int,
                        reps: int) -> float:
    """The mLSTM cell an mLSTM layer of the same width runs (Triton chunkwise, DQK = DV = DH)."""
    from xlstm_megatron.ops.mlstm.triton import mlstm_chunkwise_triton

    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(B, NH, S, DH, device=device, generator=g).to(dtype).requires_grad_() for _ in range(3))
    i, f = (torch.randn(B, NH, S, device=device, generator=g).requires_grad_() for _ in range(2))
    cell = lambda ins: mlstm_chunkwise_triton(*ins, chunk_size=64, backward="constant")  # noqa: E731
    return _fwd_bwd_ms(cell, [q, k, v, i, f], device, warmup, reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="B x S x NH x DH")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--impls", nargs="+", default=None,
                   help="subset of: ours triton, ours torch, official cuda (default: these three); ours triton "
                        "sync / steps / loop")
    p.add_argument("--mlstm-ratio", choices=["all", "none"], default="all",
                   help="none: skip the mLSTM cell timing (its kernels compile once per head size)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dry-run", action="store_true", help="print the plan and the environment, run nothing")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: only with --smoke (Triton rows need TRITON_INTERPRET=1 there)")
    p.add_argument("--smoke", action="store_true", help=f"tiny plan {SMOKE} through every code path")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "slstm_kernels_gpu.json")
    args = p.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    elif args.device == "cpu":
        raise SystemExit("--device cpu is for --smoke runs only; GPU timings need --device cuda")
    shapes = [dict(zip(("B", "S", "NH", "DH"), map(int, s.split("x")), strict=True)) for s in args.shapes]
    impls = _impls(set(args.impls) if args.impls else None)
    if args.dry_run:
        print(json.dumps({"env": run_env(), "shapes": shapes, "impls": list(impls), "dtype": args.dtype}, indent=1))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (use --dry-run to see the plan)")
    dtype, dev, rows = DTYPES[args.dtype], args.device, []
    result = {"env": run_env(), "dtype": args.dtype, "rows": rows}
    for shape in shapes:
        mlstm_ms = None
        if args.mlstm_ratio == "all":
            mlstm_ms = _mlstm_reference_ms(**shape, dtype=dtype, device=dev, warmup=args.warmup, reps=args.reps)
        for name, fn in impls.items():
            row = {"impl": name, **shape}
            if mlstm_ms is not None:
                row["mlstm_cell_fwd_bwd_ms"] = mlstm_ms
            try:
                ins = _slstm_inputs(**shape, dtype=dtype, device=dev)
                if fn is not None:
                    row["y_err_vs_fp32_torch"] = _y_error(fn(ins), ins)
                fn = fn or _official_cell(shape["NH"], shape["DH"], dtype)
                row["fwd_bwd_ms"] = _fwd_bwd_ms(fn, ins, dev, args.warmup, args.reps)
                if mlstm_ms is not None:
                    row["vs_mlstm"] = row["fwd_bwd_ms"] / mlstm_ms
                if name.startswith("ours triton"):
                    row["launch"] = [f"{p.mode} P={p.programs}" for p in _PLANS]  # forward, backward
            except Exception as exc:  # noqa: BLE001 - a failing implementation is a result
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            rows.append(row)
            timing = f"{row['fwd_bwd_ms']:9.2f} ms" if "fwd_bwd_ms" in row else row["error"]
            if "vs_mlstm" in row:
                timing += f"  {row['vs_mlstm']:5.2f}x mLSTM"
            if "y_err_vs_fp32_torch" in row:
                timing += f"  y err {row['y_err_vs_fp32_torch']:.1e}"
            if "launch" in row:
                timing += f"  ({', '.join(row['launch'])})"
            print(f"{name:14s} B{shape['B']} S{shape['S']} NH{shape['NH']} DH{shape['DH']}: {timing}")
            write_result(args.out, result)  # after every row: a cut-off run keeps its rows
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
