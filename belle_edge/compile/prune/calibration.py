"""Calibration text and what pruning measures on it: one forward pass of the source model, with hooks.

Importance comes from activations on real text, not from weight magnitude alone:

* **block influence** of layer i: mean over tokens of 1 - cos(x_in, x_out) (ShortGPT): a layer that barely
  turns the residual stream is the cheapest to drop;
* **residual channels**: mean |output| of every norm that reads the stream (Minitron's embedding-channel
  score, summed over layers);
* **MLP channels**: mean |activation| times the norm of the channel's ``down_proj`` column: what the channel
  actually adds to the stream (a structured Wanda score);
* **query heads**: mean norm of the head's contribution ``o_proj[:, head] @ out_head`` to the stream;
* **head dims** (models whose heads shrink instead of going, BLOOM): per v-dim the same contribution score
  per channel, per q/k-dim sqrt(E[q_d^2] E[k_d^2]), the scale of its share of q.k.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import InputError
from ...core.fidelity import forward_chunks


def calibration_ids(tokenizer, texts: list[str], *, tokens: int, where: str = "calibration text") -> list[np.ndarray]:
    """Up to ``tokens`` ids, taken evenly from each text (so no language crowds out the other)."""
    per_text = max(1, tokens // max(1, len(texts)))
    chunks = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids[:max(2, per_text)]
        if len(ids) >= 2:  # a one-token chunk has no next token to learn anything from
            chunks.append(np.asarray(ids, dtype=np.int64))
    if not chunks:
        raise InputError(f"{where}: tokenizes to nothing (no tokens to calibrate on)")
    return chunks


@dataclass
class Stats:
    tokens: int
    block_influence: list[float]       # per layer
    hidden: torch.Tensor               # (C,)
    mlp: list[torch.Tensor]            # per layer (F,)
    q_heads: list[torch.Tensor]        # per layer (H,)
    v_dims: list[torch.Tensor]         # per layer (H*D,): o_proj input channel contribution
    qk_dims: list[torch.Tensor]        # per layer (H*D,) (MHA models)


@torch.no_grad()
def collect_stats(model, chunks: list[np.ndarray], *, seq: int = 512) -> Stats:
    """One teacher-forced pass over the calibration chunks with the measuring hooks on (see module docstring)."""
    sums = _Sums(model)
    handles = sums.attach(model)
    tokens = 0
    try:
        from tqdm import tqdm

        with tqdm(total=sum(len(c) for c in chunks), unit="tok", desc="calibration", leave=False,
                  file=sys.stderr) as bar:
            for ids, _logits in forward_chunks(model, chunks, seq=seq):  # a 7B model takes minutes here
                tokens += len(ids)
                bar.update(len(ids))
    finally:
        for h in handles:
            h.remove()
    return sums.stats(tokens)


class _Sums:
    """Running sums over all calibration tokens, filled by forward hooks on the canonical decoder."""

    def __init__(self, model):
        cfg = self.cfg = model.cfg
        n = cfg.num_layers
        self.bi = torch.zeros(n, dtype=torch.float64)
        self.hidden = torch.zeros(cfg.hidden_size, dtype=torch.float64)
        self.mlp, self.heads, self.v, self.q2, self.k2 = ([0.0] * n for _ in range(5))

    def attach(self, model) -> list:
        """Register the hooks; returns their handles."""
        handles = []
        for i, layer in enumerate(model.layers):
            handles += [layer.register_forward_hook(self._on_block(i)),
                        layer.attn_norm.register_forward_hook(self._on_norm),
                        layer.mlp_norm.register_forward_hook(self._on_norm),
                        layer.mlp.down_proj.register_forward_pre_hook(self._on_down(i, layer.mlp.down_proj.weight)),
                        layer.attn.o_proj.register_forward_pre_hook(self._on_o(i, layer.attn.o_proj.weight))]
            if self.cfg.num_kv_heads == self.cfg.num_heads:  # heads that shrink (BLOOM): per-dim q/k scale
                handles += [layer.attn.q_proj.register_forward_hook(self._on_square(self.q2, i)),
                            layer.attn.k_proj.register_forward_hook(self._on_square(self.k2, i))]
        handles.append(model.norm.register_forward_hook(self._on_norm))
        return handles

    def _on_norm(self, _m, _args, out):
        self.hidden += out.abs().double().sum(dim=(0, 1))

    def _on_block(self, i):
        def hook(_m, args, out):
            cos = torch.nn.functional.cosine_similarity(args[0].double(), out.double(), dim=-1)
            self.bi[i] += (1 - cos).sum()
        return hook

    def _on_down(self, i, weight):
        col_norm = weight.double().norm(dim=0)  # (F,)

        def hook(_m, args):
            self.mlp[i] = self.mlp[i] + args[0].abs().double().sum(dim=(0, 1)) * col_norm
        return hook

    def _on_o(self, i, weight):
        cfg = self.cfg
        w = weight.double().view(cfg.hidden_size, cfg.num_heads, cfg.head_dim)  # (C, H, D)
        col_norm = weight.double().norm(dim=0)  # (H*D,)

        def hook(_m, args):
            a = args[0].double()  # (B, T, H*D)
            self.v[i] = self.v[i] + a.abs().sum(dim=(0, 1)) * col_norm
            contrib = torch.einsum("bthd,chd->bthc", a.view(*a.shape[:2], cfg.num_heads, cfg.head_dim), w)
            self.heads[i] = self.heads[i] + contrib.norm(dim=-1).sum(dim=(0, 1))
        return hook

    @staticmethod
    def _on_square(sums: list, i: int):
        def hook(_m, _args, out):
            sums[i] = sums[i] + out.double().pow(2).sum(dim=(0, 1))
        return hook

    def stats(self, tokens: int) -> Stats:
        def mean(x):
            return (x / tokens).float() if isinstance(x, torch.Tensor) else torch.zeros(0)

        qk = [((q / tokens) * (k / tokens)).sqrt().float() if isinstance(q, torch.Tensor) else torch.zeros(0)
              for q, k in zip(self.q2, self.k2)]
        return Stats(tokens=tokens, block_influence=[float(b / tokens) for b in self.bi], hidden=mean(self.hidden),
                     mlp=[mean(x) for x in self.mlp], q_heads=[mean(x) for x in self.heads],
                     v_dims=[mean(x) for x in self.v], qk_dims=qk)
