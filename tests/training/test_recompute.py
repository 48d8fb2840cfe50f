"""Activation recompute through xLSTM layers: Megatron's full recompute (uniform and block) and selective recompute of
the cells (`--recompute-modules mlstm_cell slstm_cell`, next to Megatron's own "mlp") give the same loss and
gradients as no recompute (the loss bitwise, gradients to 1e-6), and keep fewer bytes for backward (counted with
saved-tensor hooks).

Model level: XLSTMModel at TP=2 with sequence parallelism over two gloo ranks, one worker per family. End to end:
`xlstm-megatron train` with the recompute flags logs the same losses as the run without."""

from __future__ import annotations

import pytest
import torch

from bench.recompute_cpu import decoder_saved_bytes
from tests.megatron.dist import reinit_model_parallel, run_distributed
from tests.models.helpers import build_model, randomize_tp_invariant, tiny_config
from tests.training.engine_runs import train

SELECTIVE = dict(recompute_granularity="selective")
FULL = dict(recompute_granularity="full")


def _modes(cells: list[str]) -> dict[str, dict]:
    return {
        "none": {},
        "cells": dict(SELECTIVE, recompute_modules=cells),
        "cells+mlp": dict(SELECTIVE, recompute_modules=[*cells, "mlp"]),
        "full-uniform": dict(FULL, recompute_method="uniform", recompute_num_layers=1),
        "full-block": dict(FULL, recompute_method="block", recompute_num_layers=2),
    }


CASES = {
    # Large: mLSTM mixer + SwiGLU MLP in every layer; v1: mLSTM and sLSTM layers mixed (sLSTM with its gated MLP)
    "large": ("large", dict(num_layers=2, hidden_size=32, num_attention_heads=2, mlstm_chunk_size=8),
              ["mlstm_cell"]),
    "v1": ("v1", dict(num_layers=3, hidden_size=32, num_attention_heads=2, slstm_num_heads=2, xlstm_pattern="msm",
                      mlstm_chunk_size=8), ["mlstm_cell", "slstm_cell"]),
}


def _run_modes(block: str, cfg_kwargs: dict, cells: list[str], tokens: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per mode on this rank: (loss, local gradients, bytes the decoder saved for backward)."""
    from megatron.core import parallel_state as ps

    out = {}
    for mode, flags in _modes(cells).items():
        reinit_model_parallel(tp=2)
        cfg = tiny_config(block, sequence_parallel=True, **cfg_kwargs, **flags)
        model = build_model(cfg, 96, tokens.shape[1]).train()
        randomize_tp_invariant(model, seed=5, std=0.2)
        loss, saved = decoder_saved_bytes(model, tokens, labels)
        loss.mean().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        out[mode] = (loss.detach(), grads, saved)
        assert ps.get_tensor_model_parallel_world_size() == 2
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_recompute_equals_no_recompute_and_saves_less(case):
    block, cfg, cells = CASES[case]
    g = torch.Generator().manual_seed(11)
    tokens, labels = torch.randint(0, 96, (2, 32), generator=g), torch.randint(0, 96, (2, 32), generator=g)
    results = run_distributed(_run_modes, world_size=2, tp=2, args=(block, cfg, cells, tokens, labels), timeout=240)
    for per_rank in results:
        loss0, grads0, saved0 = per_rank["none"]
        for mode, (loss, grads, saved) in per_rank.items():
            # the recomputed forward runs the same kernels on the same inputs: the loss is bitwise the same; a
            # gradient may differ in the last bit (a recomputed input's gradient can come back with other strides,
            # which changes the summation order of a broadcast bias's reduction)
            assert torch.equal(loss, loss0), mode
            assert grads.keys() == grads0.keys()
            for name in grads0:
                torch.testing.assert_close(grads[name], grads0[name], rtol=1e-6, atol=1e-7, msg=f"{mode} {name}")
            if mode != "none":
                assert saved < saved0, (mode, saved, saved0)
        assert per_rank["full-uniform"][2] < per_rank["cells+mlp"][2] <= per_rank["cells"][2]


def test_cell_names_are_checked():
    """The xLSTM names pass Megatron's own recompute_modules check (which has no registry) and refuse to do nothing."""
    from xlstm_megatron.compat import cpu_config_overrides
    from xlstm_megatron.layers.config import make_xlstm_config

    base = dict(num_layers=2, hidden_size=32, num_attention_heads=2, **cpu_config_overrides())
    cfg = make_xlstm_config("v1", xlstm_pattern="ms", **base, **SELECTIVE,
                            recompute_modules=["slstm_cell", "mlp", "mlstm_cell"])
    assert cfg.recomputes("mlstm_cell") and cfg.recomputes("slstm_cell") and "mlp" in cfg.recompute_modules
    with pytest.raises(ValueError, match="no sLSTM layer"):
        make_xlstm_config("large", **base, **SELECTIVE, recompute_modules=["slstm_cell"])
    with pytest.raises(ValueError, match="recompute_granularity='selective'"):
        make_xlstm_config("large", **base, recompute_modules=["mlstm_cell"])
    with pytest.raises(AssertionError, match="Invalid choices for recompute_modules"):  # Megatron's own check stays
        make_xlstm_config("large", **base, **SELECTIVE, recompute_modules=["mlstm_cel"])


# ---- end to end: `xlstm-megatron train` (Megatron's pretrain) with the recompute flags --------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train(tmp_path_factory.mktemp("norecompute") / "run")


@pytest.mark.parametrize(
    "flags",
    [
        ("--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"),
        ("--recompute-granularity", "selective", "--recompute-modules", "mlstm_cell", "slstm_cell", "mlp"),
    ],
    ids=["full-uniform", "selective-cells"],
)
def test_training_with_recompute_equals_without(reference, tmp_path, flags):
    run = train(tmp_path / "run", *flags)
    assert run == reference  # exact floats, train and validation
