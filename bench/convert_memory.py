"""Peak memory of `convert hf-to-megatron` and `convert megatron-to-hf` against the model's size.

Writes a synthetic Hugging Face xLSTM directory (random weights, written shard by shard so this process stays small),
runs each conversion as its own process (`python -m xlstm_megatron.convert.cli`) and samples the resident memory of
that process tree (the checkpoint writer's helpers included, shared pages counted once) every 20 ms. Several model
sizes give the least-squares line peak = fixed + k x weight bytes, which estimates xLSTM-7B (fixed: the torch +
Megatron process and the checkpoint writer's worker processes; k: copies of the weights held at once).

Writes bench/results/convert_memory.json.

    .venv/bin/python bench/convert_memory.py            # E=256/4, E=1024/24, E=2048/12 blocks, vocab 50304
    .venv/bin/python bench/convert_memory.py --quick    # E=128/2 and E=256/4 (smoke test)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run_env import run_env, write_result  # noqa: E402
from xlstm_megatron.convert.hf_config import HF_DEFAULTS, hf_sizes  # noqa: E402
from xlstm_megatron.convert.hf_files import write_safetensors  # noqa: E402
from xlstm_megatron.convert.large_map import large_tensor_map  # noqa: E402

XLSTM_7B = dict(vocab_size=50304, hidden_size=4096, num_hidden_layers=32, num_heads=8)
DTYPE_NAMES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def write_synthetic_hf(out: Path, config: dict, dtype: torch.dtype) -> int:
    """An HF xLSTM directory with random weights; returns the weight bytes."""
    hf = {**HF_DEFAULTS, **config, "model_type": "xlstm", "architectures": ["xLSTMForCausalLM"]}
    sizes, mode = hf_sizes(hf)
    shapes = large_tensor_map(sizes, mode).theirs
    itemsize = torch.empty((), dtype=dtype).element_size()
    names = [(n, itemsize * torch.Size(s).numel()) for n, s in shapes.items()]
    out.mkdir(parents=True)
    write_safetensors(out, names, lambda n: (torch.randn(shapes[n]) * 0.02).to(dtype), 2 * 10**9)
    (out / "config.json").write_text(json.dumps({**hf, "dtype": str(dtype).removeprefix("torch.")}))
    return sum(b for _, b in names)


def weight_bytes(config: dict, dtype: torch.dtype) -> int:
    hf = {**HF_DEFAULTS, **config}
    sizes, mode = hf_sizes(hf)
    numel = sum(torch.Size(s).numel() for s in large_tensor_map(sizes, mode).theirs.values())
    return numel * torch.empty((), dtype=dtype).element_size()


def peak_memory(cmd: list[str]) -> tuple[float, float]:
    """(peak memory of the process tree, seconds) of a command, sampled every 20 ms. Memory is the sum of the
    processes' proportional set sizes (PSS), so pages a forked helper shares with its parent count once."""
    start = time.time()
    proc = psutil.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{err.decode()[-3000:]}")
    return float(peak), time.time() - start


def measure(config: dict, dtype_name: str, workdir: Path | None) -> dict:
    """Peak memory and time of both conversions for one synthetic model."""
    work = Path(tempfile.mkdtemp(dir=workdir, prefix="convert_memory_"))
    try:
        nbytes = write_synthetic_hf(work / "hf", config, DTYPE_NAMES[dtype_name])
        cli = [sys.executable, "-m", "xlstm_megatron.convert.cli"]
        imp, t_imp = peak_memory([*cli, "hf-to-megatron", "--hf-dir", str(work / "hf"), "--out", str(work / "ckpt"),
                                  "--dtype", dtype_name])
        exp, t_exp = peak_memory([*cli, "megatron-to-hf", "--ckpt", str(work / "ckpt"), "--out", str(work / "back")])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"config": config, "weight_bytes": nbytes, "hf-to-megatron": {"peak_bytes": imp, "seconds": t_imp},
            "megatron-to-hf": {"peak_bytes": exp, "seconds": t_exp}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="bf16")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch space (default: a temp dir)")
    args = parser.parse_args()
    sizes = [(128, 2), (256, 4)] if args.quick else [(256, 4), (1024, 24), (2048, 12)]
    runs = [measure(dict(vocab_size=50304, hidden_size=E, num_hidden_layers=L, num_heads=4), args.dtype, args.workdir)
            for E, L in sizes]
    baseline, _ = peak_memory([sys.executable, "-c", "import torch, megatron.core, xlstm_megatron.models.xlstm_model"])
    big = weight_bytes(XLSTM_7B, DTYPE_NAMES[args.dtype])
    gib = 2**30
    fits = {}
    for name in ("hf-to-megatron", "megatron-to-hf"):
        # least-squares line peak = fixed + per_byte x weights over the sizes
        w = torch.tensor([float(r["weight_bytes"]) for r in runs], dtype=torch.float64)
        peak = torch.tensor([r[name]["peak_bytes"] for r in runs], dtype=torch.float64)
        per_byte = float(((w - w.mean()) * (peak - peak.mean())).sum() / ((w - w.mean()) ** 2).sum())
        fixed = float(peak.mean() - per_byte * w.mean())
        estimate = (fixed + per_byte * big) / gib
        fits[name] = dict(fixed_gib=fixed / gib, per_weight_byte=per_byte, estimate_7b_gib=estimate)
        for r in runs:
            print(f"{name}: {r['weight_bytes'] / gib:.2f} GiB of {args.dtype} weights -> peak "
                  f"{r[name]['peak_bytes'] / gib:.2f} GiB in {r[name]['seconds']:.0f} s")
        print(f"{name}: peak = {fixed / gib:.2f} GiB + {per_byte:.2f} x weights; xLSTM-7B ({big / gib:.1f} GiB "
              f"{args.dtype}) -> {estimate:.1f} GiB  (a torch+Megatron process alone: {baseline / gib:.2f} GiB)")
    result = dict(dtype=args.dtype, runs=runs, baseline_process_gib=baseline / gib, weight_gib_7b=big / gib,
                  fits=fits, env=run_env())
    out = REPO / "bench" / "results" / f"convert_memory{'_quick' if args.quick else ''}.json"
    write_result(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
