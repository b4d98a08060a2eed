"""Torch backend: the canonical decoder on CPU (the reference) or CUDA, with a pre-allocated KV cache."""
from __future__ import annotations

import numpy as np
import torch

from ...mask import MaskConfig
from ...models.decoder import Decoder


class TorchBackend:
    name = "torch"

    def __init__(self, decoder: Decoder, capacity: int):
        self.decoder = decoder
        self.capacity = capacity
        self.vocab_size = decoder.cfg.vocab_size
        self.device = decoder.embed.weight.device
        self.caches = decoder.new_caches(capacity)

    @torch.inference_mode()
    def forward(self, token_ids, positions, turns, *, start, key_positions, key_turns, mask: MaskConfig):
        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64), device=self.device)[None]  # (1, T)
        logits = self.decoder(ids, positions, turns, mask, caches=self.caches, start=start,
                              key_positions=key_positions, key_turns=key_turns, last_only=True)  # (1, 1, V)
        return logits[0, -1].float().cpu().numpy()

    @torch.inference_mode()
    def keep(self, slots: np.ndarray) -> None:
        index = torch.as_tensor(np.asarray(slots, dtype=np.int64), device=self.device)
        for cache in self.caches:
            cache.keep(index)

    @torch.inference_mode()
    def read_kv(self, n: int) -> np.ndarray:
        # (L, 2, Hkv, n, D), batch 1
        return torch.stack([torch.stack([c.k[0, :, :n], c.v[0, :, :n]]) for c in self.caches]).float().cpu().numpy()

    @torch.inference_mode()
    def write_kv(self, kv: np.ndarray) -> None:
        n = kv.shape[3]
        for cache, layer in zip(self.caches, kv):
            cache.k[0, :, :n] = torch.from_numpy(layer[0]).to(cache.k)
            cache.v[0, :, :n] = torch.from_numpy(layer[1]).to(cache.v)
