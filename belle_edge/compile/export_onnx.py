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

**Weight-only linears** (GPU targets at int4/int8, compile/weight_only.py): each projection's ``MatMul``
reads its weight from a ``DequantizeLinear`` (opset 21+) over integer initializers — the form TensorRT's
parser fuses into a weight-only GEMM, which onnxruntime also runs:

=========================  =====================  =====================  ===================================
weight (N out, K in)       codes initializer      scales initializer     DequantizeLinear
=========================  =====================  =====================  ===================================
int4 linear                INT4 [K, N], signed    fp16 [K/128, N]        axis=0, block_size=128 (symmetric)
int8 linear                INT8 [K, N], signed    fp16 [N]               axis=1 (per output channel)
int8 LM head (``--head``)  INT8 [C, V]            fp16 [V]               axis=1; a tied embedding gathers
                                                                         rows of its transpose (stored once)
=========================  =====================  =====================  ===================================

No zero points (TensorRT takes none for INT4). q/k/v and gate/up stay fused along N, as in fp16. The
same folder holds ``model.gemm_plugin.onnx`` (gemm_plugin_variant.py): each pair above as one
``belle.WeightOnlyGemm`` node for our GEMM plugin, over the same ``model.onnx.data``.

The graph is built by onnx_graph.py (the decoder, with a sketch of a layer) and onnx_attention.py (our
attention node and its function body, or ONNX ``Attention``), on onnx_builder.py.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx

from ..core.quantized import BlockQuantized
from ..core.stage import measured
from ..manifest import StageRecord
from ..mask import RULE_VERSION
from ..models.config import ModelConfig
from ..targets import Target
from .onnx_attention import ATTENTION_OP, DOMAIN
from .onnx_builder import DTYPES, OPSET, ExternalData
from .onnx_graph import build_model

if TYPE_CHECKING:
    from .job import Job

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
FLAVORS = ("portable", "ort")
ATTENTION_MODES = ("plugin", "native")  # our node (function body / TensorRT plugin), or the ONNX Attention op


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
    writes = "model.onnx, model.onnx.data, tokenizer.json (+ model.gemm_plugin.onnx: GPU int8/int4)"

    @property
    def dtype(self) -> str:
        return "float16" if self.target.gpu or self.precision in ("fp16", "bf16") else "float32"

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
        if self.target.gpu and ckpt.quantized:  # the same graph with our GEMM plugin node per weight-only MatMul
            from .gemm_plugin_variant import write_plugin_variant

            record["gemm_plugin_variant"] = write_plugin_variant(job.artifact, ONNX_FILE)
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
        "mask_rule": RULE_VERSION,  # the rule traced into the graph (mask.visible as this version states it)
        "quantized_matmuls": len(quantized),
        "accuracy_level": accuracy_level if quantized else None,
        "bytes": os.path.getsize(path) + os.path.getsize(os.path.join(out_dir, DATA_FILE)),
        "seconds": round(time.perf_counter() - t0, 2),
    }
