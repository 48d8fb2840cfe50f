"""The Transformer baseline (`--model-family transformer`): Megatron's GPTModel built from the same argument
pipeline as the xLSTM runs, with exact closed-form parameter and FLOP counts (FLOPs against torch's counter)."""

from __future__ import annotations

import pytest
import torch

from tests.megatron.dist import run_distributed
from xlstm_megatron.runs.errors import ConfigError

S, V = 32, 256
BASE = ["--model-family", "transformer", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", str(S), "--micro-batch-size", "2", "--vocab-size", str(V), "--tokenizer-type",
        "NullTokenizer", "--make-vocab-size-divisible-by", "64", "--mock-data", "--lr", "1e-3", "--train-iters", "4",
        "--no-rope-fusion"]


def _args(*extra: str):
    from xlstm_megatron.runs.args import megatron_args

    args = megatron_args([*BASE, *extra])
    args.padded_vocab_size = V
    return args


def _built_counts(extra: tuple[str, ...]):
    from torch.utils.flop_counter import FlopCounterMode

    from xlstm_megatron.models.flops import transformer_forward_flops_per_token
    from xlstm_megatron.runs.model import build_xlstm_model, parameter_counts_from_args, transformer_config_from_args

    args = _args(*extra)
    model = build_xlstm_model(args)
    config = transformer_config_from_args(args)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, V, (2, S)), None, None)
    return dict(
        cls=type(model).__name__, position=model.position_embedding_type,
        params=sum(p.numel() for p in model.parameters()), counted_params=parameter_counts_from_args(args)["total"],
        counted_flops=counter.get_total_flops() / (2 * S),
        full=transformer_forward_flops_per_token(config, V, S, causal=False),
        causal=transformer_forward_flops_per_token(config, V, S, causal=True),
        biases=[n for n, _ in model.named_parameters() if n.endswith(".bias")],
        ffn=config.ffn_hidden_size, glu=config.gated_linear_unit, norm=config.normalization,
    )


@pytest.mark.parametrize("extra", [(), ("--group-query-attention", "--num-query-groups", "2")], ids=["mha", "gqa"])
def test_baseline_counts_equal_the_built_model_and_torch_flop_counter(extra):
    r = run_distributed(_built_counts, world_size=1, args=(extra,))[0]
    assert (r["cls"], r["position"], r["norm"], r["glu"], r["biases"]) == ("GPTModel", "rope", "RMSNorm", True, [])
    assert r["ffn"] == 192  # round_up(8/3 x 64, 64)
    assert r["params"] == r["counted_params"]
    # the local attention multiplies the full S x S square before masking: the full count is exact
    assert r["counted_flops"] == r["full"]
    # the causal count (the one training reports) leaves out the masked half of QK^T and AV: 2 x 2 x S/2 x q
    assert r["full"] - r["causal"] == 2 * 2 * (S // 2) * 64 * 2  # x 2 layers


def test_baseline_family_defaults_and_refusals():
    from xlstm_megatron.runs.args import architecture_line
    from xlstm_megatron.runs.checkpoint import architecture

    args = _args()
    assert (args.swiglu, args.add_bias_linear, args.untie_embeddings_and_output_weights) == (True, False, True)
    assert (args.hidden_dropout, args.attention_dropout, args.layernorm_epsilon) == (0.0, 0.0, 1e-5)
    assert args.spec is None and args.position_embedding_type == "rope"
    assert architecture_line(args).startswith("Transformer baseline: 2 layers, E 64, 4 heads of 16, RoPE")
    assert architecture(args)["xlstm_pattern"] == "**"  # a baseline checkpoint never passes for an xLSTM one
    with pytest.raises(ConfigError, match="--xlstm-pattern is an xLSTM flag"):
        _args("--xlstm-pattern", "mm")
    with pytest.raises(ConfigError, match="drop --spec"):
        _args("--spec", "xlstm_megatron.layers.specs", "xlstm_block_spec")
