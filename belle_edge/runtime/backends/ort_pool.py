"""ONNX Runtime KV pool: many sequences over one InferenceSession, for the batched engine. Imports no torch.

The pool is one buffer, (layer, key/value, slot, kv_heads, capacity, head_dim), allocated once: its size
is the memory bound. The graph (compile/export_onnx.py) takes a batch with per-row positions and turns, its
``past`` as (B, Hkv, P, D) and returns ``present`` = past + new. A step gathers the rows' caches into a
staging buffer padded to the longest (P), binds it as ``past``, binds ``present`` to a second staging
buffer and copies each row's new keys and values back into its slot. The staging buffers hold one step's
rows at their current length, never the pool's capacity, so with the turn window bounding every dialogue
they stay small; they grow (and are kept) as the longest batch seen needs.
"""
from __future__ import annotations

import numpy as np

from ...mask import WINDOW_OFF, MaskConfig
from .base import KeyTable, padded_key_tables, zeroed_host_buffer


class _Staging:
    """A reusable buffer for (layers, 2, rows, Hkv, tokens, D) views, grown on demand."""

    def __init__(self, dtype):
        self.dtype, self.flat = dtype, np.zeros(0, dtype=dtype)

    def view(self, shape) -> np.ndarray:
        size = int(np.prod(shape))
        if self.flat.size < size:
            self.flat = zeroed_host_buffer((size,), self.dtype)
        return self.flat[:size].reshape(shape)


class OrtPool:
    name = "onnxruntime"

    def __init__(self, session, *, slots: int, capacity: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 vocab_size: int, kv_dtype: str):
        self.session = session
        self.slots, self.capacity, self.vocab_size = slots, capacity, vocab_size
        self.layers, self.kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype = np.dtype(kv_dtype)
        self.kv = zeroed_host_buffer((num_layers, 2, slots, num_kv_heads, capacity, head_dim), self.dtype)
        self.tables = [KeyTable(capacity) for _ in range(slots)]
        self._past, self._present = _Staging(self.dtype), _Staging(self.dtype)
        self._logits = _Staging(np.dtype(np.float32))
        self._names = [(layer, kind, f"past_key_values.{layer}.{name}", f"present.{layer}.{name}")
                       for layer in range(num_layers) for kind, name in ((0, "key"), (1, "value"))]

    def n(self, slot: int) -> int:
        return self.tables[slot].n

    def forward_rows(self, rows, *, mask: MaskConfig) -> np.ndarray:
        slots = [row[0] for row in rows]
        tables = [self.tables[s] for s in slots]
        b, t = len(rows), len(rows[0][1])
        past_len = max(table.n for table in tables)
        past = self._past.view((self.layers, 2, b, self.kv_heads, past_len, self.head_dim))
        present = self._present.view((self.layers, 2, b, self.kv_heads, past_len + t, self.head_dim))
        for row, (slot, table) in enumerate(zip(slots, tables)):
            past[:, :, row, :, :table.n] = self.kv[:, :, slot, :, :table.n]
        past_positions, past_turns = padded_key_tables(tables, past_len)
        stack = lambda i: np.ascontiguousarray(np.stack([np.asarray(r[i], dtype=np.int64) for r in rows]))  # noqa: E731
        logits = self._logits.view((b, 1, self.vocab_size))
        io = self.session.io_binding()
        for name, value in (("input_ids", stack(1)), ("position_ids", stack(2)), ("turn_ids", stack(3)),
                            ("past_position_ids", past_positions), ("past_turn_ids", past_turns),
                            ("mask_window", np.array(WINDOW_OFF if mask.window is None else mask.window)),
                            ("mask_sinks", np.array(mask.sinks)), ("num_logits_to_keep", np.array(1))):
            io.bind_cpu_input(name, np.asarray(value, dtype=np.int64))
        for layer, kind, past_name, present_name in self._names:
            src, dst = past[layer, kind], present[layer, kind]  # contiguous: leading indices of C-order arrays
            io.bind_input(past_name, "cpu", 0, self.dtype, list(src.shape), src.ctypes.data)
            io.bind_output(present_name, "cpu", 0, self.dtype, list(dst.shape), dst.ctypes.data)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(io)
        for row, (slot, table, (_, _, positions, turns)) in enumerate(zip(slots, tables, rows)):
            self.kv[:, :, slot, :, table.n:table.n + t] = present[:, :, row, :, past_len:]
            table.append(positions, turns)
        return logits[:, -1].copy()

    def truncate(self, slot: int, n: int) -> None:
        self.tables[slot].truncate(n)  # slots past n are overwritten by the next forward

    def keep(self, slot: int, slots: np.ndarray) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        held = self.kv[:, :, slot]  # a view; indexing it with ``slots`` alone keeps the axes in place
        held[:, :, :, :len(slots)] = held[:, :, :, slots]
        self.tables[slot].keep(slots)

    def read_kv(self, slot: int) -> np.ndarray:
        return self.kv[:, :, slot, :, :self.tables[slot].n].astype(np.float32)

    def write_kv(self, slot: int, kv: np.ndarray, positions: np.ndarray, turns: np.ndarray) -> None:
        self.kv[:, :, slot, :, :kv.shape[3]] = kv
        self.tables[slot].load(positions, turns)
