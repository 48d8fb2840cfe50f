"""Context parallelism of xLSTM-Large layers on CPU/gloo: activation memory per rank and communication per layer.

For each sequence length and CP size, CP gloo ranks (forked, Megatron's parallel state with
`context_parallel_size=CP`) build the same `XLSTMModel` of Large mLSTM layers and run one training forward+backward
on their zigzag pieces of the sequence (Megatron's `get_batch_on_this_cp_rank`). Per rank it records

    saved bytes    distinct storages autograd keeps for backward inside the decoder's layers (parameters and the
                   final norm excluded; `bench/recompute_cpu.SavedActivations`), per layer
    comm bytes     bytes each rank puts into the CP collectives of one layer: the forward all-gather of the state
                   summaries (its input) and the backward all-reduce of their gradients (its tensor: CP times the
                   summary), counted around `ops.context_parallel`'s calls, against the closed form of one summary:
                   2 pieces x B x NH x (DQK x DV + DQK + 3) x 4 bytes; nothing grows with the sequence

    python bench/context_parallel_cpu.py                 # writes bench/results/context_parallel_cpu.json
    python bench/context_parallel_cpu.py --smoke --out /tmp/cp.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.recompute_cpu import decoder_saved_bytes  # noqa: E402
from bench.run_env import run_env, write_result  # noqa: E402


class _CountingDist:
    """Stands in for `torch.distributed` inside `ops.context_parallel`: counts the bytes a rank contributes."""

    def __init__(self, real: Any) -> None:
        self.real, self.gathered, self.reduced = real, 0, 0

    def all_gather(self, parts: list[torch.Tensor], x: torch.Tensor, group: Any = None) -> Any:
        self.gathered += x.numel() * x.element_size()
        return self.real.all_gather(parts, x, group=group)

    def all_reduce(self, x: torch.Tensor, group: Any = None) -> Any:
        self.reduced += x.numel() * x.element_size()  # the summed gradient of every rank's summaries
        return self.real.all_reduce(x, group=group)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def summary_bytes(plan: dict[str, Any]) -> int:
    """Closed form: what one rank sends per layer and direction (two zigzag pieces, fp32)."""
    dqk, dv = plan["qk_head_dim"], plan["v_head_dim"]  # read from the built mixer (Large: DQK = DV / 2)
    return 2 * plan["batch"] * plan["heads"] * (dqk * dv + dqk + 3) * 4


def _rank(rank: int, cp: int, port: int, plan: dict[str, Any], seq: int, out: Any) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    import xlstm_megatron.ops.context_parallel as cp_ops
    from xlstm_megatron.compat import cpu_config_overrides, enable_megatron_cpu_compat, model_parallel_manual_seed
    from xlstm_megatron.layers.config import make_xlstm_config
    from xlstm_megatron.models.xlstm_model import XLSTMModel

    torch.set_num_threads(max(1, plan["threads"] // cp))
    enable_megatron_cpu_compat()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=cp)
    ps.initialize_model_parallel(1, 1, context_parallel_size=cp)
    model_parallel_manual_seed(1234)
    L, V = plan["layers"], plan["vocab"]
    cfg = make_xlstm_config("large", num_layers=L, hidden_size=plan["hidden"], num_attention_heads=plan["heads"],
                            mlstm_chunk_size=plan["chunk"], context_parallel_size=cp, params_dtype=torch.float32,
                            **cpu_config_overrides())
    model = XLSTMModel(cfg, vocab_size=V, max_sequence_length=seq).train()
    g = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(0, V, (plan["batch"], seq), generator=g),
             "labels": torch.randint(0, V, (plan["batch"], seq), generator=g)}
    if cp > 1:
        batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=ps.get_context_parallel_group())
    counting = _CountingDist(cp_ops.dist)
    cp_ops.dist = counting
    loss, saved = decoder_saved_bytes(model, batch["tokens"], batch["labels"])
    loss.sum().backward()
    mixer = model.decoder.layers[0].self_attention
    out.put(dict(rank=rank, saved_bytes_per_layer=saved // L, gathered_bytes_per_layer=counting.gathered // L,
                 reduced_bytes_per_layer=counting.reduced // L, qk_head_dim=mixer.qk_head_dim,
                 v_head_dim=mixer.v_head_dim, loss_sum=float(loss.detach().sum())))
    dist.destroy_process_group()


def measure(plan: dict[str, Any], seq: int, cp: int, port: int) -> list[dict[str, Any]]:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, cp, port, plan, seq, out)) for r in range(cp)]
    for p in procs:
        p.start()
    rows = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a CP rank exited with {p.exitcode}")
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "context_parallel_cpu.json")
    a = parser.parse_args()
    if a.smoke:
        plan = dict(batch=1, hidden=32, heads=2, layers=1, vocab=64, chunk=8, threads=a.threads)
        seqs, cps = [64], [1, 2]
    else:
        plan = dict(batch=1, hidden=128, heads=2, layers=2, vocab=256, chunk=64, threads=a.threads)
        seqs, cps = [16384, 32768, 65536], [1, 2, 4]
    rows = []
    port = 29600
    for seq in seqs:
        base = None
        for cp in cps:
            port += 1
            ranks = measure(plan, seq, cp, port)
            plan_heads = dict(plan, qk_head_dim=ranks[0]["qk_head_dim"], v_head_dim=ranks[0]["v_head_dim"])
            peak = max(r["saved_bytes_per_layer"] for r in ranks)
            base = base or peak
            row = dict(seq=seq, cp=cp, saved_bytes_per_layer_max_rank=peak, saved_ratio_to_cp1=round(peak / base, 3),
                       gathered_bytes_per_layer=ranks[0]["gathered_bytes_per_layer"],
                       reduced_bytes_per_layer=ranks[0]["reduced_bytes_per_layer"],
                       summary_bytes_closed_form=summary_bytes(plan_heads) if cp > 1 else 0, ranks=ranks)
            rows.append(row)
            print(f"S={seq:6d} CP={cp}  saved {peak / 2**20:9.1f} MiB/layer/rank (x{peak / base:.2f})  "
                  f"sent {row['gathered_bytes_per_layer']} B fwd, {row['reduced_bytes_per_layer']} B bwd per layer "
                  f"(closed form {row['summary_bytes_closed_form']} B)", flush=True)
    result = {"bench": "context_parallel_cpu", "env": run_env(), "plan": plan, "dtype": "float32",
              "note": "Large mLSTM layers; saved: bytes autograd keeps for backward in the decoder's layers, per "
                      "layer, on the rank keeping most; sent: bytes per rank and layer in the CP collectives",
              "rows": rows}
    write_result(a.out, result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
