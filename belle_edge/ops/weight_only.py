"""``belle::weight_only_gemm``: ``Y = X @ W (+ bias)`` with W held as 4- or 8-bit codes and fp16/bf16 scales.

The layout is the artifact's ONNX contract (kernels/include/belle_weight_only.h), so codes packed here are
byte for byte what the TensorRT plugin reads from an engine:

* ``codes`` [K, N]: INT8 as ``torch.int8``; INT4 as ``torch.uint8`` [K, N/2], two signed nibbles per byte
  along N, the even column in the low nibble;
* ``scales``: INT4 [K / group, N] (group 128 in the contract), INT8 [N]; ``W = scale * code``.

CPU (and any device without the kernels) runs :func:`reference_gemm`: dequantize in the activation dtype
(one rounding, as ``DequantizeLinear``), then a matmul. CUDA runs kernels/src/weight_only.cu through ctypes
on the current stream (graph-capturable). :class:`WeightOnlyLinear` is the module the torch backend swaps in
for ``nn.Linear`` (:func:`quantize_linears`).
"""
from __future__ import annotations

import ctypes
import threading
from typing import Optional

import torch
from torch import Tensor, nn

GROUP = 128  # INT4 inputs per scale: the contract of compile/weight_only.py and the plugin
QMAX = {4: 7, 8: 127}


# ------------------------------------------------------------------------------------------- packing
def pack_int4(codes: Tensor) -> Tensor:
    """int8 codes in [-8, 7] of shape [K, N] (N even) -> uint8 [K, N/2], ONNX's INT4 storage order."""
    if codes.shape[-1] % 2:
        raise ValueError(f"INT4 packing needs an even number of columns, got {codes.shape[-1]}")
    nib = codes.to(torch.int16) & 0xF
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [K, N/2] -> int8 codes [K, N] (sign-extended nibbles)."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    codes = torch.stack((lo, hi), -1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return torch.where(codes >= 8, codes - 16, codes).to(torch.int8)


def quantize_rtn(weight_kn: Tensor, bits: int, group: int = GROUP, scale_dtype: torch.dtype = torch.float16
                 ) -> tuple[Tensor, Tensor]:
    """Symmetric round-to-nearest of W [K, N]: (codes int8 [K, N], scales [K/group, N] | [N] in
    ``scale_dtype``). ``scale = max|w| / qmax`` per INT4 group of ``group`` inputs of a column, per column
    for INT8, rounded to ``scale_dtype`` before the codes are, so codes and stored scales agree."""
    w = weight_kn.float()
    k, n = w.shape
    if bits == 4:
        if k % group:
            raise ValueError(f"INT4 needs the input width ({k}) to be a multiple of the group ({group})")
        peak = w.reshape(k // group, group, n).abs().amax(1)  # [K/group, N]
        scales = (peak / QMAX[4]).clamp_min(1e-6).to(scale_dtype).float()
        codes = (w.reshape(k // group, group, n) / scales[:, None]).round().clamp(-8, 7).reshape(k, n)
    elif bits == 8:
        scales = (w.abs().amax(0) / QMAX[8]).clamp_min(1e-6).to(scale_dtype).float()  # [N]
        codes = (w / scales).round().clamp(-128, 127)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return codes.to(torch.int8), scales.to(scale_dtype)


def dequantize(codes: Tensor, scales: Tensor, bits: int, group: int, dtype: torch.dtype) -> Tensor:
    """W [K, N] in ``dtype``: the code (exact) times the scale in ``dtype``, rounded once to ``dtype``
    (the product of a small integer and a 16-bit scale is exact in fp32), as the kernels do."""
    c = (unpack_int4(codes) if bits == 4 else codes).float()
    s = scales.to(dtype).float()
    if bits == 4:
        s = s.repeat_interleave(group, 0)
    return (c * s).to(dtype)


def reference_gemm(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], bits: int, group: int) -> Tensor:
    w = dequantize(codes, scales, bits, group, x.dtype)
    y = x @ w
    return y if bias is None else y + bias.to(y.dtype)


# ---------------------------------------------------------------------------------------------- the op
@torch.library.custom_op("belle::weight_only_gemm", mutates_args=())
def weight_only_gemm(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], bits: int,
                     group: int) -> Tensor:
    return reference_gemm(x, codes, scales, bias, bits, group)


@weight_only_gemm.register_fake
def _(x, codes, scales, bias, bits, group):
    n = codes.shape[-1] * (2 if bits == 4 else 1)
    return x.new_empty((*x.shape[:-1], n))


@weight_only_gemm.register_kernel("cuda")
def _(x, codes, scales, bias, bits, group):
    return _cuda_gemm(x, codes, scales, bias, bits, group)


class Params(ctypes.Structure):
    """BelleWeightOnlyParams of kernels/include/belle_weight_only.h, field for field."""
    _fields_ = [
        ("dtype", ctypes.c_int), ("bits", ctypes.c_int), ("m", ctypes.c_int), ("n", ctypes.c_int),
        ("k", ctypes.c_int), ("group", ctypes.c_int),
        ("x", ctypes.c_void_p), ("x_stride", ctypes.c_int64), ("codes", ctypes.c_void_p),
        ("scales", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("y", ctypes.c_void_p),
        ("y_stride", ctypes.c_int64), ("workspace", ctypes.c_void_p), ("tile_counters", ctypes.c_void_p),
    ]


_DTYPES = {torch.float16: 0, torch.bfloat16: 1}
_lock = threading.Lock()
_bound = None
_counters: dict[tuple, Tensor] = {}  # (device, tiles) -> int32 zeros the kernel leaves at zero


def _library():
    global _bound
    with _lock:
        if _bound is None:
            from .attention import load_library  # one shared library holds every kernel of kernels/src

            _bound = bind(load_library())
    return _bound


def bind(lib):
    """Declare the weight-only entry points of the kernels' library ``lib`` (a ctypes.CDLL); returns it."""
    from .build import declare

    params = ctypes.POINTER(Params)
    declare(lib, {"belle_weight_only_gemm": ([params, ctypes.c_void_p], ctypes.c_int),
                  "belle_weight_only_workspace_size": ([params], ctypes.c_size_t),
                  "belle_weight_only_counters_size": ([params], ctypes.c_size_t),
                  "belle_weight_only_dequantize": ([params, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int),
                  "belle_weight_only_error_string": ([ctypes.c_int], ctypes.c_char_p)})
    return lib


def _params(x: Tensor | None, codes: Tensor, scales: Tensor, bits: int, group: int, dtype) -> Params:
    k = codes.shape[0]
    n = codes.shape[1] * (2 if bits == 4 else 1)
    m = 0 if x is None else x.numel() // k
    return Params(dtype=_DTYPES[dtype], bits=bits, m=m, n=n, k=k, group=group, codes=codes.data_ptr(),
                  scales=scales.data_ptr(), x=None if x is None else x.data_ptr(), x_stride=k, y_stride=n)


def _check(lib, code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what}: {lib.belle_weight_only_error_string(code).decode()}")


def _cuda_gemm(x, codes, scales, bias, bits, group):
    if x.dtype not in _DTYPES:  # the kernels run fp16/bf16 activations only; fp32 on CUDA: the reference
        return reference_gemm(x, codes, scales, bias, bits, group)
    lib = _library()
    x = x.contiguous()
    if scales.dtype != x.dtype:
        scales = scales.to(x.dtype)
    p = _params(x, codes, scales, bits, group, x.dtype)
    y = torch.empty((*x.shape[:-1], p.n), dtype=x.dtype, device=x.device)
    p.y = y.data_ptr()
    p.bias = None if bias is None else bias.to(x.dtype).contiguous().data_ptr()
    size = lib.belle_weight_only_workspace_size(ctypes.byref(p))
    workspace = torch.empty(size, dtype=torch.uint8, device=x.device) if size else None
    if workspace is not None:
        tiles = lib.belle_weight_only_counters_size(ctypes.byref(p)) // 4
        key = (x.device, tiles)
        if key not in _counters:  # zeroed once; every call leaves them zero (the last block of a tile resets it)
            _counters[key] = torch.zeros(tiles, dtype=torch.int32, device=x.device)
        p.workspace, p.tile_counters = workspace.data_ptr(), _counters[key].data_ptr()
    stream = torch.cuda.current_stream(x.device).cuda_stream
    _check(lib, lib.belle_weight_only_gemm(ctypes.byref(p), ctypes.c_void_p(stream)), "belle_weight_only_gemm")
    return y


def cuda_dequantize(codes: Tensor, scales: Tensor, bits: int, group: int, dtype: torch.dtype) -> Tensor:
    """W [K, N] dequantized by the kernels (CUDA tensors): checks the in-kernel dequantization alone."""
    lib = _library()
    scales = scales.to(dtype).contiguous()
    p = _params(None, codes, scales, bits, group, dtype)
    w = torch.empty((p.k, p.n), dtype=dtype, device=codes.device)
    stream = torch.cuda.current_stream(codes.device).cuda_stream
    _check(lib, lib.belle_weight_only_dequantize(ctypes.byref(p), w.data_ptr(), ctypes.c_void_p(stream)),
           "belle_weight_only_dequantize")
    return w


# ------------------------------------------------------------------------------------------ the module
class WeightOnlyLinear(nn.Module):
    """A linear layer whose weight is held as codes + scales (buffers, so ``.to(device)`` moves them);
    forward is :func:`weight_only_gemm`. Built from an ``nn.Linear`` by :meth:`from_linear` (RTN)."""

    def __init__(self, codes: Tensor, scales: Tensor, bias: Optional[Tensor], bits: int, group: int):
        super().__init__()
        self.bits, self.group = bits, group
        self.in_features = codes.shape[0]
        self.out_features = codes.shape[1] * (2 if bits == 4 else 1)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group: int = GROUP) -> "WeightOnlyLinear":
        # fp16/bf16 models: scales in their dtype, as the kernels take them; fp32 (the CPU reference): fp32
        dtype = linear.weight.dtype if linear.weight.dtype in (*_DTYPES, torch.float32) else torch.float16
        codes, scales = quantize_rtn(linear.weight.detach().T, bits, group, dtype)  # [K, N]
        if bits == 4:
            codes = pack_int4(codes)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(codes.contiguous(), scales.contiguous(), bias, bits, group)

    def forward(self, x: Tensor) -> Tensor:
        return weight_only_gemm(x, self.codes, self.scales, self.bias, self.bits, self.group)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}, group={self.group}"


def quantize_linears(model: nn.Module, bits: int, group: int = GROUP, *, skip: tuple[str, ...] = ("lm_head",)) -> dict:
    """Swap every ``nn.Linear`` of ``model`` (but those named in ``skip``) for a :class:`WeightOnlyLinear`
    by RTN, in place. INT4 leaves a linear whose input width is not a multiple of ``group`` as it is.
    Returns {"bits", "group", "linears", "kept": [names left in float]}."""
    quantized, kept = 0, []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            full = f"{name}.{child_name}" if name else child_name
            if child_name in skip or (bits == 4 and child.in_features % group) or child.out_features % (32 if bits == 4 else 16):
                kept.append(full)
                continue
            setattr(module, child_name, WeightOnlyLinear.from_linear(child, bits, group))
            quantized += 1
    return {"bits": bits, "group": group if bits == 4 else None, "linears": quantized, "kept": kept}
