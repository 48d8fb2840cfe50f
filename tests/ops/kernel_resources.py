"""Ahead-of-time launch-resource audit of the Triton kernels, no GPU needed.

Every configuration the launchers can choose at the target shapes (from the launchers' own lists: sLSTM
`launch.CONFIGS`, mLSTM `launch.candidate_configs`) is compiled for sm_90 and sm_100 with the argument specialisation
triton applies at launch (dtypes, 16-divisibility), and measured: shared memory from the compiled metadata, registers
and spills from ptxas' own `-v` log. `python -m tests.ops.kernel_resources [--family slstm|mlstm]` prints the table;
the tests (test_kernel_resources.py) run it in a subprocess (the rest of the suite may run under the interpreter).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SHARED_LIMIT = 232_448  # bytes of shared memory one block may use on H100 / H200 / B200 (opt-in maximum)
# bytes of spill stores per thread: ptxas leaves a few words in local memory even at ~100 registers (an L1 hit);
# the audited sLSTM forward at 4 warps spilled 1,248 B, and the kernels here have no stack otherwise
SPILL_LIMIT = 64
ARCHS = (90, 100)

# (B, S, NH, DH): sLSTM heads 64 / 128 (small models) and the paper's 192 / 512 (xLSTM[7:1] 125M / 1.3B). DH is a
# run-time value of the kernels and B only masks rows, so these share one specialisation per dtype set.
SLSTM_TARGETS = [(8, 2048, 4, 64), (8, 2048, 4, 128), (8, 2048, 4, 192), (8, 2048, 4, 512)]
SLSTM_DTYPES = [("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16")]  # (wx, r and bias)
# (B, NH, S, DQK, DV, chunk): xLSTM-7B heads with chunk 64 and 128, and TFLA's 128 / 256 heads
MLSTM_TARGETS = [(1, 8, 8192, 256, 512, 64), (1, 8, 8192, 256, 512, 128), (4, 16, 2048, 128, 256, 64),
                 (4, 16, 2048, 128, 256, 128)]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compilation: kernel (module:function), the specialised argument types, constexprs and compile options.
    Launches whose arguments specialise alike compile to the same binary, so they are one variant."""

    family: str
    kernel: str
    args: tuple[tuple[str, str, bool], ...]  # (name, type, divisible by 16)
    constexprs: tuple[tuple[str, object], ...]
    options: tuple[tuple[str, object], ...]
    arch: int

    def label(self) -> str:
        ce = dict(self.constexprs)
        shape = f"L{ce['L']} {ce['DQK']}x{ce['DV']} " if "L" in ce else ""
        types = ce.get("DT") or "/".join(kind[1:] for name, kind, _ in self.args if name in ("wx_ptr", "r_ptr"))
        tiles = ",".join(f"{k}={v}" for k, v in ce.items() if k not in ("L", "DQK", "DV", "DT", "IEEE", "EXP_FORGET"))
        opts = ",".join(f"{k[4:]}={v}" for k, v in self.options)
        return f"{self.kernel.split(':')[1].removesuffix('_kernel')} {shape}{types} [{tiles},{opts}]"


def _specialise(args: dict, constexprs: dict) -> tuple[tuple, tuple]:
    """Triton's launch-time specialisation of the arguments (name -> "*dtype" for a pointer, or an int / float
    value): (name, type, divisible by 16) per argument, ints equal to 1 moved to the (sorted) constexprs."""
    out, ce = [], dict(constexprs)
    for name, value in args.items():
        if isinstance(value, str):  # a pointer: torch allocations are 16-byte aligned
            out.append((name, value, True))
        elif isinstance(value, float):
            out.append((name, "fp32", False))
        elif value == 1:
            ce[name] = 1
        else:
            out.append((name, "i64" if abs(value) >= 2**31 else "i32", value % 16 == 0))
    return tuple(out), tuple(sorted(ce.items()))


def _load(qualname: str):
    module, name = qualname.split(":")
    return getattr(__import__(module, fromlist=[name]), name)


def _qualname(jit_fn) -> str:
    return f"{jit_fn.fn.__module__}:{jit_fn.fn.__name__}"


def _ptxas_numbers(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    if not regs or not spills:
        raise RuntimeError(f"no ptxas resource line in:\n{log[-2000:]}")
    return {"regs": int(regs[-1]), "spill_stores": int(spills[-1][0]), "spill_loads": int(spills[-1][1]),
            "stack": int(stack[-1]) if stack else 0}


def compile_variant(v: Variant) -> dict:
    """Compile `v` and measure it (in an empty triton cache: a cached binary skips ptxas and its log)."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        return _compile_and_measure(v)


def _compile_and_measure(v: Variant) -> dict:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _load(v.kernel)
    constexprs = {k: tl.dtype(val) if k == "DT" else val for k, val in v.constexprs}  # DT travels as its name
    signature = {name: kind for name, kind, _ in v.args} | dict.fromkeys(constexprs, "constexpr")
    signature = {a: signature[a] for a in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, _, div in v.args if div}
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True  # triton runs `ptxas -v` anyway; this prints its log
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", v.arch, 32), options=dict(v.options))
    return {"variant": dataclasses.asdict(v), "label": v.label(), "shared": compiled.metadata.shared,
            **_ptxas_numbers(log.getvalue())}


def slstm_variants(archs=ARCHS, targets=SLSTM_TARGETS, configs: dict | None = None) -> list[Variant]:
    """Every sLSTM compile the launcher can choose at the targets (`configs`: the launcher's `CONFIGS` by default;
    the mode only selects SYNC, the head size is a run-time value)."""
    from xlstm_megatron.ops.slstm.triton import kernels, launch

    configs = launch.CONFIGS if configs is None else configs
    out = []
    for B, S, NH, DH in targets:
        ints = {"B": B, "S": S, "NH": NH, "DH": DH, "T0": 0, "T1": S}
        for wx_dt, r_dt in SLSTM_DTYPES:
            ptrs = {"wx_ptr": wx_dt, "r_ptr": r_dt, "bias_ptr": r_dt, "first_zero_ptr": "i32", "bar_ptr": "i32"}
            for fn in (kernels.slstm_fwd_kernel, kernels.slstm_bwd_kernel):
                for cfg in configs.values():
                    for arch in archs:
                        args, ce = _specialise(
                            {a: ints[a] if a in ints else "*" + ptrs.get(a, "fp32")
                             for a in fn.arg_names if a not in cfg and a != "EXP_FORGET"},
                            {**cfg, "EXP_FORGET": False})
                        opts = (("num_warps", launch.NUM_WARPS), ("num_stages", launch.NUM_STAGES[cfg["SYNC"]]))
                        out.append(Variant("slstm", _qualname(fn), args, ce, opts, arch))
    return list(dict.fromkeys(out))  # targets sharing a specialisation compile once


MLSTM_FLAGS = {  # the flag sets the backward launches with: constant semantics without state gradients, and all on
    "fwd_states": [{}], "fwd_out": [{}], "bwd_dv": [{}],
    "bwd_states": [{"HAS_DCF": False, "HAS_DNF": False, "HAS_DDEN": False},
                   {"HAS_DCF": True, "HAS_DNF": True, "HAS_DDEN": True}],
    "bwd_dq": [{"HAS_DDEN": False}, {"HAS_DDEN": True}],
    "bwd_dk": [{"HAS_N": False, "HAS_DDEN": False}, {"HAS_N": True, "HAS_DDEN": True}],
}
_MLSTM_INPUTS = {"q_ptr", "k_ptr", "v_ptr", "h_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "dh_ptr"}


def mlstm_variants(archs=ARCHS, targets=MLSTM_TARGETS, dtype: str = "bf16", tuned: str = "none",
                   flag_sets: str = "all_on") -> list[Variant]:
    """mLSTM compiles `launch` can run at the targets: the fixed tiles (run without autotuning), plus the autotune
    candidates (`tuned` "all"; "smallest": each kernel's first candidate, the smallest tiles). The autotuner drops
    candidates that do not fit (OutOfResources), so only the fixed tiles can fail a launch; the smallest candidate
    shows that tuning always keeps one. `flag_sets`: "all_on" (every optional input; a superset of the code of the
    others) or "both" (also the constant-backward training case without state gradients)."""
    import torch

    from xlstm_megatron.ops.mlstm.triton import launch

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    out = []
    for _B, _NH, S, DQK, DV, L in targets:
        NC = -(-S // L)
        values = {"S": S, "NC": NC, "C_FIRST": 0, "C_END": NC, "NCB": NC, "scale": DQK**-0.5, "eps": 1e-6}
        base = {"L": L, "DQK": DQK, "DV": DV, **launch.dtype_meta(tdt)}
        for name, (fn, _) in launch._KERNELS.items():
            flag_list = MLSTM_FLAGS[name] if flag_sets == "both" else MLSTM_FLAGS[name][-1:]
            for flags in flag_list:
                meta = {**base, **flags}
                configs = launch.candidate_configs(name, meta, False)
                if tuned != "none":
                    candidates = launch.candidate_configs(name, meta, True)
                    configs += candidates if tuned == "all" else candidates[:1]
                for cfg in configs:
                    tiles = {k: cfg[k] for k in ("BL", "BK", "BV")}
                    opts = (("num_warps", cfg["num_warps"]), ("num_stages", cfg["num_stages"]))
                    args, ce = _specialise(
                        {a: values[a] if a in values else "*" + (dtype if a in _MLSTM_INPUTS else "fp32")
                         for a in fn.arg_names if a not in meta and a not in tiles},
                        {**meta, **tiles, "DT": str(meta["DT"])})
                    for arch in archs:
                        out.append(Variant("mlstm", _qualname(fn), args, ce, opts, arch))
    return list(dict.fromkeys(out))


def variants(family: str, scope: str) -> list[Variant]:
    """"ci": what the tests compile (every sLSTM variant; the mLSTM fixed tiles at every target in bf16 and at the 7B
    head in fp32 / fp16, and each kernel's smallest autotune candidate); "full": also every mLSTM autotune candidate
    and both flag sets."""
    if family == "slstm":
        return slstm_variants()
    if scope == "full":
        out = mlstm_variants(tuned="all", flag_sets="both")
        for dtype in ("fp32", "fp16"):
            out += mlstm_variants(dtype=dtype, flag_sets="both")
    else:
        out = mlstm_variants()
        out += mlstm_variants(targets=MLSTM_TARGETS[:1], tuned="smallest")
        for dtype in ("fp32", "fp16"):
            out += mlstm_variants(targets=MLSTM_TARGETS[:1], dtype=dtype)
    return list(dict.fromkeys(out))


def _compile_in_pool(variants: list[Variant], jobs: int) -> list[dict]:
    rows = []
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        for row in pool.map(compile_variant, variants, chunksize=4):
            rows.append(row)
            if len(rows) % 20 == 0:
                print(f"compiled {len(rows)} / {len(variants)}", file=sys.stderr, flush=True)
    return rows


def over_limits(rows: list[dict], shared_limit: int = SHARED_LIMIT, spill_limit: int = SPILL_LIMIT) -> list[str]:
    """One line per compiled configuration that could not launch (shared memory) or spills."""
    bad = []
    for r in rows:
        if r["shared"] > shared_limit:
            bad.append(f"sm_{r['variant']['arch']} {r['label']}: {r['shared']} B shared > {shared_limit}")
        if r["spill_stores"] > spill_limit:
            bad.append(f"sm_{r['variant']['arch']} {r['label']}: {r['spill_stores']} B spilled > {spill_limit}")
    return bad


def run_audit(families: list[str], jobs: int, scope: str = "ci", timeout: int = 1800) -> list[dict]:
    """Runs this module in a subprocess (without the interpreter); returns its rows."""
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "tests.ops.kernel_resources", "--json", "--jobs", str(jobs),
                           "--scope", scope, "--family", *families],
                          capture_output=True, text=True, env=env, cwd=repo, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", nargs="+", choices=["slstm", "mlstm"], default=["slstm", "mlstm"])
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--scope", choices=["ci", "full"], default="ci", help=variants.__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON line with every row (for the tests)")
    p.add_argument("--out", type=Path, help="also write the rows here as JSON")
    args = p.parse_args()
    todo = [v for family in args.family for v in variants(family, args.scope)]
    rows = _compile_in_pool(todo, args.jobs)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    if args.json:
        print(json.dumps(rows))
        return
    for r in rows:
        print(f"sm_{r['variant']['arch']:<4} {r['label']:90s} shared {r['shared']:7d}  regs {r['regs']:3d}  "
              f"spills {r['spill_stores']:5d}/{r['spill_loads']:5d}  stack {r['stack']}")
    print("\n".join(over_limits(rows)) or "all within limits")


if __name__ == "__main__":
    main()
