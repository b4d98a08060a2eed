"""ONNX Runtime backend: runs an artifact's ``model.onnx`` (see ``compile/export_onnx.py`` for the
contract). Imports no torch.

The KV cache lives in two pre-allocated flat buffers per session, bound with IOBinding: each call reads
``past`` straight from one buffer and ONNX Runtime writes ``present`` (past + new) straight into the other,
then they swap. The runtime never copies the cache itself; the graph's own ``Concat`` is the only pass
over it, and it writes into our buffer rather than a fresh allocation.
"""
from __future__ import annotations

import numpy as np

from ...errors import MissingDependencyError
from ...mask import WINDOW_OFF, MaskConfig
from .base import KeyTable, zeroed_host_buffer


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("the ONNX Runtime backend needs onnxruntime: pip install 'belle_edge[onnx]'") \
            from None
    return onnxruntime


def make_session(onnx_path: str, *, threads: int | None = None, exact_weight_only: bool = False):
    """One InferenceSession per model, shared by all chat sessions (it holds the weights).

    ``exact_weight_only``: onnxruntime fuses a GPU artifact's DequantizeLinear -> MatMul into MatMulNBits
    with int8 activations (accuracy level 4, its default); a GPU keeps them in fp16, so measuring such an
    artifact's fidelity asks for full-precision activations (level 0) instead."""
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if exact_weight_only:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, session, *, num_layers: int, num_kv_heads: int, head_dim: int, vocab_size: int,
                 kv_dtype: str, capacity: int):
        self.session = session
        self.capacity = capacity
        self.vocab_size = vocab_size
        self.layers, self.kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype = np.dtype(kv_dtype)
        size = num_kv_heads * capacity * head_dim
        # (layer, key/value, kv_heads * tokens * head_dim): a (1, kv_heads, n, head_dim) prefix is contiguous
        self._buffers = [zeroed_host_buffer((num_layers, 2, size), self.dtype) for _ in range(2)]
        self._cur = 0
        self.keys = KeyTable(capacity)
        self._logits = np.zeros((1, 1, vocab_size), dtype=np.float32)
        self._names = [((layer, kind), f"past_key_values.{layer}.{name}", f"present.{layer}.{name}")
                       for layer in range(num_layers) for kind, name in ((0, "key"), (1, "value"))]

    @property
    def n(self) -> int:
        return self.keys.n

    def _view(self, which: int, layer: int, kind: int, n: int) -> np.ndarray:
        flat = self._buffers[which][layer, kind, :self.kv_heads * n * self.head_dim]
        return flat.reshape(1, self.kv_heads, n, self.head_dim)

    def _repack(self, slots, m: int) -> None:
        """Into the other buffer, laid out for ``m`` tokens: ``slots`` of the current one (the layout depends
        on the token count, so even a cut-back prefix moves)."""
        other = 1 - self._cur
        for layer in range(self.layers):
            for kind in (0, 1):
                self._view(other, layer, kind, m)[...] = self._view(self._cur, layer, kind, self.n)[:, :, slots]
        self._cur = other

    def truncate(self, n: int) -> None:
        if n != self.n:
            self._repack(slice(0, n), n)
            self.keys.truncate(n)

    def keep(self, slots: np.ndarray) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        self._repack(slots, len(slots))
        self.keys.keep(slots)

    def forward(self, token_ids, positions, turns, *, mask: MaskConfig):
        start, t = self.n, len(token_ids)
        total = start + t
        io = self.session.io_binding()
        as_row = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.int64)[None])  # noqa: E731
        io.bind_cpu_input("input_ids", as_row(token_ids))
        io.bind_cpu_input("position_ids", as_row(positions))
        io.bind_cpu_input("turn_ids", as_row(turns))
        io.bind_cpu_input("past_position_ids", as_row(self.keys.positions))
        io.bind_cpu_input("past_turn_ids", as_row(self.keys.turns))
        io.bind_cpu_input("mask_window", np.array(WINDOW_OFF if mask.window is None else mask.window, dtype=np.int64))
        io.bind_cpu_input("mask_sinks", np.array(mask.sinks, dtype=np.int64))
        io.bind_cpu_input("num_logits_to_keep", np.array(1, dtype=np.int64))
        cur, nxt = self._buffers[self._cur], self._buffers[1 - self._cur]
        # slot (layer, kind) of a buffer starts at a fixed byte offset; a (1, Hkv, n, D) prefix is contiguous
        stride = cur.strides[1]
        past_shape = [1, self.kv_heads, start, self.head_dim]
        present_shape = [1, self.kv_heads, total, self.head_dim]
        for (layer, kind), past_name, present_name in self._names:
            offset = (2 * layer + kind) * stride
            io.bind_input(past_name, "cpu", 0, self.dtype, past_shape, cur.ctypes.data + offset)
            io.bind_output(present_name, "cpu", 0, self.dtype, present_shape, nxt.ctypes.data + offset)
        io.bind_output("logits", "cpu", 0, np.float32, list(self._logits.shape), self._logits.ctypes.data)
        self.session.run_with_iobinding(io)
        self._cur = 1 - self._cur  # present (past + new) is in the other buffer now
        self.keys.append(positions, turns)
        return self._logits[0, -1].copy()

    def read_kv(self) -> np.ndarray:
        n = self.n
        return np.stack([np.stack([self._view(self._cur, layer, kind, n)[0] for kind in (0, 1)])
                         for layer in range(self.layers)]).astype(np.float32)

    def write_kv(self, kv: np.ndarray, positions: np.ndarray, turns: np.ndarray) -> None:
        n = kv.shape[3]
        for layer in range(self.layers):
            for kind in (0, 1):
                self._view(self._cur, layer, kind, n)[0] = kv[layer, kind]
        self.keys.load(positions, turns)
