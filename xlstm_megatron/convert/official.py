"""Map state dicts of the official `xlstm` package onto our XLSTMModel at tensor-parallel size 1.

The result has our full (unsharded) parameter names; `model.load_state_dict` takes it directly at TP=1 and
Megatron's distributed checkpointing reshards it to any TP/PP.
"""

from __future__ import annotations

import torch

from xlstm_megatron.convert.large_map import Segment, large_tensor_map, sizes_from_shapes

Tensor = torch.Tensor
StateDict = dict[str, Tensor]


def _pop(sd: StateDict, key: str) -> Tensor:
    if key not in sd:
        raise KeyError(f"official checkpoint has no tensor {key!r}; is it the right architecture?")
    return sd.pop(key)


def large_to_megatron(official: StateDict, num_blocks: int) -> StateDict:
    """`xlstm.xlstm_large` or HF `xLSTMForCausalLM` state dict (single or fused weight mode) -> ours, through the
    shared map of `large_map` (sizes are read from the tensor shapes)."""
    shapes = {k: tuple(t.shape) for k, t in official.items()}
    sizes, mode, embedding_key = sizes_from_shapes(shapes, num_blocks)
    tmap = large_tensor_map(sizes, mode, embedding_key)
    missing = [k for k in tmap.theirs if k not in official]
    if missing:
        raise KeyError(f"official checkpoint has no tensor {missing[0]!r}; is it the right architecture?")
    unknown = sorted(set(official) - set(tmap.theirs))
    if unknown:
        raise KeyError(f"official checkpoint has tensors this mapping does not know: {unknown[:5]}")
    bad = [k for k, shape in tmap.theirs.items() if shapes[k] != shape]
    if bad:
        raise ValueError(f"official tensor {bad[0]!r} has shape {shapes[bad[0]]}, expected {tmap.theirs[bad[0]]}")
    def rows(s: Segment) -> Tensor:
        return official[s.theirs][s.theirs_start : s.theirs_start + s.rows]

    return {name: torch.cat([rows(s) for s in tmap.segments_of_ours(name)]) for name in tmap.ours}


def _slstm_recurrent_and_bias(sd: StateDict, cell: str, num_heads: int, backend: str) -> tuple[Tensor, Tensor]:
    """The official cell stores R and b in a backend-specific internal layout; ours is its external layout
    R [NH, DH_in, gate, DH_out], b [NH, gate, DH] with gates (i, f, z, o)."""
    r, b = _pop(sd, cell + "_recurrent_kernel_"), _pop(sd, cell + "_bias_")
    dh = r.shape[-1]
    if backend == "vanilla":  # R [NH, 4*DH_out, DH_in], b [4, NH, DH] flattened
        return r.reshape(num_heads, 4, dh, dh).permute(0, 3, 1, 2).contiguous(), \
            b.reshape(4, num_heads, dh).permute(1, 0, 2).contiguous()
    if backend == "cuda":  # R [NH, DH_in, 4*DH_out], b [NH, 4, DH] flattened
        return r.reshape(num_heads, dh, 4, dh).contiguous(), b.reshape(num_heads, 4, dh).contiguous()
    raise ValueError(f"unknown sLSTM backend {backend!r}; use 'vanilla' or 'cuda'")


def v1_to_megatron(
    official: StateDict, pattern: str, mlstm_heads: int, slstm_heads: int, slstm_backend: str = "vanilla"
) -> StateDict:
    """`xlstm.xLSTMLMModel` -> ours. `pattern` has 'm'/'s' per block (sLSTM where the official `slstm_at` says)."""
    sd = dict(official)
    out: StateDict = {"embedding.word_embeddings.weight": _pop(sd, "token_embedding.weight")}
    for i, kind in enumerate(pattern):
        src, dst = f"xlstm_block_stack.blocks.{i}.", f"decoder.layers.{i}."
        x, a = src + "xlstm.", dst + "self_attention."
        out[dst + "input_layernorm.weight"] = _pop(sd, src + "xlstm_norm.weight")
        out[a + "conv_weight"] = _pop(sd, x + "conv1d.conv.weight").squeeze(1)
        out[a + "conv_bias"] = _pop(sd, x + "conv1d.conv.bias")
        if kind == "m":
            c = x + "mlstm_cell."
            out[a + "in_proj.weight"] = _pop(sd, x + "proj_up.weight")
            for n in ("q", "k", "v"):
                out[a + f"{n}_weight"] = _pop(sd, x + f"{n}_proj.weight")
            gates = [_pop(sd, c + f"{g}gate.weight") for g in ("i", "f")]  # [NH, 3*inner] each
            inner = gates[0].shape[1] // 3
            out[a + "gate_weight"] = torch.stack(
                [g.reshape(mlstm_heads, 3, inner).permute(1, 2, 0) for g in gates], dim=-1
            ).contiguous()
            out[a + "igate_bias"] = _pop(sd, c + "igate.bias")
            out[a + "fgate_bias"] = _pop(sd, c + "fgate.bias")
            out[a + "learnable_skip"] = _pop(sd, x + "learnable_skip")
            out[a + "norm_weight"] = _pop(sd, c + "outnorm.weight")
            out[a + "out_proj.weight"] = _pop(sd, x + "proj_down.weight")
        elif kind == "s":
            # Trap of the official layer: its module `fgate` feeds the input-gate slot and `igate` the forget-gate slot.
            out[a + "gate_weight"] = torch.stack(
                [_pop(sd, x + f"{g}.weight") for g in ("fgate", "igate", "zgate", "ogate")], dim=1
            )
            r, b = _slstm_recurrent_and_bias(sd, x + "slstm_cell.", slstm_heads, slstm_backend)
            out[a + "recurrent_weight"], out[a + "bias"] = r, b
            out[a + "norm_weight"] = _pop(sd, x + "group_norm.weight")
            out[dst + "pre_mlp_layernorm.weight"] = _pop(sd, src + "ffn_norm.weight")
            out[dst + "mlp.linear_fc1.weight"] = _pop(sd, src + "ffn.proj_up.weight")
            out[dst + "mlp.linear_fc2.weight"] = _pop(sd, src + "ffn.proj_down.weight")
        else:
            raise ValueError(f"pattern symbol {kind!r} has no official v1 counterpart; use 'm' or 's'")
    out["decoder.final_layernorm.weight"] = _pop(sd, "xlstm_block_stack.post_blocks_norm.weight")
    out["output_layer.weight"] = _pop(sd, "lm_head.weight")
    if sd:
        raise KeyError(f"official checkpoint has tensors this mapping does not know: {sorted(sd)[:5]}")
    return out
