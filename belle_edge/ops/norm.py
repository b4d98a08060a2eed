"""``belle::add_rms_norm``: a layer boundary's residual add and RMSNorm in one op (kernels/src/norm.cu on CUDA,
kernels/include/belle_norm.h; plain torch elsewhere). Returns ``(x + delta, rms_norm(x + delta) * weight)``.

The torch backend's fused decode step (models/decoder.py ``_forward_fused``) carries each layer's output as a
pending ``delta`` into the next norm, so the add and the norm's reduction and scaling are one kernel.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_add_rms_norm(x: Tensor, delta: Optional[Tensor], weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    h = x if delta is None else x + delta
    return h, F.rms_norm(h, (h.shape[-1],), weight, eps)


def fused_norm_op(cfg):
    """The op for a model's fused path: :func:`add_rms_norm` for RMSNorm models, None for LayerNorm ones
    (they keep their modules' norms)."""
    return add_rms_norm if cfg.norm == "rms" else None


@torch.library.custom_op("belle::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, delta: Optional[Tensor], weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    h, y = reference_add_rms_norm(x, delta, weight, eps)
    return (h.clone() if h is x else h), y  # a custom op may not return an input as it is


@add_rms_norm.register_fake
def _(x, delta, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@add_rms_norm.register_kernel("cuda")
def _(x, delta, weight, eps):
    if x.dtype not in _DTYPES or x.shape[-1] % 8 or x.shape[-1] > 16384:
        h, y = reference_add_rms_norm(x, delta, weight, eps)
        return (h.clone() if h is x else h), y
    lib = _library()
    x = x.contiguous()
    delta = None if delta is None else delta.contiguous()
    weight = weight.to(x.dtype).contiguous()
    h, y = torch.empty_like(x), torch.empty_like(x)
    p = Params(dtype=_DTYPES[x.dtype], rows=x.numel() // x.shape[-1], width=x.shape[-1], eps=eps, x=x.data_ptr(),
               delta=None if delta is None else delta.data_ptr(), weight=weight.data_ptr(), x_out=h.data_ptr(),
               y=y.data_ptr())
    code = lib.belle_add_rms_norm(ctypes.byref(p), ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream))
    if code != 0:
        raise RuntimeError(f"belle_add_rms_norm: {lib.belle_rms_norm_error_string(code).decode()}")
    return h, y


class Params(ctypes.Structure):
    """BelleRmsNormParams of kernels/include/belle_norm.h, field for field."""
    _fields_ = [("dtype", ctypes.c_int), ("rows", ctypes.c_int), ("width", ctypes.c_int), ("eps", ctypes.c_float),
                ("x", ctypes.c_void_p), ("delta", ctypes.c_void_p), ("weight", ctypes.c_void_p),
                ("x_out", ctypes.c_void_p), ("y", ctypes.c_void_p)]


_DTYPES = {torch.float16: 0, torch.bfloat16: 1}
_lock = threading.Lock()
_bound = None


def _library():
    global _bound
    with _lock:
        if _bound is None:
            from .attention import load_library  # one shared library holds every kernel of kernels/src

            _bound = bind(load_library())
    return _bound


def bind(lib):
    """Declare the norm entry points of the kernels' library ``lib`` (a ctypes.CDLL); returns it."""
    from .build import declare

    declare(lib, {"belle_add_rms_norm": ([ctypes.POINTER(Params), ctypes.c_void_p], ctypes.c_int),
                  "belle_rms_norm_error_string": ([ctypes.c_int], ctypes.c_char_p)})
    return lib
