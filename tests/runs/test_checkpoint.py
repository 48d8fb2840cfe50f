"""runs/checkpoint.py: weights-only Megatron checkpoints that Megatron's own `load_checkpoint` accepts, resharding
between TP/PP layouts with equal logits, and one-line errors for wrong architectures and broken directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.megatron.dist import reinit_model_parallel, run_distributed

VOCAB, SEQ = 40, 12
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--mlstm-chunk-size", "4"]


def tiny_args(tp: int = 1, pp: int = 1, extra: tuple[str, ...] = ()):
    """Megatron args of a tiny Large model (vocab exactly VOCAB), validated at TP=PP=1 (validate_args asks the GPU
    architecture for TP > 1), then laid out at TP/PP on a copy, as generation and conversion do."""
    from xlstm_megatron.runs.args import megatron_args
    from xlstm_megatron.runs.checkpoint import with_layout

    argv = [*TINY, "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ), "--micro-batch-size", "1",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB), "--transformer-impl", "local", *extra]
    args = with_layout(megatron_args(argv), tp, pp)
    args.padded_vocab_size = VOCAB
    return args


def model_chunks(args) -> list[torch.nn.Module]:
    """This rank's model chunk, built through runs.model (pre/post-process from the pipeline stage)."""
    from megatron.core import parallel_state as ps

    from xlstm_megatron.runs.model import build_xlstm_model

    return [build_xlstm_model(args, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())]


@torch.no_grad()
def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(model.eval()(tokens, None, None))


def _reshard(root: str, tokens: torch.Tensor) -> dict:
    """Save the same logical random model at TP=2 and at PP=2, load both at TP=1; logits against the TP=1 model."""
    from tests.models.helpers import randomize_tp_invariant
    from xlstm_megatron.runs.checkpoint import load_model_weights, save_weights_checkpoint

    for tp, pp in ((2, 1), (1, 2)):
        reinit_model_parallel(tp=tp, pp=pp)
        chunks = model_chunks(tiny_args(tp, pp))
        for chunk in chunks:
            randomize_tp_invariant(chunk, seed=5)
        save_weights_checkpoint(chunks, Path(root) / f"tp{tp}pp{pp}", 3, tiny_args(tp, pp))
    reinit_model_parallel(tp=1, pp=1)
    args = tiny_args()
    [reference] = model_chunks(args)
    randomize_tp_invariant(reference, seed=5)
    out = {"reference": _logits(reference, tokens)}
    for name in ("tp2pp1", "tp1pp2"):
        [model] = model_chunks(args)
        load_model_weights([model], Path(root) / name / "iter_0000003")
        out[name] = _logits(model, tokens)
    return out


def test_weights_saved_at_tp2_or_pp2_load_at_tp1_with_equal_logits(tmp_path):
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    for result in run_distributed(_reshard, world_size=2, args=(str(tmp_path), tokens), timeout=240):
        assert result["reference"].abs().max() > 0.1
        for name in ("tp2pp1", "tp1pp2"):
            torch.testing.assert_close(result[name], result["reference"], atol=1e-5, rtol=1e-5, msg=name)
    assert (tmp_path / "tp2pp1" / "latest_checkpointed_iteration.txt").read_text() == "3"


def _megatron_loads(root: str, tokens: torch.Tensor) -> dict:
    """save_weights_checkpoint, then Megatron's own load_checkpoint (plain --load, and --finetune) into fresh models;
    also the one-line errors of a wrong architecture and of a model the checkpoint lacks tensors for."""
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.global_vars import set_args

    from tests.models.helpers import randomize_tp_invariant
    from xlstm_megatron.compat import megatron_cpu_context
    from xlstm_megatron.runs import checkpoint as ckpt
    from xlstm_megatron.runs.errors import ConfigError

    args = tiny_args()
    [model] = model_chunks(args)
    randomize_tp_invariant(model, seed=9)
    ckpt.save_weights_checkpoint([model], root, 0, args)
    out = {"saved": _logits(model, tokens), "common": ckpt.common_state(Path(root) / "iter_0000000")}
    out["common"]["args"] = vars(out["common"]["args"])
    # what pretrain() sets up before it loads: the global args and the microbatch calculator
    init_num_microbatches_calculator(0, None, args.global_batch_size, args.micro_batch_size, 1)
    for finetune in (False, True):
        load_args = tiny_args(extra=("--load", root, *(["--finetune"] if finetune else [])))
        set_args(load_args)
        [fresh] = model_chunks(load_args)
        with megatron_cpu_context():  # its tracker-file read all-reduces a device="cuda" tensor
            iteration, _ = load_checkpoint([fresh], None, None)
        out[f"finetune={finetune}"] = (iteration, _logits(fresh, tokens))
    errors = []
    for extra in (("--hidden-size", "64"), ("--xlstm-pattern", "mm", "--gate-soft-cap", "5")):
        try:
            ckpt.check_architecture(Path(root) / "iter_0000000", tiny_args(extra=extra))
        except ConfigError as e:
            errors.append(str(e))
    ckpt.check_architecture(Path(root) / "iter_0000000", tiny_args(extra=("--xlstm-pattern", "mm")))  # normalised
    try:
        ckpt.load_model_weights(model_chunks(tiny_args(extra=("--num-layers", "3"))), Path(root) / "iter_0000000")
    except ConfigError as e:
        errors.append(str(e))
    out["errors"] = errors
    return out


def test_megatron_load_checkpoint_accepts_weights_only_checkpoints(tmp_path):
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
    (out,) = run_distributed(_megatron_loads, world_size=1, args=(str(tmp_path / "ckpt"), tokens), timeout=240)
    common = out["common"]
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    assert common["args"]["padded_vocab_size"] == VOCAB and common["args"]["xlstm_block"] == "large"
    assert common["args"]["no_save_optim"] and common["args"]["no_save_rng"]
    for finetune in (False, True):
        iteration, logits = out[f"finetune={finetune}"]
        assert iteration == 0
        torch.testing.assert_close(logits, out["saved"], atol=0, rtol=0)
    hidden, cap, lacks = out["errors"]
    assert "hidden_size=32 but this run has hidden_size=64" in hidden and "\n" not in hidden
    assert "gate_soft_cap=15.0 but this run has gate_soft_cap=5.0" in cap
    assert "lacks" in lacks and "decoder.layers.2" in lacks and "\n" not in lacks


def test_bad_directories_fail_with_one_line(tmp_path):
    from xlstm_megatron.runs import checkpoint as ckpt
    from xlstm_megatron.runs.errors import ConfigError

    (tmp_path / "iter_0000002").mkdir()
    (tmp_path / ckpt.LATEST).write_text("7")
    with pytest.raises(ConfigError, match="names '7', which is not a complete checkpoint"):
        ckpt.latest_iteration(tmp_path)
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ckpt.resolve_checkpoint_dir(tmp_path)
    with pytest.raises(ConfigError, match=r"is incomplete \(no metadata.json: its save did not finish\)"):
        ckpt.resolve_checkpoint_dir(tmp_path, 2)  # an iteration directory whose save never finished
    with pytest.raises(ConfigError, match="has no checkpoint"):
        ckpt.resolve_checkpoint_dir(tmp_path / "iter_0000002")
    assert ckpt.latest_iteration(tmp_path / "nowhere") is None
