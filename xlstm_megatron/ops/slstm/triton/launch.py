"""How the sLSTM kernels are launched: tile sizes, how many programs share a head, and how their steps are ordered.

Per step a (head, batch tile) needs BB x DH x 4 DH multiply-adds and reads all of that head's R (4 DH^2 values)
from L2; at the paper's head sizes (192 ... 640) one program would take tens of microseconds per step, so the head's
column blocks are spread over P programs (see kernels.py). Modes, chosen by `plan`:
- "loop": P = 1, one launch for the whole sequence (small heads: no barrier needed).
- "sync": P > 1, one cooperative launch; a grid barrier per step. Only when every program fits on the GPU at once
  (checked against the compiled kernel's registers and shared memory).
- "steps": P > 1, one launch per step (the floor where "sync" cannot be resident; and the interpreter's way to test
  the split, since it runs programs one after another).
Every mode uses the same few tiles (`CONFIGS`), whose resources do not depend on DH: the ahead-of-time resource test
compiles exactly these.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable

import torch
import triton

BATCH_TILE = 16  # tl.dot needs blocks >= 16: batch rows of one program (padded)
BLOCK_K = 32  # reduction tile over the head dim
BLOCK_N = 16  # output columns (per gate) a program finishes per inner pass: small, so that many programs share a head
NUM_WARPS = 4
# Software pipelining turns the tile loads into cp.async.ca copies, cached in L1, which ignore the `.cg` that keeps
# another SM's stores of the previous step visible: the grid-barrier kernels are not pipelined. Without the barrier
# every cross-program read is separated by a kernel launch (L1 does not outlive it) or stays in one program.
NUM_STAGES = {False: 2, True: 1}
LOOP_MAX_DH = 128  # up to this head size one program per (head, batch tile) runs the whole sequence
GRID_YZ_MAX = 65535  # CUDA's limit on grid dimensions y and z
INT32_MAX = 2**31 - 1

# The tl.dot-free parts need no tuning; these are the only compile-time variants (besides EXP_FORGET, wx's dtype),
# keyed by (SYNC, DOCS). DOCS (packed documents) is a compile-time flag so that calls without `doc_starts` load nothing
# more; listing it here makes the resource audit compile both.
CONFIGS = {(sync, docs): {"BB": BATCH_TILE, "BK": BLOCK_K, "BN": BLOCK_N, "SYNC": sync, "DOCS": docs}
           for sync in (False, True) for docs in (False, True)}

# Tests: "loop", "steps" or "sync" instead of the automatic choice (the interpreter can run "loop" and "steps").
forced_mode: str | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    programs: int  # P: programs per (head, batch tile)
    mode: str  # "loop", "sync" or "steps"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cooperative_supported() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - depends on the triton build
        return False
    return "launch_cooperative_grid" in {f.name for f in dataclasses.fields(CUDAOptions)}


COOPERATIVE = _cooperative_supported()
_capacity_cache: dict[tuple, int] = {}
_capacity_lock = threading.Lock()


def resident_programs(props, shared: int, n_regs: int, num_warps: int) -> int:
    """How many programs of a kernel fit on the device at once (CUDA occupancy rules: threads, registers allocated
    per warp in units of 256, shared memory plus the 1 KiB the runtime reserves per block, at most 32 blocks)."""
    threads = 32 * num_warps
    by_threads = props.max_threads_per_multi_processor // threads
    regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = props.regs_per_multiprocessor // (regs_per_warp * num_warps)
    by_smem = props.shared_memory_per_multiprocessor // (shared + 1024)
    return min(by_threads, by_regs, by_smem, 32) * props.multi_processor_count


def _capacity(kernel, args: tuple, meta: dict, device: torch.device) -> int:
    """Programs of `kernel` (compiled for `meta`) that can be resident at once on `device`; cached per compile."""
    key = (id(kernel), device.index, tuple(sorted(meta.items())),
           tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
    with _capacity_lock:
        if key in _capacity_cache:
            return _capacity_cache[key]
    compiled = kernel.warmup(*args, grid=(1,), **meta)
    init = getattr(compiled, "_init_handles", None)  # loads the binary, which fills n_regs (triton 3.x)
    if init is not None:
        init()
    n_regs = getattr(compiled, "n_regs", None) or 255  # unknown: assume the most a thread can have
    props = torch.cuda.get_device_properties(device)
    cap = resident_programs(props, compiled.metadata.shared, n_regs, compiled.metadata.num_warps)
    with _capacity_lock:
        _capacity_cache[key] = cap
    return cap


def _meta(sync: bool, exp_forget: bool, docs: bool) -> dict:
    meta = {**CONFIGS[sync, docs], "EXP_FORGET": exp_forget, "num_warps": NUM_WARPS, "num_stages": NUM_STAGES[sync]}
    if sync and COOPERATIVE:  # the driver refuses (instead of deadlocking) a grid that cannot be co-resident
        meta["launch_cooperative_grid"] = True
    return meta


def check_sizes(bsz: int, seq: int, nh: int, dh: int) -> None:
    """Grid dimensions and the barrier counter stay in range (offsets are int64 in the kernels)."""
    tiles = triton.cdiv(bsz, BATCH_TILE)
    if nh > GRID_YZ_MAX or tiles > GRID_YZ_MAX:
        raise ValueError(f"slstm_triton launches a grid of {nh} heads x {tiles} batch tiles, above CUDA's "
                         f"{GRID_YZ_MAX} per dimension; split the batch or the heads")
    if (seq + 1) * triton.cdiv(dh, BLOCK_N) > INT32_MAX:
        raise ValueError(f"slstm_triton: sequence length {seq} is too long for the step counter; split the sequence "
                         f"(carry the state with initial_state)")


def plan(kernel, args: tuple, bsz: int, nh: int, dh: int, exp_forget: bool, device: torch.device,
         docs: bool = False) -> Plan:
    """The fastest mode that can launch: "sync" if P >= 2 programs per group fit on the device at once, else "loop"
    for small heads and "steps" for large ones. The interpreter runs "loop" (programs run one after another there, so
    a grid barrier would wait forever)."""
    ncb = triton.cdiv(dh, BLOCK_N)
    if forced_mode == "loop" or (forced_mode is None and (ncb == 1 or interpreting())):
        return Plan(1, "loop")
    if forced_mode == "steps":
        return Plan(ncb, "steps")
    if interpreting():
        raise ValueError("the sLSTM 'sync' mode needs a GPU: the interpreter runs programs one at a time")
    groups = nh * triton.cdiv(bsz, BATCH_TILE)
    p = min(ncb, _capacity(kernel, args, _meta(True, exp_forget, docs), device) // groups)
    if p >= 2:
        return Plan(p, "sync")
    if forced_mode == "sync":
        raise ValueError(f"the sLSTM 'sync' mode needs >= 2 resident programs per (head, batch tile); {groups} "
                         f"groups leave {p}: use a smaller batch or the automatic mode")
    return Plan(1, "loop") if dh <= LOOP_MAX_DH else Plan(ncb, "steps")


def run(kernel, make_args: Callable[[int, int, torch.Tensor], tuple], sizes: tuple[int, int, int, int],
        exp_forget: bool, placeholder: torch.Tensor, reverse: bool = False, docs: bool = False) -> Plan:
    """Launch `kernel` over the whole sequence; `make_args(T0, T1, barrier)` gives its arguments for the steps
    T0 <= t < T1 (`reverse`: the kernel walks them backwards). `placeholder`: any int32 tensor on the device, passed
    where no barrier counter is used. `docs`: compile with DOCS (the arguments carry the document starts)."""
    bsz, seq, nh, dh = sizes
    check_sizes(bsz, seq, nh, dh)
    if seq == 0:
        return Plan(1, "loop")
    device = placeholder.device
    p = plan(kernel, make_args(0, seq, placeholder), bsz, nh, dh, exp_forget, device, docs)
    grid = (p.programs, nh, triton.cdiv(bsz, BATCH_TILE))
    if p.mode == "steps":
        meta = _meta(False, exp_forget, docs)
        for t in reversed(range(seq)) if reverse else range(seq):
            kernel[grid](*make_args(t, t + 1, placeholder), **meta)
        return p
    sync = p.mode == "sync"
    barrier = torch.zeros(grid[1] * grid[2], dtype=torch.int32, device=device) if sync else placeholder
    kernel[grid](*make_args(0, seq, barrier), **_meta(sync, exp_forget, docs))
    return p
