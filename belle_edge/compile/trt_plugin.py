"""The build-time side of our TensorRT plugin: ``belle::DynamicMaskAttention`` version "1".

TensorRT's ONNX parser turns each ``belle.DynamicMaskAttention`` node (it carries ``plugin_namespace`` and
``plugin_version``) into a plugin layer when a creator with that identity is registered. This Python
``IPluginV3`` only answers what the builder asks — output shapes and types, supported formats, the fields
to serialize — so engines with the plugin build anywhere, GPU or not. It never runs: at run time the C++
plugin (kernels/, same name, version, namespace and fields) serves the layer.

Inputs (see compile/export_onnx.py): 0 query (B,H,T,D), 1 key, 2 value (B,Hkv,T,D), 3 past_key,
4 past_value (B,Hkv,P,D), 5 q_positions, 6 q_turns (B,T), 7 k_positions, 8 k_turns (B,S), 9 window,
10 sinks (), 11 alibi_slopes (H,). Outputs: 0 output (B,T,H*D), 1 present_key, 2 present_value (B,Hkv,P+T,D).
"""
from __future__ import annotations

import numpy as np

NAME, VERSION, NAMESPACE = "DynamicMaskAttention", "1", "belle"
INT_INPUTS = (5, 6, 7, 8, 9, 10)
DECODE_KEYS_PER_SPLIT = 128  # kernels/src/decode.cu MIN_KEYS_PER_SPLIT: sizes the decode workspace
FIELDS = (("num_heads", "int"), ("num_kv_heads", "int"), ("head_dim", "int"), ("scale", "float"))


def check_plugin_shapes(cfg, *, where: str) -> None:
    """Refuse, at compile time, an engine whose plugin layers the kernels would refuse on the device
    (a pruned BLOOM's head size, say)."""
    from ..errors import UnsupportedModelError
    from ..targets import KERNELS

    why = KERNELS.refusal(head_dim=cfg.head_dim, group=cfg.group_size)
    if why:
        raise UnsupportedModelError(
            f"{where}: head size {cfg.head_dim} with {cfg.group_size} query heads per KV head: our attention plugin "
            f"cannot run it ({why}); compile with --attention native (TensorRT's own attention)")


def make_creator(trt):
    """A plugin creator bound to this TensorRT module (``tensorrt`` or ``tensorrt_rtx``). The classes are
    made here, not at import, because their base classes are the TensorRT module's, known only at build."""
    plugin_class = _plugin_class(trt)
    field_type, field_dtype = _field_types(trt)

    class DynamicMaskAttentionCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = NAME, NAMESPACE, VERSION
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(name, np.array([], dtype=field_dtype[kind]), field_type[kind])
                 for name, kind in FIELDS])

        def create_plugin(self, name, fields, phase):
            values = {f.name: np.asarray(f.data).reshape(-1)[0].item() for f in fields}
            missing = [n for n, _ in FIELDS if n not in values]
            if missing:
                raise ValueError(f"{NAMESPACE}::{NAME}: fields missing: {missing}")
            return plugin_class(values)

    return DynamicMaskAttentionCreator()


def _field_types(trt):
    return ({"int": trt.PluginFieldType.INT32, "float": trt.PluginFieldType.FLOAT32},
            {"int": np.int32, "float": np.float32})


def _plugin_class(trt):
    """The build-time IPluginV3: answers the builder's questions (shapes, types, formats, workspace, fields).
    Long only because it is a class body of nine short methods, made here for the same reason as the creator."""
    field_type, field_dtype = _field_types(trt)
    float_types = (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16)

    class DynamicMaskAttentionPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
                                     trt.IPluginV3OneRuntime):
        def __init__(self, fields: dict | None = None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.num_outputs = 3
            self.plugin_namespace, self.plugin_name, self.plugin_version = NAMESPACE, NAME, VERSION
            self.fields = dict(fields or {})

        def get_capability_interface(self, type):
            return self

        def get_output_data_types(self, input_types):
            return [input_types[0]] * 3

        def get_output_shapes(self, inputs, shape_inputs, builder):
            q, k, past = inputs[0], inputs[1], inputs[3]
            width = builder.constant(int(self.fields["num_heads"]) * int(self.fields["head_dim"]))
            present = trt.DimsExprs([past[0], past[1], builder.operation(trt.DimensionOperation.SUM, past[2], k[2]),
                                     past[3]])
            return [trt.DimsExprs([q[0], q[2], width]), present, present]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos in INT_INPUTS:
                return desc.type == trt.DataType.INT64
            return desc.type in float_types and desc.type == in_out[0].desc.type

        def configure_plugin(self, inputs, outputs):
            pass

        def on_shape_change(self, inputs, outputs):
            pass

        def get_workspace_size(self, inputs, outputs):
            # The engine keeps the size the build-time plugin reports, and the C++ plugin's decode needs it:
            # belle_attention_workspace_size's GPU-independent bound (kernels/include/belle_attention.h).
            batch = int(inputs[0].max[0])
            keys = int(inputs[3].max[2]) + int(inputs[1].max[2])
            heads, dim = int(self.fields["num_heads"]), int(self.fields["head_dim"])
            return batch * heads * -(-keys // DECODE_KEYS_PER_SPLIT) * (dim + 2) * 4

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([
                trt.PluginField(name, np.array([self.fields[name]], dtype=field_dtype[kind]), field_type[kind])
                for name, kind in FIELDS])

        def enqueue(self, *args):
            raise RuntimeError("belle::DynamicMaskAttention: the Python plugin only builds engines; "
                               "load the C++ plugin library (kernels/) to run them")

        def attach_to_context(self, context):
            return self.clone()

        def clone(self):
            return DynamicMaskAttentionPlugin(self.fields)

    return DynamicMaskAttentionPlugin


def register(trt):
    """Register the creator with TensorRT's plugin registry; keep the returned object alive while building."""
    creator = make_creator(trt)
    trt.get_plugin_registry().register_creator(creator, NAMESPACE)
    return creator
