"""The plugin-node variant of a weight-only GPU graph: every ``DequantizeLinear -> MatMul`` pair of the
contract (export_onnx.py) rewritten, one for one, into a ``belle.WeightOnlyGemm`` node with the same three
inputs (activations, codes, scales) — for TensorRT builds that should not trust the parser's fusion (it may
constant-fold the weights back to fp16: Orin's TensorRT 10.3, A100), where our GEMM plugin takes the node.

Like our attention node (onnx_attention.py), the node carries ``plugin_namespace="belle"`` and
``plugin_version="1"`` and has a model-local function body — the very ``DequantizeLinear -> MatMul`` it
replaced, with ``axis`` and ``block_size`` as attributes — so onnxruntime, and a TensorRT without our plugin,
still run it, and give the same numbers. The variant is a second graph file over the same weights file
(``model.onnx.data``): nothing is stored twice.
"""
from __future__ import annotations

import os

import onnx
from onnx import AttributeProto, helper

from .onnx_attention import DOMAIN

OP = "WeightOnlyGemm"
VERSION = "1"
FILE = "model.gemm_plugin.onnx"


def weight_only_function() -> onnx.FunctionProto:
    """``Y = X @ DequantizeLinear(codes, scales; axis, block_size)``."""
    dq = helper.make_node("DequantizeLinear", ["codes", "scales"], ["weights"], name="DequantizeLinear")
    for name in ("axis", "block_size"):
        dq.attribute.append(helper.make_attribute_ref(name, AttributeProto.INT))
    mm = helper.make_node("MatMul", ["X", "weights"], ["Y"], name="MatMul")
    from .onnx_builder import OPSET

    return helper.make_function(DOMAIN, OP, ["X", "codes", "scales"], ["Y"], [dq, mm],
                                [helper.make_opsetid("", OPSET)], attributes=["axis", "block_size"])


def write_plugin_variant(folder: str, onnx_file: str = "model.onnx", out_file: str = FILE) -> dict:
    """Rewrite ``folder/onnx_file`` into ``folder/out_file`` (same external data); returns the record."""
    model = onnx.load(os.path.join(folder, onnx_file), load_external_data=False)
    graph = model.graph
    producers = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    consumers: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            consumers[name] = consumers.get(name, 0) + 1
    nodes, dropped, replaced = [], set(), 0
    for n in graph.node:
        dq = producers.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) == 2 else None
        if dq is None or consumers[dq.output[0]] != 1:
            nodes.append(n)
            continue
        attrs = {a.name: a.i for a in dq.attribute}
        nodes.append(helper.make_node(OP, [n.input[0], dq.input[0], dq.input[1]], list(n.output),
                                      name=n.name.rsplit("/", 1)[0] + "/" + OP, domain=DOMAIN,
                                      axis=attrs.get("axis", 1), block_size=attrs.get("block_size", 0),
                                      plugin_namespace=DOMAIN, plugin_version=VERSION))
        dropped.add(dq.name)
        replaced += 1
    if not replaced:
        raise ValueError(f"{onnx_file}: no DequantizeLinear -> MatMul pair to rewrite (not a weight-only graph)")
    del graph.node[:]
    graph.node.extend(n for n in nodes if n.name not in dropped)
    model.functions.append(weight_only_function())
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    path = os.path.join(folder, out_file)
    onnx.save_model(model, path)
    onnx.checker.check_model(path, full_check=True)
    return {"file": out_file, "op": f"{DOMAIN}::{OP}@{VERSION}", "nodes": replaced}
