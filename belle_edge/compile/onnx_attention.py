"""``belle.DynamicMaskAttention``: our attention node's ONNX function body (what stock onnxruntime runs,
and what TensorRT replaces with our plugin), and the native alternative (ONNX ``Attention`` with an
explicit mask) for engines that must not depend on the plugin. Both trace :func:`belle_edge.mask.visible`
into ONNX ops, so the mask keeps its one definition.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import UnsupportedModelError
from ..mask import visible
from ..models.config import ModelConfig
from .onnx_builder import OPSET, GraphBuilder, Sym

DOMAIN = "belle"
ATTENTION_OP = "DynamicMaskAttention"
ATTN_INPUTS = ["query", "key", "value", "past_key", "past_value", "q_positions", "q_turns", "k_positions",
               "k_turns", "window", "sinks", "alibi_slopes"]
ATTN_OUTPUTS = ["output", "present_key", "present_value"]


def attention_node(g: GraphBuilder, cfg: ModelConfig, i: int, q: str, k: str, v: str, k_pos: str, k_turn: str,
                   slopes: str, scope: str) -> str:
    """One layer's attention as our node (function body in onnxruntime, plugin in TensorRT): past K/V in,
    present K/V out as the graph outputs of layer ``i``; returns the (B, T, H*D) output."""
    out, _, _ = g.op(ATTENTION_OP, [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                    "position_ids", "turn_ids", k_pos, k_turn, "mask_window", "mask_sinks", slopes],
                     f"{scope}/{ATTENTION_OP}", domain=DOMAIN,
                     outputs=[f"{scope}/output", f"present.{i}.key", f"present.{i}.value"],
                     num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                     scale=float(cfg.head_dim ** -0.5), plugin_namespace=DOMAIN, plugin_version="1")
    return out


def native_mask(g, cfg, k_pos, k_turn):
    """The mask for ``attention="native"``, once for all layers: (B, 1, T, S) booleans, plus p_k - p_q as
    (B, 1, T, S) float for ALiBi. Still belle_edge.mask.visible, traced."""
    s = "/model/mask"
    qp = Sym(g, g.op("Unsqueeze", ["position_ids", g.const([2])], s + "/q_pos/Unsqueeze"), s)  # (B, T, 1)
    qt = Sym(g, g.op("Unsqueeze", ["turn_ids", g.const([2])], s + "/q_turn/Unsqueeze"), s)
    kp = Sym(g, g.op("Unsqueeze", [k_pos, g.const([1])], s + "/k_pos/Unsqueeze"), s)  # (B, 1, S)
    kt = Sym(g, g.op("Unsqueeze", [k_turn, g.const([1])], s + "/k_turn/Unsqueeze"), s)
    allowed = visible(qp, qt, kp, kt, SimpleNamespace(window=Sym(g, "mask_window"), sinks=Sym(g, "mask_sinks")))
    allowed = g.op("Unsqueeze", [allowed.name, g.const([1])], s + "/Unsqueeze")  # (B, 1, T, S)
    rel = None
    if cfg.positions == "alibi":
        rel = g.op("Unsqueeze", [g.op("Cast", [(kp - qp).name], s + "/rel/Cast", to=TensorProto.FLOAT),
                                 g.const([1])], s + "/rel/Unsqueeze")
    return allowed, rel


def native_attention(g, cfg, i, q, k, v, mask, slopes, scope):
    """Concatenate the cache outside, then the ONNX ``Attention`` op (opset 23) with an explicit mask: what
    TensorRT maps to its own fused attention (it refuses past/present inside the op)."""
    allowed, rel = mask
    g.op("Concat", [f"past_key_values.{i}.key", k], scope + "/present_key/Concat", outputs=[f"present.{i}.key"],
         axis=2)
    g.op("Concat", [f"past_key_values.{i}.value", v], scope + "/present_value/Concat",
         outputs=[f"present.{i}.value"], axis=2)
    attn_mask = allowed
    if rel is not None:  # ALiBi: a float mask, slope * (p_k - p_q) where visible, -inf elsewhere
        bias = g.op("Mul", [g.const(slopes.reshape(1, -1, 1, 1), slopes.dtype.type),
                            g.op("CastLike", [rel, q], scope + "/alibi/CastLike")], scope + "/alibi/Mul")
        neg_inf = g.op("CastLike", [g.const(np.float32(-np.inf), np.float32), q], scope + "/neg_inf/CastLike")
        attn_mask = g.op("Where", [allowed, bias, neg_inf], scope + "/alibi/Where")
    y = g.op("Attention", [q, f"present.{i}.key", f"present.{i}.value", attn_mask], scope + "/Attention",
             scale=float(cfg.head_dim ** -0.5))  # (B, H, T, D)
    y = g.op("Transpose", [y], scope + "/output/Transpose", perm=[0, 2, 1, 3])
    return g.op("Reshape", [y, g.const([0, 0, cfg.q_size])], scope + "/output/Reshape")


def attention_function(cfg: ModelConfig) -> onnx.FunctionProto:
    """``belle.DynamicMaskAttention`` in standard ops, specialised to this model's head layout (the sizes
    are constants, so no shape arithmetic runs per layer; a model without ALiBi gets no bias subgraph).

    query (B, H, T, D), key/value (B, Hkv, T, D), past_key/value (B, Hkv, P, D), q_positions/q_turns (B, T),
    k_positions/k_turns (B, S), window, sinks (), alibi_slopes (H,) (unused without ALiBi)
    -> output (B, T, H*D), present_key/value (B, Hkv, S, D)::

        present_k = past_k ++ key                 (B, Hkv, S, D)
        q_g       = query as (B, Hkv, G*T, D)     G = H / Hkv: query heads grouped per KV head
        scores    = q_g @ present_kᵀ * D^-½        (B, Hkv, G*T, S)   [+ slope * (p_k - p_q), ALiBi]
        scores    = where(visible(...), scores, -inf)   the mask tiled over the G query heads
        output    = softmax(scores) @ present_v -> (B, T, Hkv*G*D)

    The mask subgraph depends only on the positions, turns, W and S, so onnxruntime computes it once for
    all layers (common-subexpression elimination after inlining).
    """
    g = GraphBuilder(as_function=True)
    s = "/attn"
    kv, grp, d = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    if cfg.positions == "alibi" and grp != 1:
        raise UnsupportedModelError("ALiBi with grouped KV heads is not supported by the export")
    q, k, v, past_k, past_v, q_pos, q_turn, k_pos, k_turn, window, sinks, slopes = ATTN_INPUTS
    g.op("Concat", [past_k, k], s + "/present_key/Concat", outputs=["present_key"], axis=2)
    g.op("Concat", [past_v, v], s + "/present_value/Concat", outputs=["present_value"], axis=2)
    q_g = g.op("Reshape", [q, g.const([0, kv, -1, d])], s + "/q_grouped/Reshape")  # (B, Hkv, G*T, D)
    k_t = g.op("Transpose", ["present_key"], s + "/k_t/Transpose", perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [q_g, k_t], s + "/scores/MatMul")  # (B, Hkv, G*T, S)
    scale = g.op("CastLike", [g.const(np.float32(d ** -0.5), np.float32), q], s + "/scale/CastLike")
    scores = g.op("Mul", [scores, scale], s + "/scores/Mul")

    # the mask: belle_edge.mask.visible itself, traced into ONNX ops
    qp = Sym(g, g.op("Unsqueeze", [q_pos, g.const([2])], s + "/q_pos/Unsqueeze"), s + "/mask")  # (B, T, 1)
    qt = Sym(g, g.op("Unsqueeze", [q_turn, g.const([2])], s + "/q_turn/Unsqueeze"), s + "/mask")
    kp = Sym(g, g.op("Unsqueeze", [k_pos, g.const([1])], s + "/k_pos/Unsqueeze"), s + "/mask")  # (B, 1, S)
    kt = Sym(g, g.op("Unsqueeze", [k_turn, g.const([1])], s + "/k_turn/Unsqueeze"), s + "/mask")
    allowed = visible(qp, qt, kp, kt, SimpleNamespace(window=Sym(g, window), sinks=Sym(g, sinks)))  # (B, T, S)
    allowed = g.op("Unsqueeze", [allowed.name, g.const([1])], s + "/mask/Unsqueeze")  # (B, 1, T, S)
    if grp > 1:  # rows of q_g are (g, t) pairs, g-major
        allowed = g.op("Tile", [allowed, g.const([1, 1, grp, 1])], s + "/mask/Tile")  # (B, 1, G*T, S)

    if cfg.positions == "alibi":  # MHA: rows are (head, t); slope * (p_k - p_q), as in the torch model
        rel = g.op("Cast", [(kp - qp).name], s + "/alibi/Cast", to=TensorProto.FLOAT)  # (B, T, S)
        rel = g.op("CastLike", [g.op("Unsqueeze", [rel, g.const([1])], s + "/alibi/Unsqueeze"), q],
                   s + "/alibi/CastLike")  # (B, 1, T, S)
        bias = g.op("Mul", [g.op("Reshape", [slopes, g.const([1, -1, 1, 1])], s + "/alibi/Reshape"), rel],
                    s + "/alibi/Mul")
        scores = g.op("Add", [scores, bias], s + "/alibi/Add")
    neg_inf = g.op("CastLike", [g.const(np.float32(-np.inf), np.float32), q], s + "/neg_inf/CastLike")
    scores = g.op("Where", [allowed, scores, neg_inf], s + "/mask/Where")
    probs = g.op("Softmax", [scores], s + "/Softmax", axis=-1)
    ctx = g.op("MatMul", [probs, "present_value"], s + "/context/MatMul")  # (B, Hkv, G*T, D)
    ctx = g.op("Reshape", [ctx, g.const([0, kv, grp, -1, d])], s + "/context/Reshape")  # (B, Hkv, G, T, D)
    ctx = g.op("Transpose", [ctx], s + "/context/Transpose", perm=[0, 3, 1, 2, 4])  # (B, T, Hkv, G, D)
    g.op("Reshape", [ctx, g.const([0, 0, kv * grp * d])], s + "/output/Reshape", outputs=["output"])
    return helper.make_function(DOMAIN, ATTENTION_OP, ATTN_INPUTS, ATTN_OUTPUTS, g.nodes,
                                [helper.make_opsetid("", OPSET)],
                                attributes=["num_heads", "num_kv_heads", "head_dim", "scale", "plugin_namespace",
                                            "plugin_version"])
