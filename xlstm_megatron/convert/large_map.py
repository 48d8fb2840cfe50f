"""The one tensor map between xLSTM-Large checkpoints (Hugging Face `xLSTMForCausalLM`, `xlstm.xlstm_large`) and our
XLSTMModel at tensor-parallel size 1. Both directions read it.

Our fused tensors concatenate theirs along rows (dim 0):
    in_proj     = q | k | v | ogate_preact | igate_preact | fgate_preact      (fused HF: qkv_opreact | ifgate_preact)
    linear_fc1  = proj_up_gate | proj_up                                      (fused HF: proj_up_gate_z)
    igate_bias, fgate_bias = igate_preact.bias, fgate_preact.bias             (fused HF: ifgate_preact.bias halves)
so every correspondence is "rows [a, a+n) of one of ours are rows [b, b+n) of one of theirs" (a `Segment`). Importing
fills ours segment by segment (reading only those rows); exporting concatenates our row ranges into each of theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

WeightMode = Literal["single", "fused"]
HF_EMBEDDING = "backbone.embeddings.weight"
LARGE_EMBEDDING = "embedding.weight"  # `xlstm.xlstm_large.xLSTMLarge`; otherwise its names equal HF's


@dataclass(frozen=True)
class LargeSizes:
    """Every width a Large checkpoint's shapes depend on."""

    vocab_size: int
    hidden_size: int
    num_blocks: int
    num_heads: int
    qk_width: int
    """q/k rows over all heads (HF: int(hidden_size * qk_dim_factor), not the rounded `config.qk_dim`)."""
    v_width: int
    ffn_hidden_size: int


@dataclass(frozen=True)
class Segment:
    ours: str
    ours_start: int
    theirs: str
    theirs_start: int
    rows: int


@dataclass
class TensorMap:
    ours: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Our tensor names (in model order) and their full shapes."""
    theirs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Their tensor names (in checkpoint order) and shapes."""
    segments: list[Segment] = field(default_factory=list)

    def segments_of_ours(self, name: str) -> list[Segment]:
        return [s for s in self.segments if s.ours == name]

    def theirs_for_ours(self, name: str, start: int, stop: int) -> list[tuple[str, int, int]]:
        """(their name, first row, end row) whose concatenation is rows [start, stop) of our tensor `name`."""
        out = []
        for s in self.segments_of_ours(name):
            lo, hi = max(start, s.ours_start), min(stop, s.ours_start + s.rows)
            if lo < hi:
                out.append((s.theirs, s.theirs_start + lo - s.ours_start, s.theirs_start + hi - s.ours_start))
        return out

    def ours_for_theirs(self, name: str) -> list[tuple[str, int, int]]:
        """(our name, first row, end row) whose concatenation is their tensor `name`."""
        segs = sorted((s for s in self.segments if s.theirs == name), key=lambda s: s.theirs_start)
        return [(s.ours, s.ours_start, s.ours_start + s.rows) for s in segs]


class _Builder:
    def __init__(self) -> None:
        self.map = TensorMap()

    def add(self, ours: str, ours_shape: tuple[int, ...], parts: list[tuple[str, tuple[int, ...], int, int]]) -> None:
        """`ours` (of `ours_shape`) = rows of `parts` in order; a part is (their name, their shape, first row, rows)."""
        self.map.ours[ours] = ours_shape
        start = 0
        for theirs, shape, first, rows in parts:
            self.map.theirs.setdefault(theirs, shape)
            self.map.segments.append(Segment(ours, start, theirs, first, rows))
            start += rows
        if start != ours_shape[0]:
            raise AssertionError(f"map of {ours} covers {start} of {ours_shape[0]} rows")

    def same(self, ours: str, theirs: str, shape: tuple[int, ...]) -> None:
        self.add(ours, shape, [(theirs, shape, 0, shape[0])])


def large_tensor_map(
    sizes: LargeSizes, weight_mode: WeightMode = "single", embedding_key: str = HF_EMBEDDING
) -> TensorMap:
    """The map for one Large model. `weight_mode` is HF's: 'single' (one Linear per projection) or 'fused'."""
    if weight_mode not in ("single", "fused"):
        raise ValueError(f"weight_mode={weight_mode!r} is unknown; use 'single' or 'fused'")
    V, E, NH = sizes.vocab_size, sizes.hidden_size, sizes.num_heads
    qk, v, ff = sizes.qk_width, sizes.v_width, sizes.ffn_hidden_size
    b = _Builder()
    b.same("embedding.word_embeddings.weight", embedding_key, (V, E))
    for i in range(sizes.num_blocks):
        src, dst = f"backbone.blocks.{i}.", f"decoder.layers.{i}."
        m, a = src + "mlstm_layer.", dst + "self_attention."
        b.same(dst + "input_layernorm.weight", src + "norm_mlstm.weight", (E,))
        in_rows = 2 * qk + 2 * v + 2 * NH
        if weight_mode == "single":
            parts = [(m + "q.weight", qk), (m + "k.weight", qk), (m + "v.weight", v), (m + "ogate_preact.weight", v),
                     (m + "igate_preact.weight", NH), (m + "fgate_preact.weight", NH)]
            b.add(a + "in_proj.weight", (in_rows, E), [(n, (r, E), 0, r) for n, r in parts])
            b.same(a + "igate_bias", m + "igate_preact.bias", (NH,))
            b.same(a + "fgate_bias", m + "fgate_preact.bias", (NH,))
        else:
            qkvo, ifg = (m + "qkv_opreact.weight", (2 * qk + 2 * v, E)), (m + "ifgate_preact.weight", (2 * NH, E))
            b.add(a + "in_proj.weight", (in_rows, E), [(*qkvo, 0, qkvo[1][0]), (*ifg, 0, 2 * NH)])
            bias = (m + "ifgate_preact.bias", (2 * NH,))
            b.add(a + "igate_bias", (NH,), [(*bias, 0, NH)])
            b.add(a + "fgate_bias", (NH,), [(*bias, NH, NH)])
        b.same(a + "norm_weight", m + "multihead_norm.weight", (v,))
        b.same(a + "out_proj.weight", m + "out_proj.weight", (E, v))
        b.same(dst + "pre_mlp_layernorm.weight", src + "norm_ffn.weight", (E,))
        if weight_mode == "single":
            up = [(src + "ffn.proj_up_gate.weight", (ff, E), 0, ff), (src + "ffn.proj_up.weight", (ff, E), 0, ff)]
        else:
            up = [(src + "ffn.proj_up_gate_z.weight", (2 * ff, E), 0, 2 * ff)]
        b.add(dst + "mlp.linear_fc1.weight", (2 * ff, E), up)  # Megatron's GLU: [activation branch | linear branch]
        b.same(dst + "mlp.linear_fc2.weight", src + "ffn.proj_down.weight", (E, ff))
    b.same("decoder.final_layernorm.weight", "backbone.out_norm.weight", (E,))
    b.same("output_layer.weight", "lm_head.weight", (V, E))
    return b.map


def sizes_from_shapes(shapes: dict[str, tuple[int, ...]], num_blocks: int) -> tuple[LargeSizes, WeightMode, str]:
    """Sizes, weight mode and embedding key of a Large checkpoint, read from its tensor shapes."""
    embedding_key = LARGE_EMBEDDING if LARGE_EMBEDDING in shapes else HF_EMBEDDING
    m = "backbone.blocks.0.mlstm_layer."
    if embedding_key not in shapes or "backbone.blocks.0.ffn.proj_down.weight" not in shapes:
        raise KeyError(f"checkpoint has no {embedding_key!r} or block 0 FFN; is it an xLSTM-Large checkpoint?")
    V, E = shapes[embedding_key]
    ff = shapes["backbone.blocks.0.ffn.proj_down.weight"][1]
    if m + "qkv_opreact.weight" in shapes:
        mode: WeightMode = "fused"
        NH = shapes[m + "ifgate_preact.weight"][0] // 2
        v = shapes[m + "out_proj.weight"][1]
        qk = (shapes[m + "qkv_opreact.weight"][0] - 2 * v) // 2
    else:
        mode = "single"
        NH, qk, v = shapes[m + "igate_preact.weight"][0], shapes[m + "q.weight"][0], shapes[m + "v.weight"][0]
    return LargeSizes(V, E, num_blocks, NH, qk, v, ff), mode, embedding_key
