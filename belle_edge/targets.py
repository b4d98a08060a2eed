"""The devices belle_edge compiles for: one table, read by `compile` (precision and memory checks), the
engine builder (which builder, which SM) and the TensorRT runtime (does this engine fit this machine).

Figures from DESIGN.md. ``builder``: ``onnxruntime`` (no engine), ``tensorrt`` (a user's TensorRT, where it
is installed: NGC, an SDK), ``tensorrt-rtx`` (ahead of time on any machine, from the registry),
``tensorrt-on-device`` (JetPack's TensorRT on the Jetson itself: jetson/).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

GIB = 2**30


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    sm: int | None  # compute capability as 87 for sm_87; None for the CPU
    memory_gb: float  # what the model and its KV cache may use (Jetson: shared with the CPU)
    bandwidth_gbs: float | None
    precisions: tuple[str, ...]
    builders: tuple[str, ...]  # in order of preference

    @property
    def gpu(self) -> bool:
        return self.sm is not None


TARGETS = {t.name: t for t in (
    Target("orin-agx", "Jetson AGX Orin 64GB (JetPack 6.x)", 87, 64, 204.8, ("fp16", "int8", "int4"),
           ("tensorrt-on-device",)),
    Target("orin-nx", "Jetson Orin NX 16GB (JetPack 6.x)", 87, 16, 102.4, ("fp16", "int8", "int4"),
           ("tensorrt-on-device",)),
    Target("orin-nano", "Jetson Orin Nano 8GB (JetPack 6.x)", 87, 8, 68.0, ("fp16", "int8", "int4"),
           ("tensorrt-on-device",)),
    Target("rtx3090", "GeForce RTX 3090 24GB", 86, 24, 936, ("fp16", "int8", "int4"),
           ("tensorrt-rtx", "tensorrt")),
    Target("a100", "A100 80GB SXM", 80, 80, 2039, ("fp16", "bf16", "int8", "int4"), ("tensorrt",)),
    Target("a100-40", "A100 40GB", 80, 40, 1555, ("fp16", "bf16", "int8", "int4"), ("tensorrt",)),
    Target("h100", "H100 80GB SXM", 90, 80, 3350, ("fp16", "bf16", "fp8", "int8", "int4"), ("tensorrt",)),
    Target("cpu", "any CPU (ONNX Runtime)", None, 0, None, ("fp32", "fp16", "int8", "int4"), ("onnxruntime",)),
)}
ALIASES = {"orin": "orin-agx"}


def get_target(name: str) -> Target:
    target = TARGETS.get(ALIASES.get(name, name))
    if target is None:
        raise InputError(f"target {name!r}: unknown; known: {', '.join(list(TARGETS) + list(ALIASES))}")
    return target


def check_precision(target: Target, precision: str) -> None:
    if precision not in target.precisions:
        raise InputError(f"precision {precision!r} is not available on target {target.name} "
                         f"({target.description}); it supports {', '.join(target.precisions)}")


BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0 + 4 / 32, "int4": 0.5 + 4 / 32}
KV_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 2, "int8": 2, "int4": 2}  # the cache stays in half precision


def check_memory(target: Target, precision: str, *, params: int, layers: int, kv_heads: int, head_dim: int,
                 kv_tokens: int) -> dict:
    """Refuse a model whose weights + KV cache exceed the target's memory; returns the arithmetic."""
    weights = params * BYTES_PER_WEIGHT[precision]
    kv = kv_tokens * layers * 2 * kv_heads * head_dim * KV_BYTES[precision]
    need = weights + kv
    record = {"weights_gib": round(weights / GIB, 3), "kv_cache_gib": round(kv / GIB, 3),
              "total_gib": round(need / GIB, 3), "target_gib": target.memory_gb, "kv_tokens": kv_tokens}
    if target.memory_gb and need > target.memory_gb * GIB:
        raise InputError(
            f"the model does not fit {target.name} ({target.memory_gb:g} GiB): weights {params:,} x "
            f"{BYTES_PER_WEIGHT[precision]:g} B = {weights / GIB:.2f} GiB + KV cache {kv_tokens} tokens x {layers} "
            f"layers x 2 x {kv_heads} heads x {head_dim} x {KV_BYTES[precision]} B = {kv / GIB:.2f} GiB = "
            f"{need / GIB:.2f} GiB; prune it, quantize further, or lower --max-kv-tokens")
    return record
