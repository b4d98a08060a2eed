"""The canonical decoder: one compact torch model for both BELLE architectures.

Later passes (prune, export) work on this model, and the torch backend runs it. Architectural traits come
from ``ModelConfig`` fields (norm, mlp, positions), so there is no per-family branching beyond those.
Attention applies the turn-window mask from :mod:`belle_edge.mask` and nothing else.

Canonical parameter names (``{i}`` = layer)::

    embed.weight                      (V, C)
    embed_norm.{weight,bias}          (C,)        BLOOM only
    layers.{i}.attn_norm.weight       (C,)        (+ .bias for LayerNorm)
    layers.{i}.attn.q_proj.weight     (H*D, C)    (+ .bias when attention_bias or qkv_bias)
    layers.{i}.attn.k_proj.weight     (Hkv*D, C)
    layers.{i}.attn.v_proj.weight     (Hkv*D, C)
    layers.{i}.attn.o_proj.weight     (C, H*D)
    layers.{i}.attn.alibi_slopes      (H,)        ALiBi only: per layer, so pruned heads keep their slopes
    layers.{i}.mlp_norm.weight        (C,)
    layers.{i}.mlp.gate_proj.weight   (F, C)      SwiGLU only
    layers.{i}.mlp.up_proj.weight     (F, C)
    layers.{i}.mlp.down_proj.weight   (C, F)
    norm.weight                       (C,)
    lm_head.weight                    (V, C)      absent when tie_embeddings
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..mask import MaskConfig, visible
from .config import ModelConfig
from .positions import alibi_slopes, apply_rope, rope_tables


#: A linear on the CPU over up to SKINNY_MAX rows runs as (W @ xᵀ)ᵀ, SKINNY_ROWS rows at a time (past 4
#: rows that form gets slower than one pass per 4; see :class:`Linear`).
SKINNY_ROWS, SKINNY_MAX = 4, 16


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weightᵀ (+ bias)`` for a few rows on the CPU, as ``(weight @ xᵀ)ᵀ``: BLAS then streams the
    weight once, where ``x @ weightᵀ`` with more than one row packs the whole weight first. Measured on the
    default model's 151936 x 896 head (2 cores): 2 rows in 16 ms instead of 85, 4 rows 19 instead of 96;
    a whole decode step of 4 sequences 146 ms instead of 234. Same values up to rounding order."""
    if x.shape[-1] == 0 or x.numel() == 0:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    parts = [(weight @ rows[i:i + SKINNY_ROWS].T).T for i in range(0, rows.shape[0], SKINNY_ROWS)]
    y = (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


def _skinny(x: torch.Tensor) -> bool:
    # only under torch.inference_mode, as the runtime's backends run: training, the parity checks against
    # transformers (no_grad) and every other caller keep F.linear's summation order
    return (x.device.type == "cpu" and torch.is_inference_mode_enabled()
            and x.numel() <= SKINNY_MAX * x.shape[-1])


class Linear(nn.Linear):
    """``nn.Linear`` (so LoRA, hooks and pruning see one), with :func:`skinny_linear` for the runtime on the
    CPU over a few rows: a decode step, or the batched engine's few sequences."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _skinny(x):
            return skinny_linear(x, self.weight, self.bias)
        return super().forward(x)


def _make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rms":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


class KVCache:
    """Pre-allocated keys and values of one layer: (B, Hkv, capacity, D) each.

    Slots are written in place; which slot holds which token is the runtime's bookkeeping, not ours.
    """

    def __init__(self, batch: int, num_kv_heads: int, capacity: int, head_dim: int, *, dtype, device):
        self.k = torch.zeros(batch, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def keep(self, slots: torch.Tensor) -> None:
        """Compact: slot ``slots[i]`` moves to slot ``i`` (slots ascending)."""
        n = slots.numel()
        self.k[:, :, :n] = self.k[:, :, slots]
        self.v[:, :, :n] = self.v[:, :, slots]


@dataclass
class FusedInputs:
    """What the fused attention op (``belle::dynamic_mask_attention``, belle_edge/ops) reads, on the device.

    Everything that changes between decode steps is a tensor, so one captured CUDA graph replays every step.
    The op itself comes with the inputs: whoever chose the fused path (the torch backend) loaded it, so this
    module imports no op and registers nothing.
    """
    op: Callable                 # torch.ops.belle.dynamic_mask_attention (signature: belle_edge/ops/attention.py)
    start: torch.Tensor          # int32 (1,): cache slots before the new tokens
    q_pos: torch.Tensor          # int64 (1, T)
    q_turn: torch.Tensor         # int64 (1, T)
    k_pos: torch.Tensor          # int64 (1, capacity): the session's key table
    k_turn: torch.Tensor
    window: torch.Tensor         # int64 (1,); WINDOW_OFF = plain causal
    sinks: torch.Tensor          # int64 (1,)
    inv_freq: torch.Tensor | None  # fp32 (D/2,) for RoPE (the op rotates q and the new k), None for ALiBi
    max_keys: int                # the cache capacity: sizes the decode kernel's grid
    # ``belle::add_rms_norm`` (belle_edge/ops/norm.py) for RMSNorm models: each layer boundary's residual add
    # and norm as one op. None: the modules' own norms.
    norm_op: Callable | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        qkv_bias = cfg.qkv_has_bias
        self.q_proj = Linear(cfg.hidden_size, cfg.q_size, bias=qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.kv_size, bias=qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.kv_size, bias=qkv_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.qkv_proj = None  # q/k/v as one linear after Decoder.fuse_projections (the runtime only)
        if cfg.positions == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.num_heads))

    def forward(self, x, mask_bias, rel_pos, rope, cache: KVCache | None, start: int,
                fused: FusedInputs | None = None):
        # x: (B, T, C); mask_bias: (B or 1, T, K) float, 0 or -inf; rel_pos: (B or 1, T, K) p_k - p_q;
        # rope: (cos, sin) of (B or 1, 1, T, D), or None. ``cache``: a KVCache, or anything with its ``write``
        # (the batched runtime's view of several sequences' slots, runtime/backends/torch_pool.py)
        cfg = self.cfg
        b, t, _ = x.shape
        if self.qkv_proj is not None:  # one read of the input, one GEMV launch, for all three
            q, k, v = self.qkv_proj(x).split((cfg.q_size, cfg.kv_size, cfg.kv_size), -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if fused is not None:  # the kernels: RoPE, cache write, mask and attention in one op
            out = fused.op(
                q, k, v, cache.k, cache.v, fused.start, fused.q_pos, fused.q_turn, fused.k_pos, fused.k_turn,
                fused.window, fused.sinks, self.alibi_slopes if cfg.positions == "alibi" else None, fused.inv_freq,
                1.0 / math.sqrt(cfg.head_dim), fused.max_keys)
            return self.o_proj(out)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.write(start, k, v)  # (B, Hkv, K, D)
        bias = mask_bias[:, None]  # (B or 1, 1, T, K)
        if cfg.positions == "alibi":
            # slope * (p_k - p_q): the same per-row shift as BLOOM's slope * p_k, softmax ignores it
            bias = bias + self.alibi_slopes.float()[None, :, None, None] * rel_pos[:, None]  # (B or 1, H, T, K)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             enable_gqa=cfg.group_size > 1)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, cfg.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up_proj = None  # gate and up as one linear after Decoder.fuse_projections (the runtime only)

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, -1)
            return self.down_proj(F.silu(gate) * up)
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = _make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = _make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, mask_bias, rel_pos, rope, cache, start, fused=None):
        x = x + self.attn(self.attn_norm(x), mask_bias, rel_pos, rope, cache, start, fused)
        return x + self.mlp(self.mlp_norm(x))


def _as_tensor(a, device) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a)
    return torch.as_tensor(a, dtype=torch.long, device=device)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps) if cfg.embed_norm else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = _make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_caches(self, capacity: int, batch: int = 1) -> list[KVCache]:
        p = self.embed.weight
        return [KVCache(batch, self.cfg.num_kv_heads, capacity, self.cfg.head_dim, dtype=p.dtype, device=p.device)
                for _ in range(self.cfg.num_layers)]

    def forward(self, input_ids, positions, turns, mask: MaskConfig, *, caches: list[KVCache] | None = None,
                start: int = 0, key_positions=None, key_turns=None, last_only: bool = False,
                fused: FusedInputs | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) with ``last_only``.

        input_ids: (B, T). positions, turns: (T,) absolute position and turn of each new token, shared by the
        rows, or (B, T), one row each (the batched runtime). With ``caches``, the new K/V go to slots
        [start, start+T) and attention covers slots [0, start+T), whose positions and turns are
        ``key_positions`` / ``key_turns`` (start+T,) or (B, K) (a row's unused slots at a position no query
        reaches, so causality hides them). Without, the keys are
        the new tokens themselves. With ``fused`` (CUDA, ``caches`` required), ``input_ids`` is a device
        tensor and the tables come from ``fused`` instead of the arguments. ``allowed`` (T, K) bool replaces
        the mask computed from the tables: training rows that pack several dialogues pass ``mask.visible``
        restricted to each dialogue (belle_edge/train/collate.py).
        """
        if fused is not None:
            return self._forward_fused(input_ids, caches, fused, last_only)
        device = self.embed.weight.device
        input_ids = _as_tensor(input_ids, device)
        q_pos, q_turn = _as_tensor(positions, device), _as_tensor(turns, device)
        k_pos = q_pos if key_positions is None else _as_tensor(key_positions, device)
        k_turn = q_turn if key_turns is None else _as_tensor(key_turns, device)
        q_pos, q_turn, k_pos, k_turn = (a if a.dim() == 2 else a[None] for a in (q_pos, q_turn, k_pos, k_turn))
        if allowed is None:  # (B or 1, T, K)
            allowed = visible(q_pos[..., :, None], q_turn[..., :, None], k_pos[..., None, :], k_turn[..., None, :], mask)
        allowed = allowed.to(device)
        if allowed.dim() == 2:
            allowed = allowed[None]
        mask_bias = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))
        rel_pos = (k_pos[..., None, :] - q_pos[..., :, None]).float()
        rope = None
        if self.cfg.positions == "rope":
            rope = tuple(t[:, None] for t in rope_tables(q_pos, self.cfg.head_dim, self.cfg.rope_theta))

        x = self.embed(input_ids)  # (B, T, C)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask_bias, rel_pos, rope, None if caches is None else caches[i], start)
        return self._head(x, last_only)

    def _forward_fused(self, input_ids, caches, fused: FusedInputs, last_only: bool) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if fused.norm_op is not None and self.cfg.norm == "rms":
            return self._forward_fused_norms(x, caches, fused, last_only)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, None, None, None, cache, 0, fused)
        return self._head(x, last_only)

    def _forward_fused_norms(self, x, caches, fused: FusedInputs, last_only: bool) -> torch.Tensor:
        """Block.forward's arithmetic with each sublayer's output carried as a pending ``delta`` into the
        next norm: ``x, h = add_rms_norm(x, delta)`` is the residual add and the norm in one kernel."""
        norm, delta = fused.norm_op, None
        for layer, cache in zip(self.layers, caches):
            x, h = norm(x, delta, layer.attn_norm.weight, layer.attn_norm.eps)
            delta = layer.attn(h, None, None, None, cache, 0, fused)
            x, h = norm(x, delta, layer.mlp_norm.weight, layer.mlp_norm.eps)
            delta = layer.mlp(h)
        if last_only:  # the head reads the last position only
            x, delta = x[:, -1:], delta[:, -1:]
        _, h = norm(x, delta, self.norm.weight, self.norm.eps)
        if self.lm_head is not None:
            return self.lm_head(h)
        return F.linear(h, self.embed.weight)

    def _head(self, x, last_only: bool) -> torch.Tensor:
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        # the untied head is called as a module, so hooks and graph tracers (torch-pruning) see it
        if self.lm_head is not None:
            return self.lm_head(x)
        return skinny_linear(x, self.embed.weight) if _skinny(x) else F.linear(x, self.embed.weight)

    @torch.no_grad()
    def fuse_projections(self) -> "Decoder":
        """q/k/v into one linear, and SwiGLU's gate/up into one, in place: a decode step then reads each
        layer's input once per group and launches two GEMVs where it launched five. For the runtime's own
        copy of the model only: the fused model's state dict has the fused names, which no pass reads."""
        def fused(parts):
            out = Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                         device=parts[0].weight.device, dtype=parts[0].weight.dtype)
            out.weight.copy_(torch.cat([p.weight for p in parts]))
            if out.bias is not None:
                out.bias.copy_(torch.cat([p.bias for p in parts]))
            return out.requires_grad_(False)

        for layer in self.layers:
            a, m = layer.attn, layer.mlp
            if a.qkv_proj is None:
                a.qkv_proj = fused([a.q_proj, a.k_proj, a.v_proj])
                del a.q_proj, a.k_proj, a.v_proj
            if m.swiglu and m.gate_up_proj is None:
                m.gate_up_proj = fused([m.gate_proj, m.up_proj])
                del m.gate_proj, m.up_proj
        return self

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], *, where: str = "checkpoint",
                        dtype: torch.dtype = torch.float32, device="cpu") -> "Decoder":
        """Build the model and take the weights, refusing missing, unexpected or misshapen tensors."""
        with torch.device("meta"):
            model = cls(cfg)
        check_state_dict(model, state_dict, where=where)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()},
                              strict=True, assign=True)
        return model.eval()


def check_state_dict(model: nn.Module, state_dict: dict, *, where: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: weights missing for the configured model: {_first(missing)}")
    if unexpected:
        raise CheckpointError(f"{where}: weights the configured model does not have: {_first(unexpected)}")
    for name, shape in expected.items():
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise CheckpointError(
                f"{where}: config contradicts weights: {name} should be {list(shape)} by the config, got {list(got)}")


def _first(names: list[str], n: int = 3) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
