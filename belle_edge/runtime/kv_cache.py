"""KV-cache bookkeeping: which token sits in which slot. Torch-free.

The tensors themselves live in the backend (torch, onnxruntime buffers, device memory). The ledger keeps,
per slot, the token id, its absolute position and its turn; live slots are [0, n), in dialogue order, so a
turn is a contiguous segment. Eviction asks the mask module which keys a query of the current turn can still
see and compacts the rest away, so the cache holds sinks + system + the last W+1 turns however long the
dialogue runs.
"""
from __future__ import annotations

import numpy as np

from ..mask import MaskConfig, retained


class CacheLedger:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._ids = np.zeros(capacity, dtype=np.int64)
        self._pos = np.zeros(capacity, dtype=np.int64)
        self._turn = np.zeros(capacity, dtype=np.int64)
        self.n = 0

    # (n,) views of the live slots
    @property
    def ids(self) -> np.ndarray:
        return self._ids[:self.n]

    @property
    def positions(self) -> np.ndarray:
        return self._pos[:self.n]

    @property
    def turns(self) -> np.ndarray:
        return self._turn[:self.n]

    @property
    def free(self) -> int:
        return self.capacity - self.n

    @property
    def next_position(self) -> int:
        return int(self._pos[self.n - 1]) + 1 if self.n else 0

    def append(self, ids, positions, turns) -> None:
        k = len(ids)
        assert self.n + k <= self.capacity, "caller checks room before appending"
        sl = slice(self.n, self.n + k)
        self._ids[sl], self._pos[sl], self._turn[sl] = ids, positions, turns
        self.n += k

    def truncate(self, n: int) -> None:
        assert 0 <= n <= self.n
        self.n = n

    def keep_slots(self, current_turn: int, mask: MaskConfig) -> np.ndarray:
        """Slots some query of ``current_turn`` or later can still see, ascending."""
        return np.flatnonzero(retained(self.positions, self.turns, current_turn, mask))

    def keep(self, slots: np.ndarray) -> None:
        """Compact: slot ``slots[i]`` moves to slot ``i``."""
        k = len(slots)
        for arr in (self._ids, self._pos, self._turn):
            arr[:k] = arr[slots]
        self.n = k

    def reposition(self) -> None:
        """Give the live tokens fresh positions 0..n-1 (a context shift; the backend re-prefills them)."""
        self._pos[:self.n] = np.arange(self.n)

    def turn_counts(self) -> dict[int, int]:
        turns, counts = np.unique(self.turns, return_counts=True)
        return {int(t): int(c) for t, c in zip(turns, counts)}

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"ids": self.ids.copy(), "positions": self.positions.copy(), "turns": self.turns.copy()}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.n = 0
        self.append(arrays["ids"], arrays["positions"], arrays["turns"])
