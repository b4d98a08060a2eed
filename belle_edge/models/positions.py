"""Positions: LLaMA's rotary embedding (RoPE) and BLOOM's ALiBi slopes, in one place.

The canonical decoder, the fused attention op's reference (``belle_edge/ops``) and the CUDA torch backend all
rotate with these functions and these frequencies, so the three cannot drift apart.
"""
from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """LLaMA's RoPE frequencies (D/2,) in fp32; the fused kernels take them as they are."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (..., T, D) for absolute positions (..., T), LLaMA's half-split layout, in fp32."""
    inv_freq = rope_inv_freq(head_dim, theta, positions.device)
    freqs = positions.float()[..., None] * inv_freq  # (..., T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (T, D)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """BLOOM's ALiBi slopes for ``num_heads`` heads (geometric, with the interleaved extra set)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, num_heads - closest)
        slopes += [extra_base ** p for p in range(1, 2 * remaining, 2)]
    return torch.tensor(slopes, dtype=torch.float32)
