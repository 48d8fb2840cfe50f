"""Activation recompute with xLSTM layers: bytes autograd keeps for backward per layer, and the fwd+bwd time cost.

For each layer type (xLSTM-Large mLSTM layer, v1 mLSTM layer, v1 sLSTM layer) a stack of identical layers is built
as `XLSTMModel` (one gloo rank, Megatron's parallel state) under each recompute setting:

    none                      everything kept
    selective: <cell>         --recompute-granularity selective --recompute-modules mlstm_cell | slstm_cell
    selective: <cell>+mlp     ... plus Megatron's own "mlp" (layers that have an MLP)
    full                      --recompute-granularity full --recompute-method uniform --recompute-num-layers 1

Saved bytes are measured with `torch.autograd.graph.saved_tensors_hooks` around the decoder's layers (the distinct
storages autograd keeps, parameters excluded; the final norm is left out), divided by the number of layers. Time is
the median wall clock of a whole-model forward+backward, as a ratio to `none`.

    python bench/recompute_cpu.py                 # writes bench/results/recompute_cpu.json
    python bench/recompute_cpu.py --smoke --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run_env import device_times_ms, run_env, write_result  # noqa: E402


class SavedActivations:
    """Bytes of the distinct storages autograd saves for backward while `active` (parameters excluded). Use as
    `with torch.autograd.graph.saved_tensors_hooks(s.pack, s.unpack):` around a forward; `watch(module)` counts only
    inside `module`'s forward (and `ignore(module)` leaves a submodule out)."""

    def __init__(self, params: Any) -> None:
        self.param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.storages: dict[int, int] = {}
        self.active = False

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.param_storages:  # views share a storage: counted once
                self.storages[ptr] = storage.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def _switch(self, on: bool) -> Any:
        def hook(*_: Any) -> None:
            self.active = on
        return hook

    def watch(self, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(self._switch(True))
        module.register_forward_hook(self._switch(False))

    def ignore(self, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(self._switch(False))
        module.register_forward_hook(self._switch(True))


def decoder_saved_bytes(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor
                        ) -> tuple[torch.Tensor, int]:
    """(per-token losses, bytes saved for backward by the decoder's layers) of one training forward of an
    XLSTMModel (a GPTModel); the caller runs the backward."""
    counter = SavedActivations(model.parameters())
    counter.watch(model.decoder)
    if getattr(model.decoder, "final_layernorm", None) is not None:
        counter.ignore(model.decoder.final_layernorm)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        loss = model(tokens, None, None, labels=labels)
    return loss, counter.bytes


LAYERS = {  # name -> (family, pattern symbol, the cell's recompute name)
    "large mLSTM": ("large", "m", "mlstm_cell"),
    "v1 mLSTM": ("v1", "m", "mlstm_cell"),
    "v1 sLSTM": ("v1", "s", "slstm_cell"),
}


def modes(cell: str, has_mlp: bool) -> dict[str, dict[str, Any]]:
    sel = dict(recompute_granularity="selective")
    out = {"none": {}, f"selective: {cell}": dict(sel, recompute_modules=[cell])}
    if has_mlp:
        out[f"selective: {cell}+mlp"] = dict(sel, recompute_modules=[cell, "mlp"])
    out["full (uniform, 1 layer)"] = dict(recompute_granularity="full", recompute_method="uniform",
                                          recompute_num_layers=1)
    return out


def _init_single_rank() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from xlstm_megatron.compat import enable_megatron_cpu_compat, model_parallel_manual_seed

    enable_megatron_cpu_compat()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    model_parallel_manual_seed(1234)


def measure(plan: dict[str, Any], warmup: int, reps: int) -> list[dict[str, Any]]:
    from xlstm_megatron.compat import cpu_config_overrides, model_parallel_manual_seed
    from xlstm_megatron.layers.config import make_xlstm_config
    from xlstm_megatron.models.xlstm_model import XLSTMModel

    B, S, E, NH, L, V = (plan[k] for k in ("batch", "seq", "hidden", "heads", "layers", "vocab"))
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)
    rows = []
    for layer, (family, symbol, cell) in LAYERS.items():
        has_mlp = family == "large" or symbol == "s"
        steps, saved = {}, {}
        for mode, flags in modes(cell, has_mlp).items():
            model_parallel_manual_seed(1234)
            cfg = make_xlstm_config(family, num_layers=L, hidden_size=E, num_attention_heads=NH,
                                    xlstm_pattern=symbol * L, mlstm_chunk_size=plan["chunk"],
                                    params_dtype=torch.float32, **cpu_config_overrides(), **flags)
            model = XLSTMModel(cfg, vocab_size=V, max_sequence_length=S).train()

            def step(model: torch.nn.Module = model) -> int:
                loss, kept = decoder_saved_bytes(model, tokens, labels)
                loss.mean().backward()
                return kept

            steps[mode], saved[mode] = step, step()
        # the modes take turns, repetition by repetition: this machine's speed drifts by tens of percent over
        # seconds, and timing one mode after the other turned that drift into ratios below 1
        times: dict[str, list[float]] = {mode: [] for mode in steps}
        for _ in range(warmup + reps):
            for mode, step in steps.items():
                times[mode].extend(device_times_ms(step, 0, 1, "cpu"))
        base_ms = statistics.median(times["none"][warmup:])
        for mode in steps:
            ms = statistics.median(times[mode][warmup:])
            per_layer = saved[mode] / L
            rows.append(dict(layer=layer, mode=mode, saved_bytes_per_layer=int(per_layer),
                             saved_bytes_per_token_per_layer=round(per_layer / (B * S), 1),
                             fwd_bwd_ms=round(ms, 2), time_ratio=round(ms / base_ms, 3), times_ms=times[mode][warmup:]))
            print(f"{layer:12s} {mode:36s} {per_layer / 2**20:8.2f} MiB/layer  {ms:8.1f} ms  x{ms / base_ms:.2f}",
                  flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "recompute_cpu.json")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    if a.smoke:
        plan = dict(batch=1, seq=32, hidden=32, heads=2, layers=2, vocab=64, chunk=8)
        warmup, reps = 0, 1
    else:
        plan = dict(batch=2, seq=256, hidden=256, heads=4, layers=2, vocab=512, chunk=64)
        warmup, reps = 3, 9  # ~1 min on 2 idle cores; fewer repetitions gave ratios below 1
    _init_single_rank()
    result = {"bench": "recompute_cpu", "env": run_env(), "plan": plan, "dtype": "float32",
              "note": "saved bytes: distinct storages autograd keeps for backward inside the decoder's layers "
                      "(parameters and the final norm excluded), per layer; time: whole-model fwd+bwd median, "
                      "ratio to no recompute",
              "rows": measure(plan, warmup, reps)}
    # wall-clock ratios mean little on a loaded machine: record the load the run saw
    result["load_average_after_run"] = os.getloadavg()
    write_result(a.out, result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
