"""A small ONNX graph builder: named nodes, deduplicated constants, and ``Sym`` values whose Python
operators emit ONNX nodes — so :func:`belle_edge.mask.visible` itself, traced with ``Sym`` arguments,
writes the mask subgraph of the attention function (the mask keeps exactly one definition).

Node naming follows ``/model/layers.{i}/attn/q_proj/MatMul``; a node's first output is ``{node}/output_0``.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 23  # the ONNX opset of every graph we write (Attention, RMSNormalization: 23)
DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
NP_DTYPES = {"float32": np.float32, "float16": np.float16}


class ExternalData:
    """Writes initializers straight into the external data file as the graph is built, so a multi-GB model
    never sits in memory as protobuf: peak memory stays near one tensor beyond the weights themselves."""

    ALIGN = 64

    def __init__(self, folder: str, location: str, *, threshold: int = 1024):
        self.location, self.threshold = location, threshold
        self._file = open(os.path.join(folder, location), "wb")

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes < self.threshold:
            return numpy_helper.from_array(array, name)
        offset = self._write(array.tobytes())  # one tensor's copy at a time
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        for key, value in (("location", self.location), ("offset", offset), ("length", array.nbytes)):
            t.external_data.add(key=key, value=str(value))
        t.data_location = TensorProto.EXTERNAL
        return t

    def int4_tensor(self, name: str, values: np.ndarray) -> onnx.TensorProto:
        """A signed INT4 initializer, two values per byte, the first in the low nibble (ONNX's packing)."""
        return _int4_tensor(name, values, self if values.size // 2 >= self.threshold else None)

    def _write(self, raw: bytes) -> int:
        pad = (-self._file.tell()) % self.ALIGN
        self._file.write(b"\0" * pad)
        offset = self._file.tell()
        self._file.write(raw)
        return offset

    def close(self) -> None:
        self._file.close()


def _int4_tensor(name: str, values: np.ndarray, external: "ExternalData | None") -> onnx.TensorProto:
    flat = values.astype(np.int8).reshape(-1)
    if flat.min(initial=0) < -8 or flat.max(initial=0) > 7:
        raise ValueError(f"{name}: INT4 values must lie in [-8, 7]")
    nibbles = (flat.astype(np.uint8) & 0x0F)
    if nibbles.size % 2:
        nibbles = np.concatenate([nibbles, np.zeros(1, np.uint8)])
    raw = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    t = TensorProto(name=name, data_type=TensorProto.INT4, dims=values.shape)
    if external is None:
        t.raw_data = raw
        return t
    offset = external._write(raw)
    for key, value in (("location", external.location), ("offset", offset), ("length", len(raw))):
        t.external_data.add(key=key, value=str(value))
    t.data_location = TensorProto.EXTERNAL
    return t


class GraphBuilder:
    """Collects nodes and initializers. ``as_function=True`` makes constants ``Constant`` nodes (a
    FunctionProto has no initializers); ``external`` streams large initializers to a data file."""

    def __init__(self, *, as_function: bool = False, external: ExternalData | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.as_function = as_function
        self.external = external
        self._consts: dict = {}
        self._names: set[str] = set()

    def _unique(self, name: str) -> str:
        base, i = name, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], name: str, *, outputs: int | list[str] = 1, domain: str = "",
           **attrs) -> str | list[str]:
        name = self._unique(name)
        outs = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def initializer(self, name: str, array: np.ndarray) -> str:
        if self.external is not None:
            self.initializers.append(self.external.tensor(name, array))
        else:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def initializer_int4(self, name: str, values: np.ndarray) -> str:
        """``values``: int8 in [-8, 7], stored as ONNX INT4."""
        self.initializers.append(self.external.int4_tensor(name, values) if self.external is not None
                                 else _int4_tensor(name, values, None))
        return name

    def const(self, value, dtype=np.int64) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self._unique(f"/const/{array.dtype.name}_{len(self._consts)}")
            if self.as_function:
                self.nodes.append(helper.make_node("Constant", [], [name], name=name + "/Constant",
                                                   value=numpy_helper.from_array(array)))
            else:
                self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]


class Sym:
    """A tensor in a graph under construction; comparison, arithmetic and boolean operators add nodes.
    Python numbers on either side become int64 constants."""

    def __init__(self, builder: GraphBuilder, name: str, scope: str = "/sym"):
        self.b, self.name, self.scope = builder, name, scope

    def _other(self, other) -> str:
        return other.name if isinstance(other, Sym) else self.b.const(other)

    def _bin(self, op_type, other, *, swap=False) -> "Sym":
        a, c = self.name, self._other(other)
        if swap:
            a, c = c, a
        return Sym(self.b, self.b.op(op_type, [a, c], f"{self.scope}/{op_type}"), self.scope)

    __le__ = lambda self, o: self._bin("LessOrEqual", o)  # noqa: E731
    __lt__ = lambda self, o: self._bin("Less", o)  # noqa: E731
    __ge__ = lambda self, o: self._bin("GreaterOrEqual", o)  # noqa: E731
    __gt__ = lambda self, o: self._bin("Greater", o)  # noqa: E731
    __eq__ = lambda self, o: self._bin("Equal", o)  # noqa: E731
    __sub__ = lambda self, o: self._bin("Sub", o)  # noqa: E731
    __rsub__ = lambda self, o: self._bin("Sub", o, swap=True)  # noqa: E731
    __add__ = lambda self, o: self._bin("Add", o)  # noqa: E731
    __or__ = lambda self, o: self._bin("Or", o)  # noqa: E731
    __and__ = lambda self, o: self._bin("And", o)  # noqa: E731
    __hash__ = object.__hash__
