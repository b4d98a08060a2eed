"""TensorRT KV pool: many sequences over one engine, for the batched engine. Imports no torch.

Same plan as the ONNX Runtime pool (ort_pool.py), in device memory: one pool buffer, layout
(layer, key/value, slot, kv_heads, capacity, head_dim), allocated once; a step gathers its rows' caches into
a ``past`` staging buffer padded to the longest row (one 2D copy per row and (layer, kind): rows of the copy
are the heads), the engine writes ``present`` into a second staging buffer, and each row's new keys and
values go back into its slot (one 2D copy each again). The engine's profiles must take the batch
(``compile --max-batch``, default per target); the staging buffers grow to the largest step seen.
"""
from __future__ import annotations

import numpy as np

from ...errors import ContextFullError, InputError
from ...mask import WINDOW_OFF, MaskConfig
from .base import KeyTable, padded_key_tables
from .trt_backend import DeviceBuffers, TrtEngine, _align


class TrtPool(DeviceBuffers):
    name = "tensorrt"

    def __init__(self, engine: TrtEngine, *, slots: int, capacity: int):
        if slots > engine.max_batch:
            raise InputError(f"max_batch {slots}: the engine takes at most {engine.max_batch} sequences per step; "
                             "lower it or recompile with a larger --max-batch")
        if capacity > engine.max_past + 1:
            raise InputError(f"kv_tokens {capacity}: the engine holds at most {engine.max_past + 1} KV tokens "
                             f"(built with max_past {engine.max_past}); lower it or recompile with a larger "
                             "--max-kv-tokens")
        self.engine, self.cuda = engine, engine.cuda
        self.slots, self.capacity, self.vocab_size = slots, capacity, engine.vocab_size
        self.layers, self.kv_heads, self.head_dim = engine.layers, engine.kv_heads, engine.head_dim
        self.dtype = engine.kv_dtype
        self._row = self.head_dim * self.dtype.itemsize  # bytes of one token of one head
        self._slot_bytes = self.kv_heads * capacity * self._row  # one slot of one (layer, kind)
        self._buffers: list[int] = []
        self._pool = self._malloc(2 * self.layers * slots * self._slot_bytes)
        self._staging = {"past": (0, 0), "present": (0, 0), "scratch": (0, 0)}  # name -> (pointer, bytes)
        self.tables = [KeyTable(capacity) for _ in range(slots)]

    def _malloc(self, nbytes: int) -> int:
        ptr = self.cuda.malloc(max(nbytes, 1))
        self._buffers.append(ptr)
        return ptr

    def _stage(self, name: str, nbytes: int) -> int:
        ptr, size = self._staging[name]
        if size < nbytes:
            if ptr:
                self.cuda.free(ptr)
                self._buffers.remove(ptr)
            ptr = self._malloc(nbytes)
            self._staging[name] = (ptr, nbytes)
        return ptr

    def _at(self, lk: int, slot: int, token: int = 0) -> int:
        """Device address of (layer, kind) ``lk``, ``slot``, head 0, ``token``."""
        return self._pool + (lk * self.slots + slot) * self._slot_bytes + token * self._row

    def n(self, slot: int) -> int:
        return self.tables[slot].n

    # ------------------------------------------------------------------ a step
    def _gather(self, slots: list[int], past_len: int) -> tuple[int, int]:
        """Rows ``slots`` into the past staging buffer as (B, Hkv, past_len, D) per (layer, kind); returns
        (pointer, bytes per (layer, kind))."""
        seg = _align(len(slots) * self.kv_heads * past_len * self._row)
        past = self._stage("past", 2 * self.layers * seg)
        pitch = self.capacity * self._row
        for lk in range(2 * self.layers):
            for row, slot in enumerate(slots):
                dst = past + lk * seg + row * self.kv_heads * past_len * self._row
                self.cuda.copy2d(dst, past_len * self._row, self._at(lk, slot), pitch,
                                 self.tables[slot].n * self._row, self.kv_heads, self.engine.stream)
        return past, seg

    def _scatter(self, slots: list[int], present: int, seg: int, past_len: int, t: int) -> None:
        """Each row's t new tokens, at [past_len, past_len + t) of present, to its slot after its n tokens."""
        total = past_len + t
        for lk in range(2 * self.layers):
            for row, slot in enumerate(slots):
                src = present + lk * seg + (row * self.kv_heads * total + past_len) * self._row
                self.cuda.copy2d(self._at(lk, slot, self.tables[slot].n), self.capacity * self._row,
                                 src, total * self._row, t * self._row, self.kv_heads, self.engine.stream)

    def forward_rows(self, rows, *, mask: MaskConfig) -> np.ndarray:
        slots = [row[0] for row in rows]
        tables = [self.tables[s] for s in slots]
        t = len(rows[0][1])
        if t > self.engine.max_new or len(rows) > self.engine.max_batch:
            raise InputError(f"{len(rows)} x {t} tokens: the engine takes at most {self.engine.max_batch} x "
                             f"{self.engine.max_new} per call")
        for table in tables:
            if table.n + t > self.capacity:
                raise ContextFullError(f"{table.n} + {t} tokens: the KV cache holds {self.capacity}")
        past_len = max(table.n for table in tables)
        stack = lambda i: np.stack([np.asarray(r[i], dtype=np.int64) for r in rows])  # noqa: E731
        past_positions, past_turns = padded_key_tables(tables, past_len)
        values = {"input_ids": stack(1), "position_ids": stack(2), "turn_ids": stack(3),
                  "past_position_ids": past_positions, "past_turn_ids": past_turns,
                  "mask_window": WINDOW_OFF if mask.window is None else mask.window, "mask_sinks": mask.sinks,
                  "num_logits_to_keep": 1}
        with self.engine.lock:
            past, seg = self._gather(slots, past_len)
            out_seg = _align(len(rows) * self.kv_heads * (past_len + t) * self._row)
            present = self._stage("present", 2 * self.layers * out_seg)
            logits = self.engine.run(past, present, seg, values, out_bytes=out_seg)
            self._scatter(slots, present, out_seg, past_len, t)
            self.cuda.sync(self.engine.stream)
        for table, (_, _, positions, turns) in zip(tables, rows):
            table.append(positions, turns)
        return logits

    # ------------------------------------------------------------------ the cache
    def truncate(self, slot: int, n: int) -> None:
        self.tables[slot].truncate(n)  # slots past n are overwritten by the next forward

    def keep(self, slot: int, slots: np.ndarray) -> None:
        """Compact through a scratch buffer (a copy within one slot could overlap itself)."""
        slots = np.asarray(slots, dtype=np.int64)
        n, m = self.tables[slot].n, len(slots)
        breaks = np.flatnonzero(np.diff(slots) != 1) + 1
        runs = [(int(slots[a]), int(a), int(b - a)) for a, b in zip(np.r_[0, breaks], np.r_[breaks, m]) if b > a]
        pitch = self.capacity * self._row
        with self.engine.lock:
            scratch = self._stage("scratch", self.kv_heads * max(n, 1) * self._row)
            for lk in range(2 * self.layers):
                self.cuda.copy2d(scratch, n * self._row, self._at(lk, slot), pitch, n * self._row, self.kv_heads,
                                 self.engine.stream)
                for src, dst, length in runs:
                    self.cuda.copy2d(self._at(lk, slot, dst), pitch, scratch + src * self._row, n * self._row,
                                     length * self._row, self.kv_heads, self.engine.stream)
            self.cuda.sync(self.engine.stream)
        self.tables[slot].keep(slots)

    def read_kv(self, slot: int) -> np.ndarray:
        n = self.tables[slot].n
        out = np.empty((self.layers, 2, self.kv_heads, n, self.head_dim), dtype=self.dtype)
        with self.engine.lock:
            scratch = self._stage("scratch", self.kv_heads * max(n, 1) * self._row)
            for lk in range(2 * self.layers):
                self.cuda.copy2d(scratch, n * self._row, self._at(lk, slot), self.capacity * self._row, n * self._row,
                                 self.kv_heads, self.engine.stream)
                self.cuda.dtoh(out[lk // 2, lk % 2], scratch, self.engine.stream)
                self.cuda.sync(self.engine.stream)
        return out.astype(np.float32)

    def write_kv(self, slot: int, kv: np.ndarray, positions: np.ndarray, turns: np.ndarray) -> None:
        n = kv.shape[3]
        if n > self.capacity:
            raise InputError(f"the saved session holds {n} KV tokens, this one has room for {self.capacity}")
        host = np.ascontiguousarray(kv, dtype=self.dtype)
        with self.engine.lock:
            scratch = self._stage("scratch", self.kv_heads * max(n, 1) * self._row)
            for lk in range(2 * self.layers):
                self.cuda.htod(scratch, host[lk // 2, lk % 2], self.engine.stream)
                self.cuda.copy2d(self._at(lk, slot), self.capacity * self._row, scratch, n * self._row, n * self._row,
                                 self.kv_heads, self.engine.stream)
                self.cuda.sync(self.engine.stream)  # ``host`` is pageable, the scratch reused
        self.tables[slot].load(positions, turns)
