"""The export pass: canonical model -> one ONNX graph for prefill and decode, with KV-cache inputs/outputs.

Contract (``B`` batch, ``T`` new tokens, ``P`` cached tokens, ``S = P + T``; all dims dynamic, P may be 0):

=============================  ======  ==============================  =========================================
name                           dtype   shape                           meaning
=============================  ======  ==============================  =========================================
input_ids                      int64   [B, T]                          new tokens
position_ids                   int64   [B, T]                          their absolute positions
turn_ids                       int64   [B, T]                          their turns (0 = system)
past_position_ids              int64   [B, P]                          positions of the cached keys
past_turn_ids                  int64   [B, P]                          turns of the cached keys
mask_window                    int64   []                              W; ``WINDOW_OFF`` = plain causal
mask_sinks                     int64   []                              S (sink tokens)
num_logits_to_keep             int64   []                              logits for the last k new tokens
past_key_values.{i}.key        float   [B, kv_heads, P, head_dim]      layer i's cached keys (RoPE applied)
past_key_values.{i}.value      float   [B, kv_heads, P, head_dim]
logits (output)                float32 [B, k, vocab]
present.{i}.key (output)       float   [B, kv_heads, S, head_dim]      past + new, for the next call
present.{i}.value (output)     float   [B, kv_heads, S, head_dim]
=============================  ======  ==============================  =========================================

"float" is float32 or float16 (``dtype``); logits are always float32. Attention is one node
``belle.DynamicMaskAttention`` (version 1) per layer; its model-local ONNX function body (standard ops) lets
stock onnxruntime run it, and a TensorRT plugin with the same identity can replace it. Query heads are
grouped per KV head (no repeated K/V). The mask inside the body is :func:`belle_edge.mask.visible` traced
into ONNX. Tied embeddings are stored once (the LM head is a ``Gemm`` with ``transB`` on the embedding).
Weights larger than 1 KiB go to ``model.onnx.data`` (external data), written tensor by tensor while
the graph is built.

Per layer, LLaMA (BLOOM: LayerNormalization, GELU MLP, ALiBi slopes instead of RoPE)::

    x ─ RMSNorm ─┬─ q_proj ─ RoPE ─┐
                 ├─ k_proj ─ RoPE ─┼─ DynamicMaskAttention ─ o_proj ─ + x ─ RMSNorm ─ SwiGLU ─ + ─▶
                 └─ v_proj ────────┘      (past K/V in, present K/V out)
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..mask import WINDOW_OFF, visible  # noqa: F401  (WINDOW_OFF: the mask_window input's 'off')
from ..models.config import ModelConfig
from .onnx_builder import DTYPES, NP_DTYPES, ExternalData, GraphBuilder, Sym
from .quantize import BlockQuantized

OPSET = 23
DOMAIN = "belle"
ATTENTION_OP = "DynamicMaskAttention"
ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"

ATTN_INPUTS = ["query", "key", "value", "past_key", "past_value", "q_positions", "q_turns", "k_positions",
               "k_turns", "window", "sinks", "alibi_slopes"]
ATTN_OUTPUTS = ["output", "present_key", "present_value"]


def export_onnx(cfg: ModelConfig, state_dict: dict, out_dir: str, *, dtype: str = "float32",
                quantized: dict[str, BlockQuantized] | None = None, accuracy_level: int = 4) -> dict:
    """Write ``model.onnx`` (+ ``model.onnx.data``) into ``out_dir``; returns the manifest record.

    ``quantized`` (from the quantize pass) turns those weights' MatMuls into ``com.microsoft::MatMulNBits``
    (``accuracy_level`` 4: int8 activations inside, the fast CPU path) and a quantized tied embedding into
    ``GatherBlockQuantized`` over the same codes, so it is still stored once.
    """
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r}")
    quantized = quantized or {}
    weights = {k: v.detach().float().cpu().numpy() for k, v in state_dict.items() if k not in quantized}
    os.makedirs(out_dir, exist_ok=True)
    external = ExternalData(out_dir, DATA_FILE)
    try:
        model = build_model(cfg, weights, dtype=dtype, quantized=quantized, accuracy_level=accuracy_level,
                            external=external)
    finally:
        external.close()
    path = os.path.join(out_dir, ONNX_FILE)
    onnx.save_model(model, path)  # the graph only: every large weight is already in model.onnx.data
    onnx.checker.check_model(path, full_check=True)  # structure + shape inference, reading the saved file
    return {
        "onnx": ONNX_FILE, "data": DATA_FILE, "opset": OPSET, "dtype": dtype,
        "attention_op": f"{DOMAIN}::{ATTENTION_OP}@1", "quantized_matmuls": len(quantized),
        "accuracy_level": accuracy_level if quantized else None,
        "bytes": os.path.getsize(path) + os.path.getsize(os.path.join(out_dir, DATA_FILE)),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def build_model(cfg: ModelConfig, weights: dict[str, np.ndarray], *, dtype: str = "float32",
                quantized: dict[str, BlockQuantized] | None = None, accuracy_level: int = 4,
                external: ExternalData | None = None) -> onnx.ModelProto:
    g = GraphBuilder(external=external)
    ft, npt = DTYPES[dtype], NP_DTYPES[dtype]
    quantized = quantized or {}
    if quantized and dtype != "float32":
        raise ValueError("quantized weights are exported with float32 activations")
    W = lambda name: g.initializer(name, weights[name].astype(npt))  # noqa: E731

    def Wt(name):  # a linear's weight as MatMul's B [in, out], or its quantized form
        if name in quantized:
            return _QuantizedWeight(g, name, quantized[name], accuracy_level)
        return g.initializer(name + ".T", weights[name].T.astype(npt))

    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, s) for n, s in (
        ("input_ids", ["batch", "seq"]), ("position_ids", ["batch", "seq"]), ("turn_ids", ["batch", "seq"]),
        ("past_position_ids", ["batch", "past_seq"]), ("past_turn_ids", ["batch", "past_seq"]),
        ("mask_window", []), ("mask_sinks", []), ("num_logits_to_keep", []))]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "keep", cfg.vocab_size])]
    kv_shape = ["batch", cfg.num_kv_heads, "past_seq", cfg.head_dim]
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", ft, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", ft,
                                                         ["batch", cfg.num_kv_heads, "total_seq", cfg.head_dim]))

    k_pos = g.op("Concat", ["past_position_ids", "position_ids"], "/model/mask/key_positions/Concat", axis=1)
    k_turn = g.op("Concat", ["past_turn_ids", "turn_ids"], "/model/mask/key_turns/Concat", axis=1)

    head_q = quantized.get("embed.weight") if cfg.tie_embeddings else None
    if head_q is not None and head_q.offsets is None:
        x = _QuantizedWeight(g, "embed.weight", head_q, accuracy_level).gather("input_ids", "/model/embed")
    else:
        x = g.op("Gather", [g.initializer("embed.weight", _dense(weights, quantized, "embed.weight", npt)),
                            "input_ids"], "/model/embed/Gather")
    if cfg.embed_norm:
        x = _norm(g, cfg, x, "embed_norm", W, "/model/embed_norm")
    rope = _rope_tables(g, cfg, npt) if cfg.positions == "rope" else None

    for i in range(cfg.num_layers):
        p, s = f"layers.{i}.", f"/model/layers.{i}"
        h = _norm(g, cfg, x, p + "attn_norm", W, s + "/attn_norm")
        q, k, v = (_linear(g, h, p + f"attn.{n}_proj", Wt, W, cfg.attention_bias, f"{s}/attn/{n}_proj", weights)
                   for n in ("q", "k", "v"))
        q = _heads(g, q, cfg.num_heads, cfg.head_dim, f"{s}/attn/q_heads")
        k = _heads(g, k, cfg.num_kv_heads, cfg.head_dim, f"{s}/attn/k_heads")
        v = _heads(g, v, cfg.num_kv_heads, cfg.head_dim, f"{s}/attn/v_heads")
        if rope is not None:
            q = _apply_rope(g, q, rope, f"{s}/attn/q_rope")
            k = _apply_rope(g, k, rope, f"{s}/attn/k_rope")
        slopes = (weights[p + "attn.alibi_slopes"] if cfg.positions == "alibi"
                  else np.zeros(cfg.num_heads, dtype=np.float32))  # LLaMA: no bias, same node signature
        attn, _, _ = g.op(ATTENTION_OP, [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                         "position_ids", "turn_ids", k_pos, k_turn, "mask_window", "mask_sinks",
                                         g.initializer(p + "attn.alibi_slopes", slopes.astype(npt))],
                          f"{s}/attn/{ATTENTION_OP}", domain=DOMAIN,
                          outputs=[f"{s}/attn/output", f"present.{i}.key", f"present.{i}.value"],
                          num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                          scale=float(cfg.head_dim ** -0.5))
        o = _linear(g, attn, p + "attn.o_proj", Wt, W, cfg.attention_bias, f"{s}/attn/o_proj", weights)
        x = g.op("Add", [x, o], f"{s}/attn/residual/Add")
        h = _norm(g, cfg, x, p + "mlp_norm", W, s + "/mlp_norm")
        x = g.op("Add", [x, _mlp(g, cfg, h, p + "mlp.", Wt, W, f"{s}/mlp", weights)], f"{s}/mlp/residual/Add")

    # logits only for the last k new tokens: a prefill needs one row, an evaluation all of them
    start = g.op("Neg", ["num_logits_to_keep"], "/model/keep/Neg")
    x = g.op("Slice", [x, g.op("Unsqueeze", [start, g.const([0])], "/model/keep/Unsqueeze"),
                       g.const([2**62]), g.const([1])], "/model/keep/Slice")
    x = _norm(g, cfg, x, "norm", W, "/model/norm")
    flat = g.op("Reshape", [x, g.const([-1, cfg.hidden_size])], "/model/lm_head/flatten/Reshape")
    head = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"
    if head in quantized:
        logits = _QuantizedWeight(g, head, quantized[head], accuracy_level).matmul(flat, "/model/lm_head")
    elif cfg.tie_embeddings:
        logits = g.op("Gemm", [flat, "embed.weight"], "/model/lm_head/Gemm", transB=1)  # tied: stored once
    else:
        logits = g.op("Gemm", [flat, W("lm_head.weight")], "/model/lm_head/Gemm", transB=1)
    batch = g.op("Shape", ["input_ids"], "/model/lm_head/batch/Shape", start=0, end=1)
    shape = g.op("Concat", [batch, g.const([-1, cfg.vocab_size])], "/model/lm_head/shape/Concat", axis=0)
    logits = g.op("Reshape", [logits, shape], "/model/lm_head/Reshape")
    g.op("Cast", [logits], "/model/logits/Cast", outputs=["logits"], to=TensorProto.FLOAT)

    graph = helper.make_graph(g.nodes, "belle_edge", inputs, outputs, initializer=g.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)]
    if quantized:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    return helper.make_model(graph, opset_imports=opsets,
                             functions=[attention_function()], ir_version=10, producer_name="belle_edge")


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
        """x (..., K) @ Wᵀ -> (..., N); with offsets, + blocksum(x) @ offsetᵀ (see quantize.py)."""
        n, k = self.q.shape
        g = self.g
        y = g.op("MatMulNBits", [x, self.codes, self.scales, self.zero_points], scope + "/MatMulNBits",
                 domain="com.microsoft", K=k, N=n, bits=self.q.bits, block_size=self.q.block_size,
                 accuracy_level=self.accuracy_level)
        if self.offsets_t is None:
            return y
        lead = g.op("Shape", [x], scope + "/offsets/Shape", start=0, end=-1)
        shape = g.op("Concat", [lead, g.const([k // self.q.block_size, self.q.block_size])],
                     scope + "/offsets/shape/Concat", axis=0)
        blocks = g.op("Reshape", [x, shape], scope + "/offsets/Reshape")  # (..., K/block, block)
        sums = g.op("ReduceSum", [blocks, g.const([-1])], scope + "/offsets/ReduceSum", keepdims=0)
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


def _norm(g, cfg, x, name, W, scope):
    if cfg.norm == "rms":
        return g.op("RMSNormalization", [x, W(name + ".weight")], scope + "/RMSNormalization",
                    axis=-1, epsilon=cfg.norm_eps)
    return g.op("LayerNormalization", [x, W(name + ".weight"), W(name + ".bias")], scope + "/LayerNormalization",
                axis=-1, epsilon=cfg.norm_eps)


def _linear(g, x, name, Wt, W, bias, scope, weights):
    w = Wt(name + ".weight")
    y = w.matmul(x, scope) if isinstance(w, _QuantizedWeight) else g.op("MatMul", [x, w], scope + "/MatMul")
    if bias and name + ".bias" in weights:
        y = g.op("Add", [y, W(name + ".bias")], scope + "/Add")
    return y


def _mlp(g, cfg, h, p, Wt, W, scope, weights):
    up = _linear(g, h, p + "up_proj", Wt, W, cfg.mlp_bias, scope + "/up_proj", weights)
    if cfg.mlp == "swiglu":
        gate = _linear(g, h, p + "gate_proj", Wt, W, cfg.mlp_bias, scope + "/gate_proj", weights)
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], scope + "/act/Sigmoid")], scope + "/act/Mul")
        inner = g.op("Mul", [act, up], scope + "/Mul")
    else:
        inner = g.op("Gelu", [up], scope + "/act/Gelu", approximate="tanh")
    return _linear(g, inner, p + "down_proj", Wt, W, cfg.mlp_bias, scope + "/down_proj", weights)


def _heads(g, x, heads, head_dim, scope):
    # (B, T, heads*D) -> (B, heads, T, D)
    x = g.op("Reshape", [x, g.const([0, 0, heads, head_dim])], scope + "/Reshape")
    return g.op("Transpose", [x], scope + "/Transpose", perm=[0, 2, 1, 3])


def _rope_tables(g, cfg, npt):
    """cos, sin (B, 1, T, D) from the absolute positions, computed in fp32 as the torch model does."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    pos = g.op("Cast", ["position_ids"], "/model/rope/Cast", to=TensorProto.FLOAT)
    pos = g.op("Unsqueeze", [pos, g.const([-1])], "/model/rope/Unsqueeze")  # (B, T, 1)
    freqs = g.op("Mul", [pos, g.const(inv_freq.astype(np.float32), np.float32)], "/model/rope/Mul")
    emb = g.op("Concat", [freqs, freqs], "/model/rope/Concat", axis=-1)  # (B, T, D)
    emb = g.op("Unsqueeze", [emb, g.const([1])], "/model/rope/heads/Unsqueeze")  # (B, 1, T, D)
    cos = g.op("Cos", [emb], "/model/rope/Cos")
    sin = g.op("Sin", [emb], "/model/rope/Sin")
    if npt != np.float32:
        cos = g.op("Cast", [cos], "/model/rope/cos/Cast", to=TensorProto.FLOAT16)
        sin = g.op("Cast", [sin], "/model/rope/sin/Cast", to=TensorProto.FLOAT16)
    return cos, sin


def _apply_rope(g, x, rope, scope):
    # x * cos + rotate_half(x) * sin, rotate_half = cat(-x2, x1) (LLaMA's half-split layout)
    cos, sin = rope
    x1, x2 = g.op("Split", [x], scope + "/Split", outputs=2, axis=-1, num_outputs=2)
    rotated = g.op("Concat", [g.op("Neg", [x2], scope + "/Neg"), x1], scope + "/Concat", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], scope + "/cos/Mul"), g.op("Mul", [rotated, sin], scope + "/sin/Mul")],
                scope + "/Add")


# ---------------------------------------------------------------------------------------------- attention
def attention_function() -> onnx.FunctionProto:
    """``belle.DynamicMaskAttention`` in standard ops.

    query (B, H, T, D), key/value (B, Hkv, T, D), past_key/value (B, Hkv, P, D), q_positions/q_turns (B, T),
    k_positions/k_turns (B, S), window, sinks (), alibi_slopes (H,) (zeros: no ALiBi)
    -> output (B, T, H*D), present_key/value (B, Hkv, S, D)::

        present_k = past_k ++ key            (B, Hkv, S, D)
        q_g       = query as (B, Hkv, G*T, D)   G = H / Hkv: query heads grouped per KV head
        scores    = q_g @ present_kᵀ * D^-½  -> (B, Hkv, G, T, S) + slope * (p_k - p_q)
        scores    = where(visible(...), scores, -inf);  softmax over S
        output    = probs @ present_v -> (B, T, Hkv*G*D)
    """
    g = GraphBuilder(as_function=True)
    s = "/attn"
    q, k, v, past_k, past_v, q_pos, q_turn, k_pos, k_turn, window, sinks, slopes = ATTN_INPUTS
    g.op("Concat", [past_k, k], s + "/present_key/Concat", outputs=["present_key"], axis=2)
    g.op("Concat", [past_v, v], s + "/present_value/Concat", outputs=["present_value"], axis=2)

    kv_heads = g.op("Shape", [past_k], s + "/kv_heads/Shape", start=1, end=2)
    steps = g.op("Shape", [q], s + "/steps/Shape", start=2, end=3)
    head_dim = g.op("Shape", [q], s + "/head_dim/Shape", start=3, end=4)
    zero, minus1 = g.const([0]), g.const([-1])
    grouped = g.op("Concat", [zero, kv_heads, minus1, zero], s + "/grouped_shape/Concat", axis=0)
    q_g = g.op("Reshape", [q, grouped], s + "/q_grouped/Reshape")  # (B, Hkv, G*T, D)
    k_t = g.op("Transpose", ["present_key"], s + "/k_t/Transpose", perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [q_g, k_t], s + "/scores/MatMul")  # (B, Hkv, G*T, S)
    scale = g.op("Reciprocal", [g.op("Sqrt", [g.op("Cast", [head_dim], s + "/scale/Cast", to=TensorProto.FLOAT)],
                                     s + "/scale/Sqrt")], s + "/scale/Reciprocal")
    scores = g.op("Mul", [scores, g.op("CastLike", [scale, q], s + "/scale/CastLike")], s + "/scores/Mul")
    keys = g.op("Shape", ["present_key"], s + "/keys/Shape", start=2, end=3)
    split = g.op("Concat", [zero, zero, minus1, steps, keys], s + "/split_shape/Concat", axis=0)
    scores = g.op("Reshape", [scores, split], s + "/scores/Reshape")  # (B, Hkv, G, T, S)

    # the mask: belle_edge.mask.visible itself, traced into ONNX ops
    qp = Sym(g, g.op("Unsqueeze", [q_pos, g.const([2])], s + "/q_pos/Unsqueeze"), s + "/mask")  # (B, T, 1)
    qt = Sym(g, g.op("Unsqueeze", [q_turn, g.const([2])], s + "/q_turn/Unsqueeze"), s + "/mask")
    kp = Sym(g, g.op("Unsqueeze", [k_pos, g.const([1])], s + "/k_pos/Unsqueeze"), s + "/mask")  # (B, 1, S)
    kt = Sym(g, g.op("Unsqueeze", [k_turn, g.const([1])], s + "/k_turn/Unsqueeze"), s + "/mask")
    allowed = visible(qp, qt, kp, kt, SimpleNamespace(window=Sym(g, window), sinks=Sym(g, sinks)))  # (B, T, S)
    allowed = g.op("Unsqueeze", [allowed.name, g.const([1, 2])], s + "/mask/Unsqueeze")  # (B, 1, 1, T, S)

    rel = g.op("Cast", [(kp - qp).name], s + "/alibi/Cast", to=TensorProto.FLOAT)  # p_k - p_q, (B, T, S)
    rel = g.op("CastLike", [g.op("Unsqueeze", [rel, g.const([1, 2])], s + "/alibi/Unsqueeze"), q],
               s + "/alibi/CastLike")
    slope_shape = g.op("Concat", [g.const([1]), kv_heads, minus1, g.const([1, 1])], s + "/alibi/shape/Concat", axis=0)
    bias = g.op("Mul", [g.op("Reshape", [slopes, slope_shape], s + "/alibi/Reshape"), rel], s + "/alibi/Mul")
    scores = g.op("Add", [scores, bias], s + "/alibi/Add")
    neg_inf = g.op("CastLike", [g.const(-np.inf, np.float32), q], s + "/neg_inf/CastLike")
    scores = g.op("Where", [allowed, scores, neg_inf], s + "/mask/Where")
    probs = g.op("Softmax", [scores], s + "/Softmax", axis=-1)
    merged = g.op("Concat", [zero, zero, minus1, keys], s + "/merged_shape/Concat", axis=0)
    probs = g.op("Reshape", [probs, merged], s + "/probs/Reshape")  # (B, Hkv, G*T, S)
    ctx = g.op("MatMul", [probs, "present_value"], s + "/context/MatMul")  # (B, Hkv, G*T, D)
    ctx_split = g.op("Concat", [zero, zero, minus1, steps, head_dim], s + "/ctx_shape/Concat", axis=0)
    ctx = g.op("Reshape", [ctx, ctx_split], s + "/context/Reshape")  # (B, Hkv, G, T, D)
    ctx = g.op("Transpose", [ctx], s + "/context/Transpose", perm=[0, 3, 1, 2, 4])  # (B, T, Hkv, G, D)
    g.op("Reshape", [ctx, g.const([0, 0, -1])], s + "/output/Reshape", outputs=["output"])
    return helper.make_function(DOMAIN, ATTENTION_OP, ATTN_INPUTS, ATTN_OUTPUTS, g.nodes,
                                [helper.make_opsetid("", OPSET)],
                                attributes=["num_heads", "num_kv_heads", "head_dim", "scale"])
