"""Our spec through Megatron's own path: `parse_xlstm_args` (Megatron's parser, the family applied) ->
`validate_args` -> gpt_config_from_args -> GPTModelBuilder, no script."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from tests.megatron.dist import run_distributed

ARGV = [
    "--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
    "--max-position-embeddings", "16", "--micro-batch-size", "2", "--vocab-size", "100",
    "--spec", "xlstm_megatron.layers.specs", "xlstm_block_spec",  # norms, biases, dropout, ...: the family's
    "--transformer-impl", "local", "--use-cpu-initialization", "--no-gradient-accumulation-fusion",
    "--xlstm-block", "v1", "--xlstm-pattern", "msm", "--slstm-num-heads", "2", "--mlstm-chunk-size", "8",
]


def _validated(argv: list[str]):
    from megatron.training.arguments import validate_args

    from xlstm_megatron.runs.args import parse_xlstm_args

    args, warnings = parse_xlstm_args(argv)
    assert warnings == []
    with contextlib.redirect_stdout(io.StringIO()):
        validate_args(args, {})
    return args


def _build_through_megatron(argv: list[str]):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.arguments import core_transformer_config_from_args
    from megatron.training.models.gpt import GPTModelBuilder

    from xlstm_megatron.layers.config import XLSTMConfig
    from xlstm_megatron.layers.mlstm_v1 import MLSTMV1Mixer
    from xlstm_megatron.layers.slstm_v1 import SLSTMMixer

    args = _validated(argv)
    config = core_transformer_config_from_args(args, config_class=XLSTMConfig)
    model_config = gpt_config_from_args(args, config=config)
    model = GPTModelBuilder(model_config).build_model(ProcessGroupCollection.use_mpu_process_groups())
    mixers = [type(layer.self_attention) for layer in model.decoder.layers]
    assert mixers == [MLSTMV1Mixer, SLSTMMixer, MLSTMV1Mixer], mixers
    tokens = torch.randint(0, 100, (2, 16))
    loss = model(tokens, None, None, labels=tokens).mean()
    loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
    return float(loss), grads_finite, config.slstm_heads, config.head_norm_eps


def test_spec_builds_through_megatron_training_builder():
    loss, grads_finite, slstm_heads, head_norm_eps = run_distributed(
        _build_through_megatron, world_size=1, args=(ARGV,), timeout=120
    )[0]
    assert grads_finite and 0 < loss < 20
    assert slstm_heads == 2 and head_norm_eps == 1e-5  # plugin flag and v1 family default reached the config


def _build_plain_config(argv: list[str]):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.models.gpt import GPTModelBuilder


    args = _validated(argv)
    GPTModelBuilder(gpt_config_from_args(args)).build_model(ProcessGroupCollection.use_mpu_process_groups())


def test_spec_with_plain_transformer_config_names_the_fix():
    with pytest.raises(RuntimeError, match="config_class=XLSTMConfig"):
        run_distributed(_build_plain_config, world_size=1, args=(ARGV,), timeout=120)


def _build_with_xlstm_builder(argv: list[str]):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.arguments import core_transformer_config_from_args

    from xlstm_megatron.layers.config import XLSTMConfig
    from xlstm_megatron.models.builder import XLSTMModelConfig
    from xlstm_megatron.models.xlstm_model import XLSTMModel

    args = _validated(argv)
    config = core_transformer_config_from_args(args, config_class=XLSTMConfig)
    model_config = gpt_config_from_args(args, config=config, model_config_cls=XLSTMModelConfig)
    model = model_config.get_builder_cls()(model_config).build_model(ProcessGroupCollection.use_mpu_process_groups())
    assert isinstance(model, XLSTMModel)
    with torch.no_grad():
        for p in model.output_layer.parameters():
            p.mul_(1e3)  # huge logits: the soft cap must bound them
        logits = model(torch.randint(0, 100, (2, 16)), None, None)
    return float(logits.abs().max())


def test_xlstm_model_config_builds_our_model_with_logit_soft_cap():
    large = ARGV[: ARGV.index("--xlstm-block")] + ["--xlstm-block", "large", "--mlstm-chunk-size", "8"]
    peak = run_distributed(_build_with_xlstm_builder, world_size=1, args=(large,), timeout=120)[0]
    assert 20 < peak <= 30.0  # 30 tanh(z / 30)
