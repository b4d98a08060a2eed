"""Torch KV pool: many sequences over one canonical decoder, for the batched engine (runtime/engine.py).

The caches are the decoder's own ``KVCache`` with one batch row per slot, allocated once. A batched step
hands each layer a :class:`_RowsView`, which writes each sequence's new keys at its own length and gives
attention the rows it needs, padded to the longest; the padding is hidden by the key tables
(``padded_key_tables``), not by a second mask. Runs the reference attention (CPU, or CUDA without the fused
kernels), whose matmuls take the whole batch at once.
"""
from __future__ import annotations

import numpy as np
import torch

from ...mask import MaskConfig
from ...models.decoder import Decoder, KVCache
from .base import KeyTable, padded_key_tables


class _RowsView:
    """What attention sees of one layer's cache in a batched step: rows ``slots``, each written at its own
    ``starts[i]``, read back as (rows, Hkv, length, D)."""

    def __init__(self, cache: KVCache, slots: list[int], starts: list[int], length: int):
        self.cache, self.slots, self.starts, self.length = cache, slots, starts, length

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        for row, (slot, at) in enumerate(zip(self.slots, self.starts)):
            self.cache.k[slot, :, at:at + t] = k[row]
            self.cache.v[slot, :, at:at + t] = v[row]
        if len(self.slots) == 1:  # one sequence: a view, no copy
            s = self.slots[0]
            return self.cache.k[s:s + 1, :, :self.length], self.cache.v[s:s + 1, :, :self.length]
        index = torch.as_tensor(self.slots, device=self.cache.k.device)
        return self.cache.k[index, :, :self.length], self.cache.v[index, :, :self.length]


class TorchPool:
    name = "torch"

    def __init__(self, decoder: Decoder, slots: int, capacity: int):
        self.decoder = decoder
        self.slots, self.capacity = slots, capacity
        self.vocab_size = decoder.cfg.vocab_size
        self.device = decoder.embed.weight.device
        self.caches = decoder.new_caches(capacity, batch=slots)
        self.tables = [KeyTable(capacity) for _ in range(slots)]

    def n(self, slot: int) -> int:
        return self.tables[slot].n

    @torch.inference_mode()
    def forward_rows(self, rows, *, mask: MaskConfig) -> np.ndarray:
        slots = [row[0] for row in rows]
        starts = [self.tables[s].n for s in slots]
        tables = [self.tables[s] for s in slots]
        for table, (_, _, positions, turns) in zip(tables, rows):
            table.append(positions, turns)
        try:
            length = max(starts) + len(rows[0][1])
            key_positions, key_turns = padded_key_tables(tables, length)
            stack = lambda i: np.stack([np.asarray(row[i], dtype=np.int64) for row in rows])  # noqa: E731
            ids = torch.as_tensor(stack(1), device=self.device)
            views = [_RowsView(cache, slots, starts, length) for cache in self.caches]
            logits = self.decoder(ids, stack(2), stack(3), mask, caches=views, key_positions=key_positions,
                                  key_turns=key_turns, last_only=True)  # (rows, 1, V)
            return logits[:, -1].float().cpu().numpy()
        except BaseException:
            for table, start in zip(tables, starts):
                table.truncate(start)  # the slots were never filled
            raise

    def truncate(self, slot: int, n: int) -> None:
        self.tables[slot].truncate(n)  # slots past n are overwritten by the next forward

    @torch.inference_mode()
    def keep(self, slot: int, slots: np.ndarray) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        index = torch.as_tensor(slots, device=self.device)
        k = len(slots)
        for cache in self.caches:
            cache.k[slot, :, :k] = cache.k[slot, :, index]
            cache.v[slot, :, :k] = cache.v[slot, :, index]
        self.tables[slot].keep(slots)

    @torch.inference_mode()
    def read_kv(self, slot: int) -> np.ndarray:
        n = self.tables[slot].n
        return torch.stack([torch.stack([c.k[slot, :, :n], c.v[slot, :, :n]]) for c in self.caches]).float().cpu().numpy()

    @torch.inference_mode()
    def write_kv(self, slot: int, kv: np.ndarray, positions: np.ndarray, turns: np.ndarray) -> None:
        n = kv.shape[3]
        for cache, layer in zip(self.caches, kv):
            cache.k[slot, :, :n] = torch.from_numpy(layer[0]).to(cache.k)
            cache.v[slot, :, :n] = torch.from_numpy(layer[1]).to(cache.v)
        self.tables[slot].load(positions, turns)
