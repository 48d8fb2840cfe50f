"""The architecture asked for is the architecture built: Megatron-LM's GPT-3 example argument list plus only our
`--spec` and `--xlstm-block` builds the xLSTM family's model; every contradicting flag is warned about once (and
honoured) or refused with one line, as FAMILY_FLAG_POLICY says; YAML configs become Megatron flags."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from tests.megatron.dist import run_distributed
from xlstm_megatron.ops.init import small_init_std, wang_init_std
from xlstm_megatron.runs.args import (
    FAMILY_FLAG_POLICY,
    explicit_dests,
    megatron_parser,
    parse_xlstm_args,
    yaml_to_argv,
)
from xlstm_megatron.runs.errors import ConfigError

# Megatron-LM examples/gpt3/train_gpt3_175b_distributed.sh, sizes scaled to tiny, TP/PP 1, no --fp16 (CPU), mock
# data with a NullTokenizer, and the three flags CPU needs (apex fusion, CPU init, local modules).
GPT3_EXAMPLE = [
    "--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32", "--attention-backend", "auto",
    "--micro-batch-size", "1", "--global-batch-size", "16", "--rampup-batch-size", "4", "4", "64",
    "--train-iters", "100", "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
    "--init-method-std", "0.006", "--clip-grad", "1.0", "--lr", "6.0e-5", "--lr-decay-style", "cosine",
    "--min-lr", "6.0e-6", "--lr-warmup-fraction", ".001", "--lr-decay-iters", "80",
    "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000", "--split", "949,50,1",
    "--log-interval", "100", "--save-interval", "10000", "--eval-interval", "1000", "--eval-iters", "10",
    "--no-gradient-accumulation-fusion", "--use-cpu-initialization", "--transformer-impl", "local",
]
OURS = ["--spec", "xlstm_megatron.layers.specs", "xlstm_block_spec"]
BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
VALID = BASE + ["--micro-batch-size", "1", "--seq-length", "32", "--max-position-embeddings", "32",
                "--vocab-size", "100"]


def _without(argv: list[str], flag: str, nvalues: int = 1) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 1 + nvalues:]


# ---- the GPT-3 example, built ---------------------------------------------------------------------------------------


def _build_and_inspect(argv: list[str]) -> dict:
    import contextlib
    import io

    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.training.arguments import validate_args

    from xlstm_megatron.runs.args import architecture_line
    from xlstm_megatron.runs.model import build_xlstm_model

    args, warnings = parse_xlstm_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        validate_args(args, {})
    args.padded_vocab_size = vocab_size_with_padding(args.vocab_size, args, logging_enabled=False)
    model = build_xlstm_model(args)
    layers = list(model.decoder.layers)
    norms = [layer.input_layernorm for layer in layers]
    norms += [layer.pre_mlp_layernorm for layer in layers if not isinstance(layer.pre_mlp_layernorm, IdentityOp)]
    norms.append(model.decoder.final_layernorm)
    linears = [m for m in model.modules() if isinstance(m, ColumnParallelLinear | RowParallelLinear)]
    mlp = next(layer.mlp for layer in layers if not isinstance(layer.mlp, IdentityOp))
    # The FFN's real activation: its output against GELU(gate) * up (exact and tanh) and SiLU(gate) * up.
    w1 = mlp.linear_fc1.weight
    x = torch.randn(64, 1, args.hidden_size) * 2 / float(w1.std() * args.hidden_size**0.5)  # pre-activations ~ 2
    with torch.no_grad():
        out, _ = mlp(x)
        gate, up = torch.chunk(x @ mlp.linear_fc1.weight.T, 2, dim=-1)
        ref = {name: (act(gate) * up) @ mlp.linear_fc2.weight.T for name, act in (
            ("gelu", F.gelu), ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")), ("silu", F.silu))}
    return dict(
        warnings=warnings,
        line=architecture_line(args),
        norm_classes={type(n).__name__ for n in norms},
        norm_eps={n.eps for n in norms},
        linear_biases=[type(m).__name__ for m in linears if m.bias is not None and m.bias.numel()],
        ffn_width=mlp.linear_fc2.weight.shape[1],
        fc1_rows=mlp.linear_fc1.weight.shape[0],
        tied=model.share_embeddings_and_output_weights,
        output_is_embedding=model.output_layer.weight is model.embedding.word_embeddings.weight,
        position_embeddings=hasattr(model.embedding, "position_embeddings"),
        embedding_std=float(model.embedding.word_embeddings.weight.std()),
        fc1_std=float(mlp.linear_fc1.weight.std()),
        fc2_std=float(mlp.linear_fc2.weight.std()),
        config_init_std=model.config.init_method_std,
        dropout=(model.config.hidden_dropout, model.config.attention_dropout),
        activation_error={k: float((out - v).abs().max() / v.abs().max()) for k, v in ref.items()},
        param_count=sum(p.numel() for p in model.parameters()),
    )


FAMILY = {  # block -> (norm class, eps, FFN width at E=128, exact activation, pattern)
    "large": ("XLSTMRMSNorm", 1e-6, 384, "silu", "mm"),  # round_up_large(2.6667 x 128, 64) = 384
    "v1": ("XLSTMLayerNorm", 1e-5, 192, "gelu", "ms"),  # round_up(1.3 x 128, 64) = 192; 's' brings the FFN
}


def _build_many(argvs: list[list[str]]) -> list[dict]:
    return [_build_and_inspect(a) for a in argvs]


@pytest.fixture(scope="module")
def gpt3_built() -> dict:
    cases = {}
    for block, (*_, pattern) in FAMILY.items():
        # Only our flags (plus, for v1, a pattern with an sLSTM block so that the model has an FFN to inspect).
        ours = OURS + ["--xlstm-block", block, "--xlstm-pattern", pattern, "--mlstm-chunk-size", "16"]
        cases[block] = GPT3_EXAMPLE + ours
        cases[block + "-no-init-std"] = _without(GPT3_EXAMPLE, "--init-method-std") + ours
    results = run_distributed(_build_many, world_size=1, args=(list(cases.values()),), timeout=180)[0]
    return dict(zip(cases, results, strict=True))


@pytest.mark.parametrize("block", list(FAMILY))
def test_gpt3_example_with_our_spec_builds_the_family(gpt3_built, block: str):
    norm, eps, width, activation, _ = FAMILY[block]
    r = gpt3_built[block]
    assert r["norm_classes"] == {norm} and r["norm_eps"] == {eps}
    assert r["linear_biases"] == []
    assert r["ffn_width"] == width and r["fc1_rows"] == 2 * width  # gated
    assert not r["tied"] and not r["output_is_embedding"] and not r["position_embeddings"]
    assert r["dropout"] == (0.0, 0.0)
    errors = r["activation_error"]
    assert errors[activation] < 1e-5, errors  # exact GELU for v1 (no tanh-approximating fused GEGLU), SiLU for Large
    assert min(v for k, v in errors.items() if k != activation) > 1e-4, errors  # the check tells them apart
    # The example's --init-method-std 0.006 is honoured, with exactly one warning naming it.
    assert r["config_init_std"] == 0.006
    assert len(r["warnings"]) == 1 and "--init-method-std 0.006" in r["warnings"][0]
    assert math.isclose(r["embedding_std"], 0.006, rel_tol=0.05) and math.isclose(r["fc1_std"], 0.006, rel_tol=0.05)
    assert f"xLSTM {block}" in r["line"] and f"{r['param_count']:,} parameters" in r["line"] and "\n" not in r["line"]


@pytest.mark.parametrize("block", list(FAMILY))
def test_gpt3_example_without_init_std_gets_the_official_inits(gpt3_built, block: str):
    r = gpt3_built[block + "-no-init-std"]
    assert r["warnings"] == []
    std = small_init_std(128)
    assert r["config_init_std"] == std
    assert math.isclose(r["embedding_std"], std, rel_tol=0.05) and math.isclose(r["fc1_std"], std, rel_tol=0.05)
    assert math.isclose(r["fc2_std"], wang_init_std(128, 2), rel_tol=0.05)  # output projections: Wang init


# ---- one flag at a time ---------------------------------------------------------------------------------------------

# Every warn/refuse entry of the policy, with an argv that contradicts the family (Large unless noted).
CONTRADICTIONS: dict[str, list[str]] = {
    "normalization": ["--normalization", "LayerNorm"],
    "layernorm_epsilon": ["--norm-epsilon", "1e-5"],
    "add_qkv_bias": ["--add-qkv-bias"],
    "hidden_dropout": ["--hidden-dropout", "0.1"],
    "attention_dropout": ["--attention-dropout", "0.1"],
    "ffn_hidden_size": ["--ffn-hidden-size", "256"],
    "init_method_std": ["--init-method-std", "0.02"],
    "position_embedding_type": ["--position-embedding-type", "rope"],
    "use_rotary_position_embeddings": ["--use-rotary-position-embeddings"],
    "swiglu": ["--swiglu", "--xlstm-block", "v1"],
    "quick_geglu": ["--quick-geglu"],
    "squared_relu": ["--squared-relu"],
    "openai_gelu": ["--openai-gelu"],
    "layernorm_zero_centered_gamma": ["--apply-layernorm-1p"],
    "qk_layernorm": ["--qk-layernorm"],
    "apply_residual_connection_post_layernorm": ["--apply-residual-connection-post-layernorm"],
    "init_method_xavier_uniform": ["--init-method-xavier-uniform"],
}


def test_every_contradictable_policy_entry_is_tested():
    assert set(CONTRADICTIONS) == {d for d, r in FAMILY_FLAG_POLICY.items() if r.on_contradiction != "fixed"}


@pytest.mark.parametrize("dest", list(CONTRADICTIONS))
def test_contradicting_flag_is_warned_once_or_refused_in_one_line(dest: str):
    rule = FAMILY_FLAG_POLICY[dest]
    argv = BASE + CONTRADICTIONS[dest]
    if rule.on_contradiction == "refuse":
        with pytest.raises(ConfigError) as e:
            parse_xlstm_args(argv)
        assert "\n" not in str(e.value) and rule.flag in str(e.value) and "drop" in str(e.value)
        return
    args, warnings = parse_xlstm_args(argv)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].count(rule.flag) == 1 and "differs from the family's" in warnings[0]
    given = parse_xlstm_args(BASE)[0]
    assert getattr(args, dest) != getattr(given, dest)  # honoured as given


def test_flags_that_agree_with_the_family_are_silent():
    argv = BASE + ["--normalization", "RMSNorm", "--norm-epsilon", "1e-6", "--disable-bias-linear", "--swiglu",
                   "--untie-embeddings-and-output-weights", "--hidden-dropout", "0", "--attention-dropout", "0",
                   "--position-embedding-type", "none", "--ffn-hidden-size", "192", "--no-bias-gelu-fusion"]
    assert parse_xlstm_args(argv)[1] == []
    v1 = BASE + ["--xlstm-block", "v1", "--swiglu", "--ffn-activation", "silu"]  # a SiLU GLU asked for twice
    assert parse_xlstm_args(v1)[1] == []


def test_foreign_spec_is_refused_and_a_missing_spec_is_ours():
    with pytest.raises(ConfigError, match="not an xLSTM spec"):
        parse_xlstm_args(BASE + ["--spec", "megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_local_spec"])
    assert parse_xlstm_args(BASE)[0].spec == ["xlstm_megatron.layers.specs", "xlstm_block_spec"]


@pytest.mark.parametrize(("block", "hidden", "factor", "width"), [
    ("large", 96, None, 256),  # 2.6667 x 96 = 256.003: xLSTM-Large's float rounding gives 256, not 320
    ("large", 4096, None, 10944),  # the released xLSTM-7B FFN: an HF checkpoint fits
    ("large", 64, "2.0", 128),
    ("v1", 96, None, 128),  # ceil(1.3 x 96 / 64) x 64
    ("v1", 96, "2.0", 192),
])
def test_ffn_proj_factor_is_honoured_without_ffn_hidden_size(block: str, hidden: int, factor: str | None, width: int):
    argv = ["--num-layers", "2", "--hidden-size", str(hidden), "--num-attention-heads", "4", "--xlstm-block", block]
    argv += ["--ffn-proj-factor", factor] if factor else []
    args, warnings = parse_xlstm_args(argv)
    assert args.ffn_hidden_size == width and warnings == []


def test_ffn_size_and_factor_both_given():
    ok = BASE + ["--ffn-proj-factor", "2.0", "--ffn-hidden-size", "128"]
    assert parse_xlstm_args(ok)[0].ffn_hidden_size == 128
    with pytest.raises(ConfigError) as e:
        parse_xlstm_args(BASE + ["--ffn-proj-factor", "2.0", "--ffn-hidden-size", "256"])
    assert "\n" not in str(e.value) and "give only one" in str(e.value)


def test_explicit_init_std_survives_validation_and_the_config():
    from xlstm_megatron.runs.args import megatron_args
    from xlstm_megatron.runs.model import xlstm_config_from_args

    args = megatron_args(VALID + ["--init-method-std", "0.01"])
    assert xlstm_config_from_args(args).init_method_std == 0.01
    args = megatron_args(VALID)
    assert xlstm_config_from_args(args).init_method_std == small_init_std(64)


def test_megatron_args_quiet_prints_nothing(capsys):
    from xlstm_megatron.runs.args import megatron_args

    megatron_args(VALID + ["--hidden-dropout", "0.2"])
    assert capsys.readouterr().out == ""
    megatron_args(VALID + ["--hidden-dropout", "0.2"], quiet=False)
    out = capsys.readouterr()
    assert "arguments" in out.out and out.err.count("--hidden-dropout 0.2") == 1


# ---- biases on with v1's exact GELU: no tanh-approximating fused GEGLU ----------------------------------------------


def _v1_biased_ffn_error() -> tuple[bool, float]:
    from tests.models.helpers import build_model, tiny_config

    config = tiny_config("v1", num_layers=2, hidden_size=64, num_attention_heads=4, xlstm_pattern="ms",
                         add_bias_linear=True, bias_activation_fusion=True, mlstm_chunk_size=16)
    mlp = build_model(config, 128, 16).decoder.layers[1].mlp
    x = 3 * torch.randn(8, 1, 64)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_()  # biases away from zero
        out, out_bias = mlp(x)
        h = x @ mlp.linear_fc1.weight.T + mlp.linear_fc1.bias
        gate, up = torch.chunk(h, 2, dim=-1)
        ref = (F.gelu(gate) * up) @ mlp.linear_fc2.weight.T
    out = out + (out_bias if out_bias is not None else 0)
    return config.bias_activation_fusion, float((out - ref - mlp.linear_fc2.bias).abs().max() / ref.abs().max())


def test_v1_with_biases_runs_exact_gelu_not_fused_geglu():
    fusion, rel_error = run_distributed(_v1_biased_ffn_error, world_size=1, timeout=120)[0]
    assert fusion is False and rel_error < 1e-5


# ---- YAML -> argv -------------------------------------------------------------------------------------------------


def _runner(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("runner (test stand-in for the engine's flags)")
    group.add_argument("--nproc", type=int, default=1)
    group.add_argument("--demo-data", action=argparse.BooleanOptionalAction, default=False)
    return parser


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return megatron_parser(_runner)


def test_yaml_unknown_key_names_the_closest(parser):
    with pytest.raises(ConfigError, match="unknown key 'hiden_size'; did you mean 'hidden_size'") as e:
        yaml_to_argv({"model": {"hiden_size": 64}}, parser)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="did you mean 'data_cache_path'"):
        yaml_to_argv({"train": {"data_cache_dir": "x"}}, parser)
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        yaml_to_argv({"modle": {}}, parser)


def test_yaml_booleans_take_megatrons_spelling(parser):
    assert yaml_to_argv({"train": {"sequence_parallel": True}}, parser) == ["--sequence-parallel"]
    assert yaml_to_argv({"train": {"sequence_parallel": False}}, parser) == []  # Megatron's default, no flag
    assert yaml_to_argv({"model": {"add_bias_linear": False}}, parser) == ["--disable-bias-linear"]
    assert yaml_to_argv({"model": {"bias_gelu_fusion": False}}, parser) == ["--no-bias-gelu-fusion"]
    assert yaml_to_argv({"train": {"demo_data": True}}, parser) == ["--demo-data"]
    assert yaml_to_argv({"train": {"demo_data": False}}, parser) == ["--no-demo-data"]
    with pytest.raises(ConfigError, match="add_bias_linear: true has no Megatron flag"):
        yaml_to_argv({"model": {"add_bias_linear": True}}, parser)  # the family's off would win silently


def test_yaml_lists_patterns_and_cli_override(parser):
    doc = {"info": {"anything": [1, 2]},
           "model": {"xlstm_block": "v1", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
                     "slstm_at": [1]},
           "train": {"data_path": ["0.3", "a_text_document", "0.7", "b_text_document"], "split": "99,1,0",
                     "lr": 5.0e-4, "nproc": 2}}
    argv = yaml_to_argv(doc, parser)
    assert argv[argv.index("--xlstm-pattern") + 1] == "msmm"
    assert argv[argv.index("--data-path") + 1: argv.index("--data-path") + 5] == doc["train"]["data_path"]
    args, _ = parse_xlstm_args(argv + ["--hidden-size", "128"], _runner)  # flags after the YAML's win
    assert (args.hidden_size, args.xlstm_pattern, args.lr, args.nproc, args.split) == (128, "msmm", 5e-4, 2, "99,1,0")
    with pytest.raises(ConfigError, match="takes one value"):
        yaml_to_argv({"train": {"lr": [1, 2]}}, parser)


def test_explicit_dests(parser):
    argv = ["--hidden-size", "64", "--disable-bias-linear", "--swiglu", "--data-path", "a", "b", "--no-demo-data"]
    assert explicit_dests(parser, argv) == {"hidden_size", "add_bias_linear", "swiglu", "data_path", "demo_data"}
    assert parser.get_default("add_bias_linear") is True and parser.get_default("hidden_dropout") == 0.1  # restored


def test_docs_show_the_policy_table():
    from pathlib import Path

    from xlstm_megatron.runs.args import family_policy_table

    doc = (Path(__file__).resolve().parents[2] / "docs" / "megatron_lm.md").read_text()
    assert f"<!-- family-policy-table -->\n{family_policy_table()}\n<!-- /family-policy-table -->" in doc
