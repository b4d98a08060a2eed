"""The one small interface every backend (torch, onnxruntime, TensorRT) implements for the session.

A backend owns the KV tensors of one session (``capacity`` slots, allocated once) and the model. The session
owns the bookkeeping (:class:`~belle_edge.runtime.kv_cache.CacheLedger`) and tells the backend, per call,
the positions and turns of the new tokens and of every key, so the backend applies the turn-window mask
(from :mod:`belle_edge.mask`) without keeping dialogue state of its own.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ...mask import MaskConfig


class Backend(Protocol):
    name: str
    capacity: int  # KV slots allocated
    vocab_size: int

    def forward(self, token_ids: np.ndarray, positions: np.ndarray, turns: np.ndarray, *, start: int,
                key_positions: np.ndarray, key_turns: np.ndarray, mask: MaskConfig) -> np.ndarray:
        """Run the new tokens (T,), write their K/V to slots [start, start+T), return the last token's
        logits (V,) float32. ``key_positions`` / ``key_turns`` (start+T,) describe slots [0, start+T)."""
        ...

    def keep(self, slots: np.ndarray) -> None:
        """Compact the cache: slot ``slots[i]`` moves to slot ``i`` (ascending)."""
        ...

    def read_kv(self, n: int) -> np.ndarray:
        """Slots [0, n) as one array (layers, 2, kv_heads, n, head_dim), for saving a session."""
        ...

    def write_kv(self, kv: np.ndarray) -> None:
        """Load slots [0, n) from an array made by :meth:`read_kv`."""
        ...
