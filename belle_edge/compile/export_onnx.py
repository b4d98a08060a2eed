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

"float" is float32 or float16 (``dtype``); logits are always float32; ``mask_window`` takes
``belle_edge.mask.WINDOW_OFF`` for "off". Attention is one node
``belle.DynamicMaskAttention`` (version 1) per layer; its model-local ONNX function body (standard ops) lets
stock onnxruntime run it, and a TensorRT plugin with the same identity can replace it (the node carries
``plugin_namespace="belle"`` and ``plugin_version="1"``: TensorRT's parser looks plugins up by those). Query heads are
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
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..core.quantized import BlockQuantized, concat_rows
from ..core.stage import measured
from ..errors import UnsupportedModelError
from ..manifest import StageRecord
from ..mask import visible
from ..models.config import ModelConfig
from ..targets import Target
from .onnx_builder import DTYPES, NP_DTYPES, ExternalData, GraphBuilder, Sym

if TYPE_CHECKING:
    from .job import Job

DTYPES_BY_NP = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}

OPSET = 23
DOMAIN = "belle"
ATTENTION_OP = "DynamicMaskAttention"
ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"

FLAVORS = ("portable", "ort")
ATTENTION_MODES = ("plugin", "native")  # our node (function body / TensorRT plugin), or the ONNX Attention op
ATTN_INPUTS = ["query", "key", "value", "past_key", "past_value", "q_positions", "q_turns", "k_positions",
               "k_turns", "window", "sinks", "alibi_slopes"]
ATTN_OUTPUTS = ["output", "present_key", "present_value"]


@dataclass(frozen=True)
class ExportStage:
    """The export stage: the model in hand (plain or quantized) -> ``model.onnx`` + ``model.onnx.data`` and
    ``tokenizer.json`` in the artifact. A cpu artifact gets the ``ort`` flavor and our attention node; a GPU
    one the portable flavor TensorRT parses, with our plugin node or ONNX ``Attention`` (``attention``).
    Details recorded: what :func:`export_onnx` returns, and ``parameters``."""
    target: Target
    precision: str
    attention: str = "plugin"

    name = "export"
    reads = "checkpoint or quantized checkpoint (the previous stage's folder)"
    writes = "model.onnx, model.onnx.data, tokenizer.json"

    @property
    def dtype(self) -> str:
        return "float16" if self.precision in ("fp16", "bf16") else "float32"

    def run(self, job: "Job") -> StageRecord:
        ckpt = job.checkpoint()
        return measured(self, lambda: self._export(job), reads=ckpt.source,
                        writes=(ONNX_FILE, DATA_FILE, "tokenizer.json"))

    def _export(self, job: "Job") -> dict:
        ckpt = job.checkpoint()
        attention = self.attention if self.target.gpu else "plugin"
        if self.target.gpu and attention == "plugin":
            from .trt_plugin import check_plugin_shapes

            check_plugin_shapes(ckpt.config, where=ckpt.source)
        # a cpu artifact runs on onnxruntime: let it use its fused ops; TensorRT parses the portable one
        record = export_onnx(ckpt.config, ckpt.state_dict, job.artifact, dtype=self.dtype,
                             quantized=dict(ckpt.quantized) or None, flavor="portable" if self.target.gpu else "ort",
                             attention=attention)
        ckpt.tokenizer.save(os.path.join(job.artifact, "tokenizer.json"))
        job.exported, job.export = ckpt, record
        return {**record, "parameters": ckpt.parameters}


def export_onnx(cfg: ModelConfig, state_dict: dict, out_dir: str, *, dtype: str = "float32",
                quantized: dict[str, BlockQuantized] | None = None, accuracy_level: int = 4,
                flavor: str = "portable", attention: str = "plugin") -> dict:
    """Write ``model.onnx`` (+ ``model.onnx.data``) into ``out_dir``; returns the manifest record.

    ``quantized`` (from the quantize pass) turns those weights' MatMuls into ``com.microsoft::MatMulNBits``
    (``accuracy_level`` 4: int8 activations inside, the fast CPU path) and a quantized tied embedding into
    ``GatherBlockQuantized`` over the same codes, so it is still stored once.

    ``flavor``: ``portable`` uses standard ops only (what TensorRT parses); ``ort`` — for artifacts that run
    on onnxruntime — also uses its fused contrib ops where they save nodes: residual add + norm
    (``SkipSimplifiedLayerNormalization`` / ``SkipLayerNormalization``) and ``RotaryEmbedding``. Decoding
    one token runs every node once, so on a CPU the node count is a large part of the time.
    """
    if flavor not in FLAVORS:
        raise ValueError(f"export flavor {flavor!r}")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention {attention!r}")
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r}")
    quantized = quantized or {}
    weights = {k: v.detach().float().cpu().numpy() for k, v in state_dict.items() if k not in quantized}
    os.makedirs(out_dir, exist_ok=True)
    external = ExternalData(out_dir, DATA_FILE)
    try:
        model = build_model(cfg, weights, dtype=dtype, quantized=quantized, accuracy_level=accuracy_level,
                            external=external, flavor=flavor, attention=attention)
    finally:
        external.close()
    path = os.path.join(out_dir, ONNX_FILE)
    onnx.save_model(model, path)  # the graph only: every large weight is already in model.onnx.data
    onnx.checker.check_model(path, full_check=True)  # structure + shape inference, reading the saved file
    return {
        "onnx": ONNX_FILE, "data": DATA_FILE, "opset": OPSET, "dtype": dtype,
        "attention_op": f"{DOMAIN}::{ATTENTION_OP}@1", "flavor": flavor, "attention": attention,
        "quantized_matmuls": len(quantized),
        "accuracy_level": accuracy_level if quantized else None,
        "bytes": os.path.getsize(path) + os.path.getsize(os.path.join(out_dir, DATA_FILE)),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def build_model(cfg: ModelConfig, weights: dict[str, np.ndarray], *, dtype: str = "float32",
                quantized: dict[str, BlockQuantized] | None = None, accuracy_level: int = 4,
                external: ExternalData | None = None, flavor: str = "portable",
                attention: str = "plugin") -> onnx.ModelProto:
    g = GraphBuilder(external=external)
    ft, npt = DTYPES[dtype], NP_DTYPES[dtype]
    quantized = quantized or {}
    if quantized and dtype != "float32":
        raise ValueError("quantized weights are exported with float32 activations")
    W = lambda name: g.initializer(name, weights[name].astype(npt))  # noqa: E731

    def linear(x, names: list[str], bias: bool, scope: str):
        """x @ [W_a; W_b; ...]ᵀ (+ biases): sibling projections of one input fused into one MatMul."""
        if all(n + ".weight" in quantized for n in names):
            parts = [quantized[n + ".weight"] for n in names]
            fused = parts[0] if len(parts) == 1 else concat_rows(parts)
            y = _QuantizedWeight(g, _fused_name(names), fused, accuracy_level).matmul(x, scope)
        else:
            w = np.concatenate([_dense(weights, quantized, n + ".weight", np.float32) for n in names], axis=0)
            y = g.op("MatMul", [x, g.initializer(_fused_name(names) + ".weight.T", w.T.astype(npt))],
                     scope + "/MatMul")
        if bias and all(n + ".bias" in weights for n in names):
            b = np.concatenate([weights[n + ".bias"] for n in names])
            y = g.op("Add", [y, g.initializer(_fused_name(names) + ".bias", b.astype(npt))], scope + "/Add")
        return y

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
    rope = _rope_tables(g, cfg, npt, flavor) if cfg.positions == "rope" else None
    norm = _Norms(g, cfg, W, flavor)

    function = attention_function(cfg) if attention == "plugin" else None
    native_mask = _native_mask(g, cfg, k_pos, k_turn) if attention == "native" else None
    h = norm.first(x, "layers.0.attn_norm", "/model/layers.0/attn_norm")
    for i in range(cfg.num_layers):
        p, s = f"layers.{i}.", f"/model/layers.{i}"
        qkv = linear(h, [p + "attn.q_proj", p + "attn.k_proj", p + "attn.v_proj"], cfg.attention_bias,
                     f"{s}/attn/qkv_proj")
        q, k, v = _split_heads(g, cfg, qkv, rope, f"{s}/attn")
        slopes = (weights[p + "attn.alibi_slopes"] if cfg.positions == "alibi"
                  else np.zeros(cfg.num_heads, dtype=np.float32))  # LLaMA: unused, same node signature
        if native_mask is not None:
            attn = _native_attention(g, cfg, i, q, k, v, native_mask, slopes.astype(npt), f"{s}/attn")
        else:
            attn, _, _ = g.op(ATTENTION_OP, [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                             "position_ids", "turn_ids", k_pos, k_turn, "mask_window", "mask_sinks",
                                             g.initializer(p + "attn.alibi_slopes", slopes.astype(npt))],
                              f"{s}/attn/{ATTENTION_OP}", domain=DOMAIN,
                              outputs=[f"{s}/attn/output", f"present.{i}.key", f"present.{i}.value"],
                              num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                              scale=float(cfg.head_dim ** -0.5), plugin_namespace=DOMAIN, plugin_version="1")
        o = linear(attn, [p + "attn.o_proj"], cfg.attention_bias, f"{s}/attn/o_proj")
        h, x = norm.add_then_norm(o, x, p + "mlp_norm", f"{s}/mlp_norm")  # x += o; h = norm(x)
        if cfg.mlp == "swiglu":
            gate, up = g.op("Split", [linear(h, [p + "mlp.gate_proj", p + "mlp.up_proj"], cfg.mlp_bias,
                                             f"{s}/mlp/gate_up_proj"), g.const([cfg.intermediate_size] * 2)],
                            f"{s}/mlp/Split", outputs=2, axis=-1)
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{s}/mlp/act/Sigmoid")], f"{s}/mlp/act/Mul")
            inner = g.op("Mul", [act, up], f"{s}/mlp/Mul")
        else:
            inner = g.op("Gelu", [linear(h, [p + "mlp.up_proj"], cfg.mlp_bias, f"{s}/mlp/up_proj")],
                         f"{s}/mlp/act/Gelu", approximate="tanh")
        down = linear(inner, [p + "mlp.down_proj"], cfg.mlp_bias, f"{s}/mlp/down_proj")
        last = i == cfg.num_layers - 1
        h, x = norm.add_then_norm(down, x, "norm" if last else f"layers.{i + 1}.attn_norm",
                                  "/model/norm" if last else f"/model/layers.{i + 1}/attn_norm")

    # logits only for the last k new tokens: a prefill needs one row, an evaluation all of them
    start = g.op("Neg", ["num_logits_to_keep"], "/model/keep/Neg")
    x = g.op("Slice", [h, g.op("Unsqueeze", [start, g.const([0])], "/model/keep/Unsqueeze"),
                       g.const([2**62]), g.const([1])], "/model/keep/Slice")
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
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(DOMAIN, 1)] if function else [])
    if quantized or flavor == "ort":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    return helper.make_model(graph, opset_imports=opsets,
                             functions=[function] if function else [], ir_version=10, producer_name="belle_edge")


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


def _native_mask(g, cfg, k_pos, k_turn):
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


def _native_attention(g, cfg, i, q, k, v, mask, slopes, scope):
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


# ---------------------------------------------------------------------------------------------- attention
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
