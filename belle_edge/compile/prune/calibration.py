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
    cfg = model.cfg
    n_layers, heads, d = cfg.num_layers, cfg.num_heads, cfg.head_dim
    acc = {"bi": torch.zeros(n_layers, dtype=torch.float64),
           "hidden": torch.zeros(cfg.hidden_size, dtype=torch.float64),
           "mlp": [0.0] * n_layers, "heads": [0.0] * n_layers, "v": [0.0] * n_layers,
           "q2": [0.0] * n_layers, "k2": [0.0] * n_layers}
    hooks = []

    def on_norm(_m, _args, out):
        acc["hidden"] += out.abs().double().sum(dim=(0, 1))

    def on_block(i):
        def hook(_m, args, out):
            x = args[0]
            cos = torch.nn.functional.cosine_similarity(x.double(), out.double(), dim=-1)
            acc["bi"][i] += (1 - cos).sum()
        return hook

    def on_down(i, weight):
        col_norm = weight.double().norm(dim=0)  # (F,)

        def hook(_m, args):
            acc["mlp"][i] = acc["mlp"][i] + args[0].abs().double().sum(dim=(0, 1)) * col_norm
        return hook

    def on_o(i, weight):
        w = weight.double().view(cfg.hidden_size, heads, d)  # (C, H, D)
        col_norm = weight.double().norm(dim=0)  # (H*D,)

        def hook(_m, args):
            a = args[0].double()  # (B, T, H*D)
            acc["v"][i] = acc["v"][i] + a.abs().sum(dim=(0, 1)) * col_norm
            contrib = torch.einsum("bthd,chd->bthc", a.view(*a.shape[:2], heads, d), w)
            acc["heads"][i] = acc["heads"][i] + contrib.norm(dim=-1).sum(dim=(0, 1))
        return hook

    def on_sq(i, key):
        def hook(_m, _args, out):
            acc[key][i] = acc[key][i] + out.double().pow(2).sum(dim=(0, 1))
        return hook

    for i, layer in enumerate(model.layers):
        hooks += [layer.register_forward_hook(on_block(i)),
                  layer.attn_norm.register_forward_hook(on_norm), layer.mlp_norm.register_forward_hook(on_norm),
                  layer.mlp.down_proj.register_forward_pre_hook(on_down(i, layer.mlp.down_proj.weight)),
                  layer.attn.o_proj.register_forward_pre_hook(on_o(i, layer.attn.o_proj.weight))]
        if cfg.num_kv_heads == cfg.num_heads:
            hooks += [layer.attn.q_proj.register_forward_hook(on_sq(i, "q2")),
                      layer.attn.k_proj.register_forward_hook(on_sq(i, "k2"))]
    hooks.append(model.norm.register_forward_hook(on_norm))
    tokens = 0
    total = sum(len(c) for c in chunks)
    try:
        from tqdm import tqdm

        with tqdm(total=total, unit="tok", desc="calibration", leave=False, file=sys.stderr) as bar:
            for ids, _logits in forward_chunks(model, chunks, seq=seq):  # a 7B model takes minutes here
                tokens += len(ids)
                bar.update(len(ids))
    finally:
        for h in hooks:
            h.remove()

    def mean(x):
        return (x / tokens).float() if isinstance(x, torch.Tensor) else torch.zeros(0)

    qk = [((acc["q2"][i] / tokens) * (acc["k2"][i] / tokens)).sqrt().float()
          if isinstance(acc["q2"][i], torch.Tensor) else torch.zeros(0) for i in range(n_layers)]
    return Stats(tokens=tokens, block_influence=[float(b / tokens) for b in acc["bi"]],
                 hidden=mean(acc["hidden"]), mlp=[mean(x) for x in acc["mlp"]],
                 q_heads=[mean(x) for x in acc["heads"]], v_dims=[mean(x) for x in acc["v"]], qk_dims=qk)
