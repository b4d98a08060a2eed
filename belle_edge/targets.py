"""What the hardware and our kernels can do: one table each, read by everything that asks.

* ``TARGETS``: the devices belle_edge compiles for (figures from DESIGN.md): compute capability, memory,
  bandwidth, precisions, and the engine builders in order of preference. ``compile`` checks precision and
  memory against it and picks the builder from it; the TensorRT runtime checks an engine against it;
  bandwidth gives the decode roofline that ``compile`` records and the benchmarks print. The bytes behind both
  (weights as stored, bytes read per decoded token, KV cache) are belle_edge/footprint.py's.
* ``BUILDERS``: what each engine builder is and which compute capabilities its engines *run* on.
  TensorRT-RTX's builder also accepts SM80, but its engines are supported only on RTX-class GPUs
  (7.5/8.6/8.9/12.x, its support matrix), so an A100 engine is TensorRT's job.
* ``KERNELS``: the limits of our CUDA kernels (kernels/src/api.cu checks the same; a test reads it):
  head sizes, query heads per KV head in decode, dtypes, the oldest SM. The torch op and the TensorRT
  plugin check models against this, and nothing else restates it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError
from .footprint import GIB, KV_BYTES, footprint, format_name, formats, kv_cache_bytes, params_only_bytes
from .models.config import ModelConfig


@dataclass(frozen=True)
class Builder:
    name: str
    module: str | None  # the Python module that builds (None: no engine)
    runs_on: tuple[int, ...] | None  # compute capabilities its engines run on; None: whatever TensorRT supports
    description: str


BUILDERS = {b.name: b for b in (
    Builder("tensorrt-rtx", "tensorrt_rtx", (75, 86, 89, 120, 121),
            "TensorRT-RTX (pip install 'belle_edge[trt]'): builds ahead of time on any machine, no GPU needed"),
    Builder("tensorrt", "tensorrt", None, "a TensorRT release installed by the user (NGC container, TensorRT SDK)"),
    Builder("tensorrt-on-device", "tensorrt", None,
            "JetPack's TensorRT on the Jetson itself: belle-edge build-engine ARTIFACT there (jetson/)"),
    Builder("onnxruntime", None, None, "no engine: ONNX Runtime runs the ONNX"),
)}


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    sm: int | None  # compute capability as 87 for sm_87; None for the CPU
    memory_gb: float  # what the model and its KV cache may use (Jetson: shared with the CPU)
    bandwidth_gbs: float | None  # peak memory bandwidth (None for "any CPU": measure it)
    precisions: tuple[str, ...]
    builders: tuple[str, ...]  # keys of BUILDERS, in order of preference
    max_batch: int = 1  # sequences an engine's profiles take by default (the batched server's slots)

    def __post_init__(self):
        for name in self.builders:
            runs_on = BUILDERS[name].runs_on
            assert runs_on is None or self.sm in runs_on, f"{self.name}: {name} engines do not run on sm_{self.sm}"

    @property
    def gpu(self) -> bool:
        return self.sm is not None

    @property
    def builds_on_device(self) -> bool:
        """The engine is built on the device itself (a Jetson), never ahead of time."""
        return self.builders == ("tensorrt-on-device",)

    def roofline_tok_s(self, bytes_per_token: float) -> float | None:
        """Decode tokens/s if every step read ``bytes_per_token`` at the peak bandwidth: an upper bound."""
        return None if not self.bandwidth_gbs or bytes_per_token <= 0 else self.bandwidth_gbs * 1e9 / bytes_per_token


TARGETS = {t.name: t for t in (
    Target("orin-agx", "Jetson AGX Orin 64GB (JetPack 6.x)", 87, 64, 204.8, ("fp16", "int8", "int4"),
           ("tensorrt-on-device",), max_batch=2),
    Target("orin-nx", "Jetson Orin NX 16GB (JetPack 6.x)", 87, 16, 102.4, ("fp16", "int8", "int4"),
           ("tensorrt-on-device",), max_batch=2),
    Target("orin-nano", "Jetson Orin Nano 8GB (JetPack 6.x)", 87, 8, 68.0, ("fp16", "int8", "int4"),
           ("tensorrt-on-device",), max_batch=2),
    Target("rtx3090", "GeForce RTX 3090 24GB", 86, 24, 936, ("fp16", "int8", "int4"), ("tensorrt-rtx", "tensorrt"),
           max_batch=4),
    Target("a100", "A100 80GB SXM", 80, 80, 2039, ("fp16", "bf16", "int8", "int4"), ("tensorrt",), max_batch=16),
    Target("a100-40", "A100 40GB", 80, 40, 1555, ("fp16", "bf16", "int8", "int4"), ("tensorrt",), max_batch=16),
    Target("h100", "H100 80GB SXM", 90, 80, 3350, ("fp16", "bf16", "fp8", "int8", "int4"), ("tensorrt",),
           max_batch=16),
    Target("h200", "H200 141GB SXM", 90, 141, 4800, ("fp16", "bf16", "fp8", "int8", "int4"), ("tensorrt",),
           max_batch=16),
    Target("cpu", "any CPU (ONNX Runtime)", None, 0, None, ("fp32", "fp16", "int8", "int4"), ("onnxruntime",)),
)}
ALIASES = {"orin": "orin-agx"}
# the GPUs the benchmarks may meet, by the name CUDA reports, for their roofline
DEVICE_NAMES = {"H200": "h200", "H100": "h100", "A100-SXM4-80GB": "a100", "A100": "a100-40", "RTX 3090": "rtx3090",
                "Orin": "orin-agx"}


def get_target(name: str) -> Target:
    target = TARGETS.get(ALIASES.get(name, name))
    if target is None:
        raise InputError(f"target {name!r}: unknown; known: {', '.join(list(TARGETS) + list(ALIASES))}")
    return target


def target_for_device(device_name: str) -> Target | None:
    """The target row of a GPU by the name CUDA gives it ("NVIDIA H200"), if we have one."""
    for key, name in DEVICE_NAMES.items():
        if key in device_name:
            return TARGETS[name]
    return None


def targets_for_sm(sm: int) -> list[str]:
    return [name for name, t in TARGETS.items() if t.sm == sm]


def check_precision(target: Target, precision: str) -> None:
    if precision not in target.precisions:
        raise InputError(f"precision {precision!r} is not available on target {target.name} "
                         f"({target.description}); it supports {', '.join(target.precisions)}")


# how much smaller a precision stores a weight than another: only to name the precisions that would shrink a
# model that does not fit (the arithmetic itself is footprint.py's)
_SIZE_RANK = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


def memory_record(target: Target, precision: str, *, kv_tokens: int, config: ModelConfig | None = None,
                  params: int | None = None, layers: int | None = None, kv_heads: int | None = None,
                  head_dim: int | None = None, head: str = "fp16", block_size: int = 32) -> dict:
    """The arithmetic of weights + KV cache against the target's memory, with the bytes one decode step reads and
    the decode roofline at the target's bandwidth; ``fits`` says whether it fits (always, where the target has
    no fixed memory: the CPU) and ``refusal`` why not, in one line.

    With ``config`` the weights are the bytes of the formats the compiler stores (footprint.py) and the shape
    comes from it. Without one, ``params``, ``layers``, ``kv_heads`` and ``head_dim`` describe the model and
    every parameter counts as a linear weight in the precision's format (no per-row scales, no fp16 head)."""
    if config is not None:
        fp = footprint(config, target, precision, head=head, block_size=block_size)
        params, weights, read, fmt = fp.parameters, fp.weights_bytes, fp.read_per_token_bytes, fp.describe()
        kv = kv_cache_bytes(config, precision, kv_tokens)
        layers, kv_heads, head_dim = config.num_layers, config.num_kv_heads, config.head_dim
    else:
        weights = read = params_only_bytes(params, target, precision, block_size=block_size)
        fmt = f"{format_name(formats(target.gpu, precision)['linears'], block_size)} (parameter count only)"
        kv = kv_tokens * layers * 2 * kv_heads * head_dim * KV_BYTES[precision]
    need = weights + kv
    roofline = target.roofline_tok_s(read)
    fits = not target.memory_gb or need <= target.memory_gb * GIB
    record = {"parameters": int(params), "weights_gib": round(weights / GIB, 3), "weights_format": fmt,
              "read_per_token_gb": round(read / 1e9, 3), "kv_cache_gib": round(kv / GIB, 3),
              "total_gib": round(need / GIB, 3), "target_gib": target.memory_gb, "kv_tokens": kv_tokens,
              "decode_roofline_tok_s": None if roofline is None else round(roofline, 1), "fits": fits}
    if not fits:
        smaller = [p for p in target.precisions if _SIZE_RANK[p] < _SIZE_RANK[precision]]
        quantize = f"quantize further (--precision {' or '.join(smaller)}), " if smaller else ""
        record["refusal"] = (
            f"the model does not fit {target.name} ({target.memory_gb:g} GiB): weights {params:,} parameters as "
            f"{fmt} = {weights / GIB:.2f} GiB + KV cache {kv_tokens} tokens x {layers} layers x 2 x {kv_heads} heads "
            f"x {head_dim} x {KV_BYTES[precision]} B = {kv / GIB:.2f} GiB = {need / GIB:.2f} GiB > "
            f"{target.memory_gb:g} GiB; prune it, {quantize}or lower --max-kv-tokens")
    return record


def check_memory(target: Target, precision: str, **model) -> dict:
    """Refuse a model whose weights + KV cache exceed the target's memory (one line with the arithmetic);
    returns :func:`memory_record`'s record. ``model``: its keyword arguments."""
    record = memory_record(target, precision, **model)
    if not record["fits"]:
        raise InputError(record["refusal"])
    return record


@dataclass(frozen=True)
class MemoryBudget:
    """A model must fit ``target`` at ``precision`` with a KV cache of ``max_kv_tokens`` (or its positions);
    ``head`` (GPU: "fp16" | "int8") and ``block_size`` (CPU blocks) pick the stored formats (footprint.py)."""
    target: Target
    precision: str
    max_kv_tokens: int
    head: str = "fp16"
    block_size: int = 32

    def check(self, config: ModelConfig, params: int | None = None) -> dict:
        """Refuses with the arithmetic; returns it. ``params``: the checkpoint's own count, recorded as
        ``parameters`` (the bytes come from ``config``'s shapes)."""
        record = check_memory(self.target, self.precision, config=config, head=self.head, block_size=self.block_size,
                              kv_tokens=min(self.max_kv_tokens, config.max_positions))
        if params is not None:
            record["parameters"] = int(params)
        return record


# ------------------------------------------------------------------------------------------- our kernels
@dataclass(frozen=True)
class KernelLimits:
    head_dims: tuple[int, ...] = (64, 128)  # kernels/src/api.cu: the head sizes compiled
    max_group: int = 8  # query heads per KV head the decode kernel's templates cover
    dtypes: tuple[str, ...] = ("float16", "bfloat16")
    min_sm: int = 80  # mma.sync with bf16

    def refusal(self, *, head_dim: int, group: int, dtype: str | None = None, sm: int | None = None) -> str | None:
        """Why the kernels cannot run this shape (one clause), or None when they can."""
        if dtype is not None and dtype not in self.dtypes:
            return f"the kernels run {'/'.join(self.dtypes)}, not {dtype}"
        if head_dim not in self.head_dims:
            return f"the kernels support head dims {' and '.join(map(str, self.head_dims))}, not {head_dim}"
        if group > self.max_group:
            return f"decode supports up to {self.max_group} query heads per kv head, not {group}"
        if sm is not None and sm < self.min_sm:
            return f"the kernels need sm_{self.min_sm} or newer, not sm_{sm}"
        return None


KERNELS = KernelLimits()
