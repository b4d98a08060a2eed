"""The one small interface every backend (torch, onnxruntime, TensorRT) implements for the session, and
what backends share.

A backend owns one session's KV cache (``capacity`` slots, allocated once) and, beside it, the key table:
the absolute position and turn of the token in each slot, which the turn-window mask (belle_edge/mask.py)
needs for every key. The cache only ever grows at its end, is cut back (``truncate``) or compacted
(``keep``), each on the session's word; a forward passes only the new tokens and their positions and
turns, never the table again. The session's own bookkeeping (runtime/kv_cache.py) says what the backend
*should* hold; ``n`` says what it *does* hold.
"""
from __future__ import annotations

import mmap
from typing import Protocol

import numpy as np

from ...mask import FUTURE_POSITION, MaskConfig

#: The position of an unused key slot in a batched forward: later than any query, so never visible.
UNREACHABLE_POSITION = FUTURE_POSITION


class Backend(Protocol):
    name: str
    capacity: int  # KV slots allocated
    vocab_size: int
    n: int  # slots [0, n) hold keys and values

    def forward(self, token_ids: np.ndarray, positions: np.ndarray, turns: np.ndarray, *,
                mask: MaskConfig) -> np.ndarray:
        """Run the new tokens (T,) at these positions and turns: their K/V go to slots [n, n+T), attention
        covers slots [0, n+T) under ``mask``; returns the last token's logits (V,) float32; n grows by T."""
        ...

    def truncate(self, n: int) -> None:
        """Forget slots [n, ...): a rolled-back reply, or work an interruption left half done."""
        ...

    def keep(self, slots: np.ndarray) -> None:
        """Compact: slot ``slots[i]`` moves to slot ``i`` (ascending); n becomes len(slots)."""
        ...

    def read_kv(self) -> np.ndarray:
        """Slots [0, n) as one array (layers, 2, kv_heads, n, head_dim) float32, for saving a session."""
        ...

    def write_kv(self, kv: np.ndarray, positions: np.ndarray, turns: np.ndarray) -> None:
        """Replace the cache with an array made by :meth:`read_kv` and its key table."""
        ...


class KeyTable:
    """Position and turn of the token in each KV slot, slots [0, n) live; follows the cache it describes."""

    def __init__(self, capacity: int):
        self.positions_buf = np.zeros(capacity, dtype=np.int64)
        self.turns_buf = np.zeros(capacity, dtype=np.int64)
        self.n = 0

    @property
    def positions(self) -> np.ndarray:
        return self.positions_buf[:self.n]

    @property
    def turns(self) -> np.ndarray:
        return self.turns_buf[:self.n]

    def append(self, positions, turns) -> None:
        t = len(positions)
        self.positions_buf[self.n:self.n + t] = positions
        self.turns_buf[self.n:self.n + t] = turns
        self.n += t

    def truncate(self, n: int) -> None:
        assert 0 <= n <= self.n, (n, self.n)
        self.n = n

    def keep(self, slots: np.ndarray) -> None:
        k = len(slots)
        self.positions_buf[:k] = self.positions_buf[slots]
        self.turns_buf[:k] = self.turns_buf[slots]
        self.n = k

    def load(self, positions, turns) -> None:
        self.n = 0
        self.append(positions, turns)


def zeroed_host_buffer(shape, dtype) -> np.ndarray:
    """A zeroed array on ordinary 4 KiB pages, for a KV cache in host memory.

    Why not ``np.zeros``: numpy asks Linux for transparent huge pages on large arrays, and a KV buffer is
    written sparsely (a prefix of each of its 2 x layers slots), so a session's first write to each slot
    faulted in and zeroed a whole 2 MiB page — 236 MiB and up to a second before the first token of every
    new session with the 135M model. The kernel zeroes 4 KiB pages as they are first touched; the array
    keeps the mapping alive.
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    try:
        mm = mmap.mmap(-1, max(count * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (AttributeError, TypeError, OSError):  # no anonymous mappings with flags (Windows)
        return np.zeros(shape, dtype)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux: also opts out where huge pages are "always" on
        mm.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mm, dtype=dtype, count=count).reshape(shape)


class BatchBackend(Protocol):
    """A pool of KV slots for many sequences over one copy of the weights (the batched engine,
    runtime/engine.py). Slot ``s`` holds one sequence's cache, ``capacity`` tokens at most, with its own
    key table; the pool is allocated once, so its memory is bounded from the start."""

    name: str
    slots: int  # sequences the pool holds
    capacity: int  # KV tokens per slot
    vocab_size: int

    def n(self, slot: int) -> int:
        """Tokens slot ``slot`` holds."""
        ...

    def forward_rows(self, rows: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]], *,
                     mask: MaskConfig) -> np.ndarray:
        """One step for several sequences: rows of (slot, token ids (T,), positions (T,), turns (T,)), the
        same T for all, each in a different slot; as :meth:`Backend.forward` per row. Returns (rows, V)."""
        ...

    def truncate(self, slot: int, n: int) -> None: ...

    def keep(self, slot: int, slots: np.ndarray) -> None: ...

    def read_kv(self, slot: int) -> np.ndarray: ...

    def write_kv(self, slot: int, kv: np.ndarray, positions: np.ndarray, turns: np.ndarray) -> None: ...


def padded_key_tables(tables: list[KeyTable], length: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, length) positions and turns of several sequences' keys, for one batched forward: each row's
    slots past its own ``n`` sit at a position no query reaches, so the mask's causality hides them (the
    mask itself stays as belle_edge/mask.py defines it)."""
    positions = np.full((len(tables), length), UNREACHABLE_POSITION, dtype=np.int64)
    turns = np.zeros((len(tables), length), dtype=np.int64)
    for row, table in enumerate(tables):
        positions[row, :table.n] = table.positions
        turns[row, :table.n] = table.turns
    return positions, turns
