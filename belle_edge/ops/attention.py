"""``belle::dynamic_mask_attention``: the fused turn-window attention as a torch custom op.

CPU (and any device without the kernels) runs :func:`reference_attention`, plain torch over
:func:`belle_edge.mask.visible`; CUDA runs kernels/ (prefill and split-KV decode, see
kernels/include/belle_attention.h) through ctypes on the current stream, so the op can be captured in a
CUDA graph. Both write the new K/V into the cache in place and rotate q and the new k with RoPE when given
``rope_inv_freq``.

Arguments (B batch, H heads, Hkv kv heads, T new tokens, D head dim, C cache slots)::

    q (B, H, T, D), k_new / v_new (B, Hkv, T, D): any strides with D contiguous
    k_cache / v_cache (B, Hkv, C, D), contiguous, written at slots [start, start + T)
    start: int32 tensor of one element on the op's device (device memory, so a graph replays any length)
    q_pos / q_turn (B, T), k_pos / k_turn (B, >= start + T): int64 tables of positions and turns
    window / sinks: int64 one-element tensors (window = WINDOW_OFF: plain causal)
    alibi_slopes (H,) or None, rope_inv_freq (D/2,) fp32 or None, scale, max_keys >= start + T
    -> (B, T, H * D) in q's dtype
"""
from __future__ import annotations

import ctypes
import threading
from typing import Optional

import torch
from torch import Tensor

from ..mask import MaskConfig, visible
from ..models.positions import apply_rope
from ..targets import KERNELS


# --------------------------------------------------------------------------------------------- reference
def rotate(x: Tensor, pos: Tensor, inv_freq: Tensor) -> Tensor:
    """LLaMA's half-split RoPE of x (B, Hx, T, D) at positions pos (B, T): the model's own rotation
    (models/positions.py), with the given frequencies."""
    angles = pos.float()[..., None] * inv_freq.float()  # (B, T, D/2)
    emb = torch.cat((angles, angles), -1)[:, None]  # (B, 1, T, D)
    return apply_rope(x, emb.cos(), emb.sin())


def reference_attention(q, k_new, v_new, k_cache, v_cache, start, q_pos, q_turn, k_pos, k_turn, window, sinks,
                        alibi_slopes, rope_inv_freq, scale, max_keys) -> Tensor:
    """What the kernels compute, in plain torch (fp32 scores over the cache's rounded values)."""
    s, t = int(start.reshape(-1)[0]), q.shape[2]
    b, h, d = q.shape[0], q.shape[1], q.shape[3]
    if rope_inv_freq is not None:
        q, k_new = rotate(q, q_pos, rope_inv_freq), rotate(k_new, q_pos, rope_inv_freq)
    k_cache[:, :, s:s + t] = k_new
    v_cache[:, :, s:s + t] = v_new
    n = s + t
    group = h // k_cache.shape[1]
    keys = k_cache[:, :, :n].float().repeat_interleave(group, dim=1)
    values = v_cache[:, :, :n].float().repeat_interleave(group, dim=1)
    scores = q.float() @ keys.transpose(-1, -2) * scale  # (B, H, T, n)
    kp, kt = k_pos[:, :n], k_turn[:, :n]
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.float()[None, :, None, None] * (kp[:, None, None, :] - q_pos[:, None, :, None]).float()
    mask = MaskConfig(window=int(window.reshape(-1)[0]), sinks=int(sinks.reshape(-1)[0]))
    allowed = visible(q_pos[:, :, None], q_turn[:, :, None], kp[:, None, :], kt[:, None, :], mask)  # (B, T, n)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values  # (B, H, T, D)
    return out.transpose(1, 2).reshape(b, t, h * d).to(q.dtype)


# ---------------------------------------------------------------------------------------------- the op
@torch.library.custom_op("belle::dynamic_mask_attention", mutates_args=("k_cache", "v_cache"))
def dynamic_mask_attention(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor,
                           start: Tensor, q_pos: Tensor, q_turn: Tensor, k_pos: Tensor, k_turn: Tensor,
                           window: Tensor, sinks: Tensor, alibi_slopes: Optional[Tensor],
                           rope_inv_freq: Optional[Tensor], scale: float, max_keys: int) -> Tensor:
    return reference_attention(q, k_new, v_new, k_cache, v_cache, start, q_pos, q_turn, k_pos, k_turn, window,
                               sinks, alibi_slopes, rope_inv_freq, scale, max_keys)


@dynamic_mask_attention.register_fake
def _(q, k_new, v_new, k_cache, v_cache, start, q_pos, q_turn, k_pos, k_turn, window, sinks, alibi_slopes,
      rope_inv_freq, scale, max_keys):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1] * q.shape[3]))


@dynamic_mask_attention.register_kernel("cuda")
def _(q, k_new, v_new, k_cache, v_cache, start, q_pos, q_turn, k_pos, k_turn, window, sinks, alibi_slopes,
      rope_inv_freq, scale, max_keys):
    return _cuda_forward(q, k_new, v_new, k_cache, v_cache, start, q_pos, q_turn, k_pos, k_turn, window, sinks,
                         alibi_slopes, rope_inv_freq, scale, max_keys)


# ------------------------------------------------------------------------------------------ CUDA (ctypes)
class Params(ctypes.Structure):
    """BelleAttentionParams of kernels/include/belle_attention.h, field for field."""
    _fields_ = [
        ("dtype", ctypes.c_int), ("batch", ctypes.c_int), ("num_heads", ctypes.c_int),
        ("num_kv_heads", ctypes.c_int), ("head_dim", ctypes.c_int), ("new_tokens", ctypes.c_int),
        ("cache_capacity", ctypes.c_int), ("start", ctypes.c_int), ("start_device", ctypes.c_void_p),
        ("max_keys", ctypes.c_int),
        ("q", ctypes.c_void_p), ("q_stride_b", ctypes.c_int64), ("q_stride_h", ctypes.c_int64),
        ("q_stride_t", ctypes.c_int64),
        ("k_new", ctypes.c_void_p), ("v_new", ctypes.c_void_p), ("kv_new_stride_b", ctypes.c_int64),
        ("kv_new_stride_h", ctypes.c_int64), ("kv_new_stride_t", ctypes.c_int64),
        ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
        ("q_pos", ctypes.c_void_p), ("q_turn", ctypes.c_void_p), ("q_table_stride", ctypes.c_int64),
        ("k_pos", ctypes.c_void_p), ("k_turn", ctypes.c_void_p), ("k_table_stride", ctypes.c_int64),
        ("window", ctypes.c_void_p), ("sinks", ctypes.c_void_p),
        ("alibi_slopes", ctypes.c_void_p), ("rope_inv_freq", ctypes.c_void_p), ("scale", ctypes.c_float),
        ("out", ctypes.c_void_p), ("workspace", ctypes.c_void_p),
    ]


_DTYPES = {torch.float16: 0, torch.bfloat16: 1}
_lock = threading.Lock()
_library = None


def load_library():
    """The kernels' shared library for this GPU, built with nvcc on first use (cached on disk)."""
    global _library
    with _lock:
        if _library is None:
            from .build import build_library, declare

            major, minor = torch.cuda.get_device_capability()
            lib = ctypes.CDLL(build_library((major * 10 + minor,)))
            params = ctypes.POINTER(Params)
            declare(lib, {"belle_attention_forward": ([params, ctypes.c_void_p], ctypes.c_int),
                          "belle_attention_workspace_size": ([params], ctypes.c_size_t),
                          "belle_attention_error_string": ([ctypes.c_int], ctypes.c_char_p)})
            _library = lib
    return _library


def kernels_available(device=None, dtype=torch.float16, head_dim: int = 128, group: int = 1) -> tuple[bool, str]:
    """(True, "") when the CUDA kernels can serve this device/shape, else (False, why). The limits are
    belle_edge.targets.KERNELS."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU on this machine"
    if device is not None and torch.device(device).type != "cuda":
        return False, f"device {device} is not CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    why = KERNELS.refusal(head_dim=head_dim, group=group, dtype=str(dtype).removeprefix("torch."),
                          sm=major * 10 + minor)
    if why:
        return False, why
    try:
        load_library()
    except Exception as e:  # nvcc missing or failing: say so, fall back to the reference
        return False, f"kernel build failed: {e}"
    return True, ""


def _ptr(t: Optional[Tensor]):
    return None if t is None else t.data_ptr()


def _cuda_forward(q, k_new, v_new, k_cache, v_cache, start, q_pos, q_turn, k_pos, k_turn, window, sinks,
                  alibi_slopes, rope_inv_freq, scale, max_keys):
    lib = load_library()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_new.stride(-1) != 1 or k_new.stride() != v_new.stride():
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    b, h, t, d = q.shape
    out = torch.empty((b, t, h * d), dtype=q.dtype, device=q.device)
    if alibi_slopes is not None and alibi_slopes.dtype != q.dtype:
        alibi_slopes = alibi_slopes.to(q.dtype)
    p = Params(
        dtype=_DTYPES[q.dtype], batch=b, num_heads=h, num_kv_heads=k_cache.shape[1], head_dim=d, new_tokens=t,
        cache_capacity=k_cache.shape[2], start=0, start_device=start.data_ptr(), max_keys=max_keys,
        q=q.data_ptr(), q_stride_b=q.stride(0), q_stride_h=q.stride(1), q_stride_t=q.stride(2),
        k_new=k_new.data_ptr(), v_new=v_new.data_ptr(), kv_new_stride_b=k_new.stride(0),
        kv_new_stride_h=k_new.stride(1), kv_new_stride_t=k_new.stride(2),
        k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(),
        q_pos=q_pos.data_ptr(), q_turn=q_turn.data_ptr(), q_table_stride=q_pos.stride(0),
        k_pos=k_pos.data_ptr(), k_turn=k_turn.data_ptr(), k_table_stride=k_pos.stride(0),
        window=window.data_ptr(), sinks=sinks.data_ptr(), alibi_slopes=_ptr(alibi_slopes),
        rope_inv_freq=_ptr(rope_inv_freq), scale=scale, out=out.data_ptr(), workspace=None)
    size = lib.belle_attention_workspace_size(ctypes.byref(p))
    workspace = torch.empty(size, dtype=torch.uint8, device=q.device) if size else None
    p.workspace = _ptr(workspace)
    code = lib.belle_attention_forward(ctypes.byref(p), ctypes.c_void_p(torch.cuda.current_stream(q.device).cuda_stream))
    if code != 0:
        raise RuntimeError(f"belle_attention_forward: {lib.belle_attention_error_string(code).decode()}")
    return out
