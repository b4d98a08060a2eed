"""Torch backend: the canonical decoder on CPU (the reference) or CUDA, with a pre-allocated KV cache.

On CUDA in fp16/bf16 it runs attention through our kernels (``belle::dynamic_mask_attention``, kernels/)
and replays decode steps from one captured CUDA graph: everything a step changes (token, position, turn,
cache length, key tables) lives in device tensors the graph reads, so one capture serves the whole session.
Elsewhere (CPU, fp32, a shape the kernels lack) it runs the reference attention of models/decoder.py.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from ...errors import InputError
from ...mask import WINDOW_OFF, MaskConfig
from ...models.decoder import Decoder, FusedInputs
from ...models.positions import rope_inv_freq
from .base import KeyTable


class TorchBackend:
    name = "torch"

    def __init__(self, decoder: Decoder, capacity: int, *, fused: bool | str = "auto", cuda_graphs: bool = True):
        self.decoder = decoder
        self.capacity = capacity
        self.vocab_size = decoder.cfg.vocab_size
        self.device = decoder.embed.weight.device
        self.caches = decoder.new_caches(capacity)
        self.keys = KeyTable(capacity)
        self.fused, self.fused_reason = self._want_fused(fused)
        self.cuda_graphs = cuda_graphs and self.fused
        if self.fused:
            self._init_fused()

    # ------------------------------------------------------------------------------------ kernel choice
    def _want_fused(self, fused) -> tuple[bool, str]:
        if fused is False:
            return False, "switched off"
        if self.device.type != "cuda":
            reason = "not on CUDA"
        else:
            from ...ops.attention import kernels_available

            cfg = self.decoder.cfg
            ok, reason = kernels_available(self.device, self.decoder.embed.weight.dtype, cfg.head_dim, cfg.group_size)
            if ok:
                return True, ""
        if fused is True:
            raise InputError(f"fused attention kernels unavailable: {reason}")
        if self.device.type == "cuda":
            print(f"belle-edge: reference attention on CUDA ({reason})", file=sys.stderr)
        return False, reason

    def _init_fused(self) -> None:
        from ...ops.attention import dynamic_mask_attention
        from ...ops.norm import fused_norm_op

        self._op = dynamic_mask_attention
        cfg, dev = self.decoder.cfg, self.device
        long = dict(dtype=torch.int64, device=dev)
        self._k_pos = torch.zeros(1, self.capacity, **long)
        self._k_turn = torch.zeros(1, self.capacity, **long)
        self._tables_n = 0  # leading slots of the device tables that match the session's
        self._start = torch.zeros(1, dtype=torch.int32, device=dev)
        self._window = torch.zeros(1, **long)
        self._sinks = torch.zeros(1, **long)
        self._mask_now = None
        self._inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, dev) if cfg.positions == "rope" else None
        self._norm_op = fused_norm_op(cfg)
        # static inputs/outputs of the captured decode step
        self._ids = torch.zeros(1, 1, **long)
        self._q_pos = torch.zeros(1, 1, **long)
        self._q_turn = torch.zeros(1, 1, **long)
        self._graph = None
        self._graph_logits = None

    def _inputs(self, q_pos, q_turn) -> FusedInputs:
        return FusedInputs(op=self._op, start=self._start, q_pos=q_pos, q_turn=q_turn, k_pos=self._k_pos, k_turn=self._k_turn,
                           window=self._window, sinks=self._sinks, inv_freq=self._inv_freq, max_keys=self.capacity,
                           norm_op=self._norm_op)

    def _sync_tables(self, start: int, mask: MaskConfig) -> None:
        """The device copy of the key table, for slots [0, keys.n): only what changed since the last call."""
        end = self.keys.n
        first = min(self._tables_n, start)  # slots before it are unchanged on the device
        self._k_pos[0, first:end].copy_(torch.from_numpy(self.keys.positions_buf[first:end]))
        self._k_turn[0, first:end].copy_(torch.from_numpy(self.keys.turns_buf[first:end]))
        self._tables_n = end
        if mask != self._mask_now:
            self._window.fill_(WINDOW_OFF if mask.window is None else mask.window)
            self._sinks.fill_(mask.sinks)
            self._mask_now = mask
        self._start.fill_(start)

    # --------------------------------------------------------------------------------------- forward
    @property
    def n(self) -> int:
        return self.keys.n

    @torch.inference_mode()
    def forward(self, token_ids, positions, turns, *, mask: MaskConfig):
        start = self.keys.n
        self.keys.append(positions, turns)
        try:
            return self._forward(token_ids, positions, turns, start, mask)
        except BaseException:
            self.keys.truncate(start)  # the slots were never filled
            raise

    def _forward(self, token_ids, positions, turns, start: int, mask: MaskConfig) -> np.ndarray:
        if not self.fused:
            ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64), device=self.device)[None]  # (1, T)
            logits = self.decoder(ids, positions, turns, mask, caches=self.caches, start=start,
                                  key_positions=self.keys.positions, key_turns=self.keys.turns,
                                  last_only=True)  # (1, 1, V)
            return logits[0, -1].float().cpu().numpy()
        self._sync_tables(start, mask)
        if len(token_ids) == 1 and self.cuda_graphs:
            self._ids.fill_(int(token_ids[0]))
            self._q_pos.fill_(int(positions[0]))
            self._q_turn.fill_(int(turns[0]))
            if self._graph is None:
                self._capture()
            self._graph.replay()
            return self._graph_logits[0, -1].float().cpu().numpy()
        as_row = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64), device=self.device)[None]  # noqa: E731
        ids = as_row(token_ids)
        logits = self.decoder(ids, None, None, mask, caches=self.caches, last_only=True,
                              fused=self._inputs(as_row(positions), as_row(turns)))
        return logits[0, -1].float().cpu().numpy()

    def _decode_step(self) -> torch.Tensor:
        return self.decoder(self._ids, None, None, None, caches=self.caches, last_only=True,
                            fused=self._inputs(self._q_pos, self._q_turn))

    def _capture(self) -> None:
        """Warm up on a side stream (the step is idempotent: it rewrites the same slot), then capture it."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._decode_step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_logits = self._decode_step()
        self._graph = graph

    # ------------------------------------------------------------------------------------- the cache
    def truncate(self, n: int) -> None:
        self.keys.truncate(n)  # slots past n are simply overwritten by the next forward
        if self.fused:
            self._tables_n = min(self._tables_n, n)

    @torch.inference_mode()
    def keep(self, slots: np.ndarray) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        index = torch.as_tensor(slots, device=self.device)
        for cache in self.caches:
            cache.keep(index)
        self.keys.keep(slots)
        if self.fused:
            self._tables_n = 0  # slots moved: the next call rewrites the whole key table

    @torch.inference_mode()
    def read_kv(self) -> np.ndarray:
        n = self.keys.n  # (L, 2, Hkv, n, D), batch 1
        return torch.stack([torch.stack([c.k[0, :, :n], c.v[0, :, :n]]) for c in self.caches]).float().cpu().numpy()

    @torch.inference_mode()
    def write_kv(self, kv: np.ndarray, positions: np.ndarray, turns: np.ndarray) -> None:
        n = kv.shape[3]
        for cache, layer in zip(self.caches, kv):
            cache.k[0, :, :n] = torch.from_numpy(layer[0]).to(cache.k)
            cache.v[0, :, :n] = torch.from_numpy(layer[1]).to(cache.v)
        self.keys.load(positions, turns)
        if self.fused:
            self._tables_n = 0
