"""The decoder as an ONNX graph (the contract is in export_onnx.py's docstring): embedding, per layer norm ->
fused QKV -> RoPE -> attention -> o_proj -> residual -> norm -> MLP, LM head. Node names follow
``/model/layers.{i}/attn/qkv_proj/MatMul``.

Per layer, LLaMA (BLOOM: LayerNormalization, GELU MLP, ALiBi slopes instead of RoPE)::

    x ─ RMSNorm ─┬─ q_proj ─ RoPE ─┐
                 ├─ k_proj ─ RoPE ─┼─ DynamicMaskAttention ─ o_proj ─ + x ─ RMSNorm ─ SwiGLU ─ + ─▶
                 └─ v_proj ────────┘      (past K/V in, present K/V out)
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..core.quantized import BlockQuantized, concat_rows
from ..models.config import ModelConfig
from .onnx_attention import DOMAIN, attention_function, attention_node, native_attention, native_mask
from .onnx_builder import DTYPES, NP_DTYPES, OPSET, ExternalData, GraphBuilder
from .weight_only import is_symmetric, signed_codes

DTYPES_BY_NP = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def build_model(cfg: ModelConfig, weights: dict[str, np.ndarray], *, dtype: str = "float32",
                quantized: dict[str, BlockQuantized] | None = None, accuracy_level: int = 4,
                external: ExternalData | None = None, flavor: str = "portable",
                attention: str = "plugin") -> onnx.ModelProto:
    """The decoder graph; ``weights`` are float arrays by canonical name, ``quantized`` the block-quantized
    ones (MatMulNBits, float32 activations only)."""
    if quantized and flavor == "ort" and dtype != "float32":
        raise ValueError("MatMulNBits weights are exported with float32 activations")
    if quantized and flavor == "portable" and not all(is_symmetric(q) for q in quantized.values()):
        raise ValueError("a portable (TensorRT) graph takes symmetric weight-only tensors (compile/weight_only.py), "
                         "not the CPU's zero-point blocks")
    d = _DecoderGraph(cfg, weights, dtype=dtype, quantized=quantized or {}, accuracy_level=accuracy_level,
                      external=external, flavor=flavor, attention=attention)
    x = d.embed()
    h = d.norms.first(x, "layers.0.attn_norm", "/model/layers.0/attn_norm")
    for i in range(cfg.num_layers):
        h, x = d.layer(i, h, x)  # h: the next block's normed input; x: the residual stream
    d.lm_head(h)
    return d.model()


class _DecoderGraph:
    """The pieces of the decoder graph, over one GraphBuilder."""

    def __init__(self, cfg: ModelConfig, weights: dict, *, dtype: str, quantized: dict, accuracy_level: int,
                 external, flavor: str, attention: str):
        self.cfg, self.weights, self.quantized, self.accuracy_level = cfg, weights, quantized, accuracy_level
        self.flavor, self.attention = flavor, attention
        self.g = g = GraphBuilder(external=external)
        self.ft, self.npt = DTYPES[dtype], NP_DTYPES[dtype]
        self.norms = _Norms(g, cfg, self.W, flavor)
        self.k_pos = g.op("Concat", ["past_position_ids", "position_ids"], "/model/mask/key_positions/Concat", axis=1)
        self.k_turn = g.op("Concat", ["past_turn_ids", "turn_ids"], "/model/mask/key_turns/Concat", axis=1)
        self.rope = _rope_tables(g, cfg, self.npt, flavor) if cfg.positions == "rope" else None
        self.function = attention_function(cfg) if attention == "plugin" else None
        self.native_mask = native_mask(g, cfg, self.k_pos, self.k_turn) if attention == "native" else None

    def W(self, name: str) -> str:
        return self.g.initializer(name, self.weights[name].astype(self.npt))

    def linear(self, x: str, names: list[str], bias: bool, scope: str) -> str:
        """x @ [W_a; W_b; ...]ᵀ (+ biases): sibling projections of one input fused into one MatMul."""
        g, quantized, weights = self.g, self.quantized, self.weights
        parts = [quantized.get(n + ".weight") for n in names]
        if all(p is not None for p in parts) and len({(p.bits, p.block_size) for p in parts}) > 1:
            # blocks carried from a GGUF at different widths (Q5_0 q/k beside a Q8_0 v): one MatMulNBits each
            ys = [self.quantized_weight(n, p).matmul(x, f"{scope}/{n.rsplit('.', 1)[-1]}")
                  for n, p in zip(names, parts)]
            y = g.op("Concat", ys, scope + "/Concat", axis=-1)
        elif all(p is not None for p in parts):
            fused = parts[0] if len(parts) == 1 else concat_rows(parts)
            y = self.quantized_weight(_fused_name(names), fused).matmul(x, scope)
        else:
            w = np.concatenate([_dense(weights, quantized, n + ".weight", np.float32) for n in names], axis=0)
            y = g.op("MatMul", [x, g.initializer(_fused_name(names) + ".weight.T", w.T.astype(self.npt))],
                     scope + "/MatMul")
        if bias and all(n + ".bias" in weights for n in names):
            b = np.concatenate([weights[n + ".bias"] for n in names])
            y = g.op("Add", [y, g.initializer(_fused_name(names) + ".bias", b.astype(self.npt))], scope + "/Add")
        return y

    def quantized_weight(self, name: str, q: BlockQuantized):
        """MatMulNBits for onnxruntime (``ort``), DequantizeLinear -> MatMul for TensorRT (``portable``)."""
        if self.flavor == "portable":
            return _DequantizedWeight(self.g, name, q, self.npt)
        return _QuantizedWeight(self.g, name, q, self.accuracy_level)

    def embed(self) -> str:
        g, cfg, quantized = self.g, self.cfg, self.quantized
        head_q = quantized.get("embed.weight")
        if head_q is not None and head_q.offsets is None:  # its codes serve the lookup (a tied head's too)
            x = self.quantized_weight("embed.weight", head_q).gather("input_ids", "/model/embed")
        else:
            x = g.op("Gather", [g.initializer("embed.weight", _dense(self.weights, quantized, "embed.weight",
                                                                     self.npt)), "input_ids"], "/model/embed/Gather")
        if cfg.embed_norm:
            x = _norm(g, cfg, x, "embed_norm", self.W, "/model/embed_norm")
        return x

    def layer(self, i: int, h: str, x: str) -> tuple[str, str]:
        """Block ``i`` on its normed input ``h`` and residual ``x``: (the next normed input, the new residual)."""
        cfg, p, s = self.cfg, f"layers.{i}.", f"/model/layers.{i}"
        qkv = self.linear(h, [p + "attn.q_proj", p + "attn.k_proj", p + "attn.v_proj"], cfg.qkv_has_bias,
                          f"{s}/attn/qkv_proj")
        q, k, v = _split_heads(self.g, cfg, qkv, self.rope, f"{s}/attn")
        slopes = (self.weights[p + "attn.alibi_slopes"] if cfg.positions == "alibi"
                  else np.zeros(cfg.num_heads, dtype=np.float32)).astype(self.npt)  # LLaMA: unused, same signature
        if self.native_mask is not None:
            attn = native_attention(self.g, cfg, i, q, k, v, self.native_mask, slopes, f"{s}/attn")
        else:
            attn = attention_node(self.g, cfg, i, q, k, v, self.k_pos, self.k_turn,
                                  self.g.initializer(p + "attn.alibi_slopes", slopes), f"{s}/attn")
        o = self.linear(attn, [p + "attn.o_proj"], cfg.attention_bias, f"{s}/attn/o_proj")
        h, x = self.norms.add_then_norm(o, x, p + "mlp_norm", f"{s}/mlp_norm")  # x += o; h = norm(x)
        down = self.linear(self.mlp_inner(h, p, s), [p + "mlp.down_proj"], cfg.mlp_bias, f"{s}/mlp/down_proj")
        last = i == cfg.num_layers - 1
        return self.norms.add_then_norm(down, x, "norm" if last else f"layers.{i + 1}.attn_norm",
                                        "/model/norm" if last else f"/model/layers.{i + 1}/attn_norm")

    def mlp_inner(self, h: str, p: str, s: str) -> str:
        """SwiGLU (gate and up fused in one MatMul, then split) or GELU: the input of down_proj."""
        g, cfg = self.g, self.cfg
        if cfg.mlp == "swiglu":
            gate, up = g.op("Split", [self.linear(h, [p + "mlp.gate_proj", p + "mlp.up_proj"], cfg.mlp_bias,
                                                  f"{s}/mlp/gate_up_proj"), g.const([cfg.intermediate_size] * 2)],
                            f"{s}/mlp/Split", outputs=2, axis=-1)
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{s}/mlp/act/Sigmoid")], f"{s}/mlp/act/Mul")
            return g.op("Mul", [act, up], f"{s}/mlp/Mul")
        return g.op("Gelu", [self.linear(h, [p + "mlp.up_proj"], cfg.mlp_bias, f"{s}/mlp/up_proj")],
                    f"{s}/mlp/act/Gelu", approximate="tanh")

    def lm_head(self, h: str) -> None:
        """Logits only for the last ``num_logits_to_keep`` new tokens: a prefill needs one row, an evaluation
        all of them; a tied head is the embedding, stored once."""
        g, cfg, quantized = self.g, self.cfg, self.quantized
        start = g.op("Neg", ["num_logits_to_keep"], "/model/keep/Neg")
        x = g.op("Slice", [h, g.op("Unsqueeze", [start, g.const([0])], "/model/keep/Unsqueeze"),
                           g.const([2**62]), g.const([1])], "/model/keep/Slice")
        flat = g.op("Reshape", [x, g.const([-1, cfg.hidden_size])], "/model/lm_head/flatten/Reshape")
        head = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"
        if head in quantized:
            logits = self.quantized_weight(head, quantized[head]).matmul(flat, "/model/lm_head")
        elif cfg.tie_embeddings:
            logits = g.op("Gemm", [flat, "embed.weight"], "/model/lm_head/Gemm", transB=1)
        else:
            logits = g.op("Gemm", [flat, self.W("lm_head.weight")], "/model/lm_head/Gemm", transB=1)
        batch = g.op("Shape", ["input_ids"], "/model/lm_head/batch/Shape", start=0, end=1)
        shape = g.op("Concat", [batch, g.const([-1, cfg.vocab_size])], "/model/lm_head/shape/Concat", axis=0)
        logits = g.op("Reshape", [logits, shape], "/model/lm_head/Reshape")
        g.op("Cast", [logits], "/model/logits/Cast", outputs=["logits"], to=TensorProto.FLOAT)

    def io(self) -> tuple[list, list]:
        """The graph's inputs and outputs: the table in export_onnx.py's docstring."""
        cfg, ft = self.cfg, self.ft
        inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, s) for n, s in (
            ("input_ids", ["batch", "seq"]), ("position_ids", ["batch", "seq"]), ("turn_ids", ["batch", "seq"]),
            ("past_position_ids", ["batch", "past_seq"]), ("past_turn_ids", ["batch", "past_seq"]),
            ("mask_window", []), ("mask_sinks", []), ("num_logits_to_keep", []))]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "keep", cfg.vocab_size])]
        for i in range(cfg.num_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", ft,
                                                            ["batch", cfg.num_kv_heads, "past_seq", cfg.head_dim]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", ft,
                                                             ["batch", cfg.num_kv_heads, "total_seq", cfg.head_dim]))
        return inputs, outputs

    def model(self) -> onnx.ModelProto:
        inputs, outputs = self.io()
        graph = helper.make_graph(self.g.nodes, "belle_edge", inputs, outputs, initializer=self.g.initializers)
        opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(DOMAIN, 1)] if self.function else [])
        if self.quantized or self.flavor == "ort":
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        return helper.make_model(graph, opset_imports=opsets, functions=[self.function] if self.function else [],
                                 ir_version=10, producer_name="belle_edge")


# ---------------------------------------------------------------------------------------------- pieces
def _dense(weights, quantized, name, npt):
    return (quantized[name].dequantize() if name in quantized else weights[name]).astype(npt)


class _QuantizedWeight:
    """A block-quantized weight's initializers (written once) and the nodes that use them."""

    def __init__(self, g: GraphBuilder, name: str, q: BlockQuantized, accuracy_level: int):
        self.g, self.name, self.q, self.accuracy_level = g, name, q, accuracy_level
        key = "_quantized_" + name
        if not hasattr(g, key):
            setattr(g, key, (g.initializer(name + ".codes", q.packed_codes()),
                             g.initializer(name + ".scales", q.scales.reshape(-1)),
                             g.initializer(name + ".zero_points", q.packed_zero_points().reshape(-1)),
                             None if q.offsets is None else g.initializer(name + ".offsets.T", q.offsets.T.copy())))
        self.codes, self.scales, self.zero_points, self.offsets_t = getattr(g, key)

    def matmul(self, x: str, scope: str) -> str:
        """x (..., K) @ Wᵀ -> (..., N); with offsets, + blocksum(x) @ offsetᵀ (quantize.py); the block sums
        are one MatMul with a constant 0/1 block indicator (K, K/block)."""
        n, k = self.q.shape
        g = self.g
        y = g.op("MatMulNBits", [x, self.codes, self.scales, self.zero_points], scope + "/MatMulNBits",
                 domain="com.microsoft", K=k, N=n, bits=self.q.bits, block_size=self.q.block_size,
                 accuracy_level=self.accuracy_level)
        if self.offsets_t is None:
            return y
        indicator = np.kron(np.eye(k // self.q.block_size, dtype=np.float32), np.ones((self.q.block_size, 1),
                                                                                    dtype=np.float32))
        sums = g.op("MatMul", [x, g.const(indicator, np.float32)], scope + "/offsets/blocksum/MatMul")  # (.., K/b)
        return g.op("Add", [y, g.op("MatMul", [sums, self.offsets_t], scope + "/offsets/MatMul")], scope + "/Add")

    def gather(self, ids: str, scope: str) -> str:
        """Embedding rows straight from the LM head's codes (tied weights stay stored once)."""
        n, k = self.q.shape
        g = self.g
        data = g.op("Reshape", [self.codes, g.const([n, k * self.q.bits // 8])], scope + "/codes/Reshape")
        scales = g.op("Reshape", [self.scales, g.const([n, -1])], scope + "/scales/Reshape")
        zps = g.op("Reshape", [self.zero_points, g.const([n, -1])], scope + "/zero_points/Reshape")
        return g.op("GatherBlockQuantized", [data, ids, scales, zps], scope + "/GatherBlockQuantized",
                    domain="com.microsoft", bits=self.q.bits, block_size=self.q.block_size, gather_axis=0,
                    quantize_axis=1)


class _DequantizedWeight:
    """A symmetric weight-only tensor (weight_only.py) in the GPU contract (export_onnx.py's table): signed
    INT4/INT8 codes as the MatMul's B (K, N), fp16 scales, ``DequantizeLinear`` feeding the ``MatMul``. INT4:
    blocks of 128 along K (``axis=0, block_size=128``, scales (K/128, N)); INT8: one scale per output
    channel (``axis=1``, scales (N,)). TensorRT fuses the pair into a weight-only GEMM; our GEMM plugin node
    (gemm_plugin_variant.py) replaces it one for one."""

    def __init__(self, g: GraphBuilder, name: str, q: BlockQuantized, npt):
        self.g, self.name, self.q = g, name, q
        key = "_dequantized_" + name
        if not hasattr(g, key):
            n, k = q.shape
            codes = signed_codes(q).T.copy()  # (K, N): B of x @ B
            if q.bits == 4:
                codes_name = g.initializer_int4(name + ".codes.T", codes)
                scales = q.scales.T.astype(npt)  # (K/128, N)
                attrs = {"axis": 0, "block_size": q.block_size}
            else:
                codes_name = g.initializer(name + ".codes.T", codes)
                scales = q.scales.reshape(n).astype(npt)  # (N,): one block spans the whole row
                attrs = {"axis": 1}
            setattr(g, key, (codes_name, g.initializer(name + ".scales.T", np.ascontiguousarray(scales)), attrs))
        self.codes, self.scales, self.attrs = getattr(g, key)

    def dequantize(self, scope: str) -> str:
        return self.g.op("DequantizeLinear", [self.codes, self.scales], scope + "/DequantizeLinear", **self.attrs)

    def matmul(self, x: str, scope: str) -> str:
        return self.g.op("MatMul", [x, self.dequantize(scope)], scope + "/MatMul")

    def gather(self, ids: str, scope: str) -> str:
        """Embedding rows of a tied head stored once: the dequantized (K, N) table, transposed, gathered."""
        table = self.g.op("Transpose", [self.dequantize(scope)], scope + "/Transpose", perm=[1, 0])
        return self.g.op("Gather", [table, ids], scope + "/Gather")


def _norm(g, cfg, x, name, W, scope):
    if cfg.norm == "rms":
        return g.op("RMSNormalization", [x, W(name + ".weight")], scope + "/RMSNormalization",
                    axis=-1, epsilon=cfg.norm_eps)
    return g.op("LayerNormalization", [x, W(name + ".weight"), W(name + ".bias")], scope + "/LayerNormalization",
                axis=-1, epsilon=cfg.norm_eps)


class _Norms:
    """The residual stream's norms: ``add_then_norm(y, x)`` is ``x + y`` and its norm, one fused contrib
    node in the ``ort`` flavor, Add + norm in the portable one."""

    def __init__(self, g, cfg, W, flavor):
        self.g, self.cfg, self.W, self.fused = g, cfg, W, flavor == "ort"

    def first(self, x, name, scope):
        return _norm(self.g, self.cfg, x, name, self.W, scope)

    def add_then_norm(self, y, x, name, scope):
        g, cfg, W = self.g, self.cfg, self.W
        if not self.fused:
            x = g.op("Add", [x, y], scope + "/residual/Add")
            return _norm(g, cfg, x, name, W, scope), x
        if cfg.norm == "rms":
            outs = g.op("SkipSimplifiedLayerNormalization", [y, x, W(name + ".weight")],
                        scope + "/SkipSimplifiedLayerNormalization", outputs=4, domain="com.microsoft",
                        epsilon=cfg.norm_eps)
        else:
            outs = g.op("SkipLayerNormalization", [y, x, W(name + ".weight"), W(name + ".bias")],
                        scope + "/SkipLayerNormalization", outputs=4, domain="com.microsoft", epsilon=cfg.norm_eps)
        return outs[0], outs[3]  # normed, and the residual sum x + y


def _fused_name(names: list[str]) -> str:
    # layers.0.attn.q_proj + k_proj + v_proj -> layers.0.attn.qkv_proj
    if len(names) == 1:
        return names[0]
    prefix = names[0].rsplit(".", 1)[0]
    return prefix + "." + "_".join(n.rsplit(".", 1)[1].removesuffix("_proj") for n in names) + "_proj"


def _split_heads(g, cfg, qkv, rope, scope):
    """(B, T, (H + 2 Hkv) D) -> q (B, H, T, D), k, v (B, Hkv, T, D), RoPE on q and k together."""
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = g.op("Reshape", [qkv, g.const([0, 0, h + 2 * kv, d])], scope + "/heads/Reshape")  # (B, T, H+2Hkv, D)
    qk, v = g.op("Split", [x, g.const([h + kv, kv])], scope + "/qk_v/Split", outputs=2, axis=2)
    qk = g.op("Transpose", [qk], scope + "/qk/Transpose", perm=[0, 2, 1, 3])  # (B, H+Hkv, T, D)
    if rope is not None:
        qk = rope(qk, scope + "/rope")
    q, k = g.op("Split", [qk, g.const([h, kv])], scope + "/q_k/Split", outputs=2, axis=1)
    return q, k, g.op("Transpose", [v], scope + "/v/Transpose", perm=[0, 2, 1, 3])


def _rope_tables(g, cfg, npt, flavor):
    """A function applying RoPE to (B, heads, T, D) at the absolute positions, LLaMA's half-split layout.

    ``ort``: onnxruntime's RotaryEmbedding over cos/sin tables of ``max_positions`` rows. ``portable``:
    x * cos + (x @ R) * sin, cos/sin computed in fp32 from the positions as the torch model does and
    R (D, D) the signed half swap with x @ R = cat(-x2, x1).
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    if flavor == "ort":
        freqs = np.arange(cfg.max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]  # (P, D/2)
        cos = g.initializer("rope.cos_cache", np.cos(freqs).astype(npt))
        sin = g.initializer("rope.sin_cache", np.sin(freqs).astype(npt))

        def apply(x, scope):
            return g.op("RotaryEmbedding", [x, "position_ids", cos, sin], scope + "/RotaryEmbedding",
                        domain="com.microsoft", interleaved=0)
        return apply

    pos = g.op("Cast", ["position_ids"], "/model/rope/Cast", to=TensorProto.FLOAT)
    pos = g.op("Unsqueeze", [pos, g.const([-1])], "/model/rope/Unsqueeze")  # (B, T, 1)
    freqs = g.op("Mul", [pos, g.const(inv_freq.astype(np.float32), np.float32)], "/model/rope/Mul")
    emb = g.op("Concat", [freqs, freqs], "/model/rope/Concat", axis=-1)  # (B, T, D)
    emb = g.op("Unsqueeze", [emb, g.const([1])], "/model/rope/heads/Unsqueeze")  # (B, 1, T, D)
    cos = g.op("Cast", [g.op("Cos", [emb], "/model/rope/Cos")], "/model/rope/cos/Cast", to=DTYPES_BY_NP[npt])
    sin = g.op("Cast", [g.op("Sin", [emb], "/model/rope/Sin")], "/model/rope/sin/Cast", to=DTYPES_BY_NP[npt])
    half = d // 2
    rot = np.zeros((d, d), dtype=np.float32)
    rot[np.arange(half) + half, np.arange(half)] = -1.0  # out[:half] = -x[half:]
    rot[np.arange(half), np.arange(half) + half] = 1.0  # out[half:] = x[:half]
    rotation = g.const(rot.astype(npt), npt)

    def apply(x, scope):
        rotated = g.op("MatMul", [x, rotation], scope + "/rotate/MatMul")
        return g.op("Add", [g.op("Mul", [x, cos], scope + "/cos/Mul"), g.op("Mul", [rotated, sin], scope + "/sin/Mul")],
                    scope + "/Add")
    return apply


