"""Cutting a canonical model down to a selection of its vocabulary, layers, heads and channels.

Structured pruning removes whole coupled dimensions: a residual channel lives in the embedding, every norm,
the input of every projection and the output of ``o_proj``/``down_proj``; an MLP channel in
``gate``/``up`` rows and ``down`` columns; a KV head in ``k``/``v`` rows, its query heads in ``q`` rows and
``o_proj`` columns. Torch-pruning's DependencyGraph finds such groups by tracing a forward pass; on the
canonical decoder (torch-pruning 1.6.1, torch 2.13) that trace does find the MLP and residual groups but
hangs on the tied embedding and on the attention path, and tracing a 7B model costs a host forward with
autograd. The canonical layout is fixed (``models/decoder.py``), so the groups are declared here once, on the
state dict; ``tests/test_prune.py`` checks them against torch-pruning's trace where that trace works.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...models.config import ModelConfig


@dataclass
class Selection:
    """What survives, as indices into the source model (each ascending). ``None`` keeps everything."""
    vocab: torch.Tensor | None = None          # token ids kept (the tokenizer is rewritten to match)
    hidden: torch.Tensor | None = None         # residual channels kept
    layers: list[int] | None = None            # source layers kept, in order
    kv_heads: dict[int, torch.Tensor] = field(default_factory=dict)   # per source layer: KV heads kept
    q_heads: dict[int, torch.Tensor] = field(default_factory=dict)    # per source layer: query heads kept,
    #                                            grouped by kept KV head (len = kept KV heads x new group size)
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)        # per source layer: MLP channels kept
    qk_dims: dict[int, torch.Tensor] = field(default_factory=dict)    # per source layer (H, D'): q/k dims per head
    v_dims: dict[int, torch.Tensor] = field(default_factory=dict)     # per source layer (H, D'): v/o dims per head


def slice_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], sel: Selection,
                new_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict of ``new_cfg`` cut out of ``sd`` by ``sel`` (weights copied, never views)."""
    out = {}
    layers = list(range(cfg.num_layers)) if sel.layers is None else sel.layers
    for name, t in sd.items():
        if not name.startswith("layers."):
            out[name] = _cut_top(name, t, sel)
    for new_i, old_i in enumerate(layers):
        prefix = f"layers.{old_i}."
        for name, t in sd.items():
            if name.startswith(prefix):
                rest = name[len(prefix):]
                out[f"layers.{new_i}.{rest}"] = _cut_layer(rest, t, old_i, cfg, new_cfg, sel)
    return {k: v.contiguous().clone() for k, v in out.items()}


def _rows(t, idx):
    return t if idx is None else t.index_select(0, idx)


def _cols(t, idx):
    return t if idx is None else t.index_select(1, idx)


def _cut_top(name: str, t: torch.Tensor, sel: Selection) -> torch.Tensor:
    if name in ("embed.weight", "lm_head.weight"):
        return _cols(_rows(t, sel.vocab), sel.hidden)
    return _rows(t, sel.hidden)  # embed_norm.*, norm.*: one value per residual channel


def _head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of whole heads in a (heads x head_dim) projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _dim_channels(dims: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the kept dims of every head: dims is (H, D')."""
    return (torch.arange(dims.shape[0])[:, None] * head_dim + dims).reshape(-1)


def _cut_layer(rest: str, t: torch.Tensor, i: int, cfg: ModelConfig, new: ModelConfig,
               sel: Selection) -> torch.Tensor:
    module, _, kind = rest.rpartition(".")
    d = cfg.head_dim
    if module in ("attn_norm", "mlp_norm"):
        return _rows(t, sel.hidden)
    if rest == "attn.alibi_slopes":  # one slope per head; heads are only ever cut in RoPE models
        return t if i not in sel.q_heads else t.index_select(0, sel.q_heads[i])
    if module in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
        if module == "attn.q_proj":
            rows = _head_channels(sel.q_heads[i], d) if i in sel.q_heads else None
            if i in sel.qk_dims:
                rows = _dim_channels(sel.qk_dims[i], d)
        elif module == "attn.k_proj":
            rows = _head_channels(sel.kv_heads[i], d) if i in sel.kv_heads else None
            if i in sel.qk_dims:
                rows = _dim_channels(sel.qk_dims[i], d)
        else:
            rows = _head_channels(sel.kv_heads[i], d) if i in sel.kv_heads else None
            if i in sel.v_dims:
                rows = _dim_channels(sel.v_dims[i], d)
        t = _rows(t, rows)
        if module == "attn.q_proj" and new.head_dim != d:
            # attention divides q.k by sqrt(head_dim): fewer dims would sharpen every softmax, so scale q to
            # keep q.k / sqrt(D) exactly what the dims that remain contributed before
            t = t * math.sqrt(new.head_dim / d)
        return t if kind == "bias" else _cols(t, sel.hidden)
    if module == "attn.o_proj":
        if kind == "bias":
            return _rows(t, sel.hidden)
        cols = _head_channels(sel.q_heads[i], d) if i in sel.q_heads else None
        if i in sel.v_dims:
            cols = _dim_channels(sel.v_dims[i], d)
        return _cols(_rows(t, sel.hidden), cols)
    if module in ("mlp.gate_proj", "mlp.up_proj"):
        t = _rows(t, sel.mlp.get(i))
        return t if kind == "bias" else _cols(t, sel.hidden)
    if module == "mlp.down_proj":
        if kind == "bias":
            return _rows(t, sel.hidden)
        return _cols(_rows(t, sel.hidden), sel.mlp.get(i))
    raise AssertionError(f"slice_model: no rule for {rest}")
