"""Torch KV pool: many sequences over one canonical decoder, for the batched engine (runtime/engine.py).

The caches are the decoder's own ``KVCache`` with one batch row per slot, allocated once. A batched step
hands each layer a :class:`_RowsView`, which writes each sequence's new keys at its own length and gives
attention the rows it needs, padded to the longest; the padding is hidden by the key tables
(``padded_key_tables``), not by a second mask. That is the reference attention (CPU, or CUDA without the
kernels). On CUDA with the kernels (``belle::dynamic_mask_attention``, which already takes a batch) a step
runs the whole pool through the fused op instead (:meth:`TorchPool._forward_fused`).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from ...mask import WINDOW_OFF, MaskConfig
from ...models.decoder import Decoder, FusedInputs, KVCache
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

    def __init__(self, decoder: Decoder, slots: int, capacity: int, *, fused: bool | str = "auto"):
        self.decoder = decoder
        self.slots, self.capacity = slots, capacity
        self.vocab_size = decoder.cfg.vocab_size
        self.device = decoder.embed.weight.device
        self.caches = decoder.new_caches(capacity, batch=slots)
        self.tables = [KeyTable(capacity) for _ in range(slots)]
        self.fused = self._want_fused(fused)
        if self.fused:  # what every fused step reads, made once
            from ...models.positions import rope_inv_freq
            from ...ops.attention import dynamic_mask_attention
            from ...ops.norm import fused_norm_op

            cfg = decoder.cfg
            self._op = dynamic_mask_attention
            self._inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, self.device) if cfg.positions == "rope" else None
            self._norm_op = fused_norm_op(cfg)

    def _want_fused(self, fused) -> bool:
        """The kernels on CUDA where they serve this model; ``fused=True`` forces the op (on CPU its
        reference implementation, which is how the tests check this path without a GPU)."""
        if fused != "auto":
            return bool(fused)
        if self.device.type != "cuda":
            return False
        from ...ops.attention import kernels_available

        cfg = self.decoder.cfg
        return kernels_available(self.device, self.decoder.embed.weight.dtype, cfg.head_dim, cfg.group_size)[0]

    def n(self, slot: int) -> int:
        return self.tables[slot].n

    @torch.inference_mode()
    def forward_rows(self, rows, *, mask: MaskConfig) -> np.ndarray:
        t = len(rows[0][1])
        if self.fused:  # one row writes after its own keys; several, after the longest slot's
            start = self.tables[rows[0][0]].n if len(rows) == 1 else max(table.n for table in self.tables)
            if start + t <= self.capacity:
                return self._forward_fused(rows, mask, start)
        return self._forward_reference(rows, mask)

    def _forward_reference(self, rows, mask: MaskConfig) -> np.ndarray:
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

    def _forward_fused(self, rows, mask: MaskConfig, start: int) -> np.ndarray:
        """The fused op, which takes one cache tensor and one start for all its rows. One sequence (a
        prefill chunk, or a lone decode): its own slot, a view of the pool. Several: the whole pool; every
        slot writes its new keys at ``start`` = the longest slot's length, beyond what each one holds, the
        rows of idle slots attend only to their own dummy token, and each running row's new keys then move
        down to its own length, where its session expects them."""
        t = len(rows[0][1])
        if len(rows) == 1:
            members = [rows[0][0]]
            caches = [SimpleNamespace(k=c.k[members[0]:members[0] + 1], v=c.v[members[0]:members[0] + 1])
                      for c in self.caches]
        else:
            members, caches = list(range(self.slots)), self.caches
        row_of = {slot: i for i, slot in enumerate(members)}
        b = len(members)
        ids, q_pos, q_turn = (np.zeros((b, t), dtype=np.int64) for _ in range(3))
        k_pos, k_turn = padded_key_tables([KeyTable(0)] * b, start + t)
        k_pos[:, start:] = 0  # idle rows: their dummy token at position 0 sees itself only
        for slot, token_ids, positions, turns in rows:
            table, i = self.tables[slot], row_of[slot]
            ids[i], q_pos[i], q_turn[i] = token_ids, positions, turns
            k_pos[i, :table.n], k_turn[i, :table.n] = table.positions, table.turns
            k_pos[i, start:], k_turn[i, start:] = positions, turns
        dev = lambda a: torch.as_tensor(a, device=self.device)  # noqa: E731
        fused = FusedInputs(op=self._op, start=dev(np.array([start], dtype=np.int32)),
                            q_pos=dev(q_pos), q_turn=dev(q_turn), k_pos=dev(k_pos), k_turn=dev(k_turn),
                            window=dev(np.array([WINDOW_OFF if mask.window is None else mask.window])),
                            sinks=dev(np.array([mask.sinks])),
                            inv_freq=self._inv_freq, max_keys=start + t, norm_op=self._norm_op)
        logits = self.decoder(dev(ids), None, None, None, caches=caches, last_only=True, fused=fused)
        for slot, _, positions, turns in rows:
            table = self.tables[slot]
            if table.n != start:
                for cache in self.caches:
                    cache.k[slot, :, table.n:table.n + t] = cache.k[slot, :, start:start + t].clone()
                    cache.v[slot, :, table.n:table.n + t] = cache.v[slot, :, start:start + t].clone()
            table.append(positions, turns)
        index = torch.as_tensor([row_of[row[0]] for row in rows], device=self.device)
        return logits[index, -1].float().cpu().numpy()

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

