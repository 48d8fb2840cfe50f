"""Kernel launches: autotuned tile sizes on CUDA, fixed ones under the Triton interpreter (autotuning needs a GPU).

`candidate_configs` lists every configuration `launch` can run for a call (the ahead-of-time resource test compiles
exactly these). Nothing here reads the autotuner's shared `best_config` (another thread may be tuning): callers size
what depends on the tiles for the smallest tile any candidate has (`max_dqk_tiles`).
"""

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from xlstm_megatron.ops.mlstm.triton.kernels_backward import (
    mlstm_bwd_dk_kernel,
    mlstm_bwd_dq_kernel,
    mlstm_bwd_dv_kernel,
    mlstm_bwd_states_kernel,
)
from xlstm_megatron.ops.mlstm.triton.kernels_forward import mlstm_fwd_out_kernel, mlstm_fwd_states_kernel

MIN_TILE = 16  # tl.dot needs every block dimension >= 16; smaller chunks / heads are masked inside a 16 tile
FIXED_TILE_CAP = 64  # largest tile without autotuning (tests lower it to exercise several tiles per chunk / head)
FIXED_OPTIONS = {"num_warps": 4, "num_stages": 3}  # triton's default stages, stated: the resource test compiles them
# fp32 inputs run IEEE (FMA) dots, whose operands stay in registers: 64-wide tiles spill up to 1.2 KB per thread at
# the 7B heads (4 warps; 80 B at 8 warps), 32-wide ones none
FIXED_TILE_CAP_FP32 = 32
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _tile(n: int, cap: int) -> int:
    """Smallest power of two >= n, clamped to [MIN_TILE, cap]."""
    return max(MIN_TILE, min(cap, triton.next_power_of_2(n)))


def dtype_meta(dtype: torch.dtype) -> dict:
    """DT: the tl.dot operand dtype; IEEE: full-fp32 dots for fp32 inputs (no TF32, like torch's default matmul)."""
    if dtype not in _TL_DTYPE:
        raise TypeError(f"the Triton mLSTM kernels take fp32, fp16 or bf16 inputs, got {dtype}")
    return {"DT": _TL_DTYPE[dtype], "IEEE": dtype == torch.float32}


AUTOTUNE_ENV = "XLSTM_MLSTM_TRITON_AUTOTUNE"  # "0": fixed tiles on CUDA too (no compile sweep on the first call)


def use_autotune(t: torch.Tensor) -> bool:
    """Autotune on CUDA unless the interpreter runs the kernels or AUTOTUNE_ENV is "0"."""
    return t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1" and os.environ.get(AUTOTUNE_ENV, "1") != "0"


def _clip_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Shrink tiles larger than the (power-of-two rounded) chunk / head sizes and drop the duplicates."""
    args = {**named_args, **kwargs}
    caps = {"BL": _tile(args["L"], 1 << 30), "BK": _tile(args["DQK"], 1 << 30), "BV": _tile(args["DV"], 1 << 30)}
    seen, out = set(), []
    for cfg in configs:
        kw = {name: min(val, caps[name]) for name, val in cfg.kwargs.items()}
        key = (tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return out


def _configs(tiles: list[tuple[int, int]], block_l: tuple[int, ...]) -> list:
    return [
        triton.Config({"BK": bk, "BV": bv, "BL": bl}, num_warps=w, num_stages=2)
        for bk, bv in tiles
        for bl in block_l
        for w in (4, 8)
    ]


# kept small: every config compiles once per (L, DQK, DV, dtype) on the first call
_SCAN_CONFIGS = _configs([(64, 64), (64, 128), (128, 64)], (64,))
_CHUNK_CONFIGS = _configs([(64, 64), (64, 128), (128, 64)], (32, 64))
_KEY = ["L", "DQK", "DV"]


def _tuned(kernel, configs: list, extra_key: tuple[str, ...] = ()):
    return triton.autotune(
        configs=configs, key=[*_KEY, *extra_key], prune_configs_by={"early_config_prune": _clip_configs}
    )(kernel)


_KERNELS = {
    "fwd_states": (mlstm_fwd_states_kernel, _tuned(mlstm_fwd_states_kernel, _SCAN_CONFIGS)),
    "fwd_out": (mlstm_fwd_out_kernel, _tuned(mlstm_fwd_out_kernel, _CHUNK_CONFIGS)),
    "bwd_states": (
        mlstm_bwd_states_kernel,
        _tuned(mlstm_bwd_states_kernel, _SCAN_CONFIGS, ("HAS_DCF", "HAS_DNF", "HAS_DDEN")),
    ),
    "bwd_dq": (mlstm_bwd_dq_kernel, _tuned(mlstm_bwd_dq_kernel, _CHUNK_CONFIGS, ("HAS_DDEN",))),
    "bwd_dk": (mlstm_bwd_dk_kernel, _tuned(mlstm_bwd_dk_kernel, _CHUNK_CONFIGS, ("HAS_N", "HAS_DDEN"))),
    "bwd_dv": (mlstm_bwd_dv_kernel, _tuned(mlstm_bwd_dv_kernel, _CHUNK_CONFIGS)),
}


def _fixed_tiles(meta: dict) -> dict:
    cap = min(FIXED_TILE_CAP, FIXED_TILE_CAP_FP32) if meta["IEEE"] else FIXED_TILE_CAP
    return {"BL": _tile(meta["L"], cap), "BK": _tile(meta["DQK"], cap), "BV": _tile(meta["DV"], cap)}


def candidate_configs(name: str, meta: dict, autotune: bool) -> list[dict]:
    """Tiles and options (BL, BK, BV, num_warps, num_stages) `launch(name, ..., meta, autotune)` may run with."""
    if not autotune:
        return [{**_fixed_tiles(meta), **FIXED_OPTIONS}]
    tuned = _KERNELS[name][1]
    return [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
            for c in _clip_configs(tuned.configs, meta)]


def max_dqk_tiles(meta: dict, autotune: bool) -> int:
    """Most DQK tiles any candidate of the dq / dk kernels splits DQK into (buffers of per-tile partial sums)."""
    return max(triton.cdiv(meta["DQK"], c["BK"]) for name in ("bwd_dq", "bwd_dk")
               for c in candidate_configs(name, meta, autotune))


GRID_YZ_MAX = 65535  # CUDA's limit on grid dimensions y and z


def check_grid(BH: int) -> None:
    if BH > GRID_YZ_MAX:
        raise ValueError(f"the Triton mLSTM launches one grid row per (batch, head): B * NH = {BH} exceeds CUDA's "
                         f"{GRID_YZ_MAX}; split the batch")


def launch(name: str, grid: Callable[[dict], tuple[int, ...]], args: tuple, meta: dict, autotune: bool) -> None:
    """Run kernel `name` with positional `args` and constexpr `meta` (L, DQK, DV, DT, IEEE, flags)."""
    plain, tuned = _KERNELS[name]
    if autotune:
        tuned[grid](*args, **meta)
        return
    (config,) = candidate_configs(name, meta, False)
    plain[grid](*args, **meta, **config)
