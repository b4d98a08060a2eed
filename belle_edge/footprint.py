"""Bytes a model holds in memory and reads per decoded token, in the formats the compiler stores.

Why this exists: the memory check and the decode roofline used to multiply every parameter by one rough
bytes-per-weight figure. At 8 and 4 bits that misses what decides the answer: the scales (2/128 bytes per
weight for GPU int4, 5/32 or 8.5/32 on the CPU), the LM head that stays fp16 on a GPU and 8-bit on the CPU
(for a 3B model with a 128k vocabulary that is 12% of the parameters), and an untied input embedding that
takes memory but of which one row per token is read. Here every tensor class gets the bytes of the format
it is stored in, from the ``ModelConfig``'s shapes alone: no weights, and no torch, because targets.py
imports this and the TensorRT runtime imports targets.py on a Jetson without torch.

Formats (``footprint(cfg, target, precision, head=, block_size=)``):

* GPU targets (ONNX / TensorRT, weight-only): ``int4`` linears: 4-bit symmetric codes, groups of 128 along
  the input dim K, one fp16 scale per group (0.5 + 2/128 B per weight); ``int8`` linears: 8-bit codes,
  one fp16 scale per output row (1 + 2/K B); ``fp8`` linears: 1 B (a per-tensor scale, not counted).
  Everything else (norms, biases, an untied embedding) fp16/bf16. The LM head (and a tied embedding:
  the same tensor, stored once) is fp16, or int8 per row with ``head="int8"``.
* CPU (ONNX Runtime ``MatMulNBits``, compile/quantize.py): ``int8`` = 8-bit codes in blocks of
  ``block_size`` (b) along K, fp32 scale + uint8 zero point per block (1 + 5/b B); ``int4`` = 4-bit codes,
  fp32 scale, 4-bit zero point and fp32 offset per block (0.5 + 8.5/b B). The head is 8-bit in both;
  everything else, an untied embedding included, fp32. ``fp16``/``fp32``: 2/4 B for all. ``head`` is a GPU
  option: the CPU head is fixed by the precision.

Read per token = every linear + the head + norms and biases; an untied input embedding is gathered (one
row), so it counts in memory only. The KV cache is :func:`kv_cache_bytes` (``KV_BYTES``: half precision,
fp32 only for fp32).

Paper plans (``PLANS``): two 3B shapes to size the Orin question before any checkpoint is at hand.

* ``llama-3.2-3b``: Meta's published config (28 layers, hidden 3072, 24/8 heads of 128, SwiGLU 8192,
  vocab 128,256, tied): 3,212,749,824 parameters.
* ``belle-7b-pruned-3b``: BELLE-7B is BLOOM-7b1 (``BELLE_7B``, 7,069,016,064 parameters); the shape is what
  our planner gives from the config alone: ``compile/prune/plan.py`` ``solve(BELLE_7B, 3_000_000_000,
  "width")`` -> 30 layers, hidden 2560, 32 heads of 80, MLP 10,240, full vocabulary: 3,002,557,440
  parameters (BLOOM keeps every head and its ALiBi slope and shrinks the head size). ``belle-edge prune``
  defaults to ``mix``, which also cuts the vocabulary to a corpus's tokens and picks among depth/width
  candidates on calibration text: that needs the checkpoint. Its no-depth-cut candidate at full
  vocabulary is this width plan (tests/test_footprint.py re-derives it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InputError
from .models.config import ModelConfig

GIB = 2**30
HEADS = ("fp16", "int8")  # the GPU LM head's format: fp16 (default) or int8 per row
GPU_INT4_GROUP = 128  # the GPU int4 group along K (one fp16 scale each)
KV_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 2, "int8": 2, "int4": 2}  # the cache stays in half precision
DENSE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}


# ------------------------------------------------------------------------------------------- shapes
def layer_matrices(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(N, K) = (out, in) of one layer's linear weights: q, k, v, o, then gate/up/down (SwiGLU) or up/down."""
    c, f = cfg.hidden_size, cfg.intermediate_size
    attn = [(cfg.q_size, c), (cfg.kv_size, c), (cfg.kv_size, c), (c, cfg.q_size)]
    mlp = [(f, c)] * (2 if cfg.mlp == "swiglu" else 1) + [(c, f)]
    return attn + mlp


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.hidden_size * (1 if cfg.norm == "rms" else 2)  # LayerNorm has a bias


def other_params(cfg: ModelConfig) -> int:
    """Norms and biases: small, kept in the float dtype, read every token."""
    c, f = cfg.hidden_size, cfg.intermediate_size
    per_layer = 2 * _norm_params(cfg)
    if cfg.qkv_has_bias:
        per_layer += cfg.q_size + 2 * cfg.kv_size
    if cfg.attention_bias:
        per_layer += c  # o_proj
    if cfg.mlp_bias:
        per_layer += f * (2 if cfg.mlp == "swiglu" else 1) + c
    return cfg.num_layers * per_layer + _norm_params(cfg) + (2 * c if cfg.embed_norm else 0)


def count_params(cfg: ModelConfig) -> int:
    """The canonical model's parameter count (= compile/prune/plan.py's count, without building the model)."""
    linears = cfg.num_layers * sum(n * k for n, k in layer_matrices(cfg))
    embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    return linears + embeddings + other_params(cfg)


# ------------------------------------------------------------------------------------------- formats
def matrix_bytes(n: int, k: int, fmt: str, block_size: int = 32) -> int:
    """Stored bytes of one (N, K) weight in ``fmt`` (codes padded to whole groups/blocks, as stored)."""
    if fmt in DENSE_BYTES:
        return n * k * DENSE_BYTES[fmt]
    if fmt == "int8-row":  # GPU: int8 codes + one fp16 scale per output row
        return n * k + 2 * n
    if fmt == "int4-g128":  # GPU: packed 4-bit codes + one fp16 scale per group of 128 along K
        groups = math.ceil(k / GPU_INT4_GROUP)
        return n * groups * GPU_INT4_GROUP // 2 + 2 * n * groups
    blocks = math.ceil(k / block_size)
    if fmt == "mnb8":  # CPU MatMulNBits 8-bit: codes + fp32 scale + uint8 zero point per block
        return n * blocks * (block_size + 4 + 1)
    if fmt == "mnb4":  # CPU 4-bit: packed codes + fp32 scale + fp32 offset per block, zero points two per byte
        return n * blocks * (block_size // 2 + 4 + 4) + n * math.ceil(blocks / 2)
    raise ValueError(f"unknown weight format {fmt!r}")


FORMAT_NAMES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp8": "fp8", "int8-row": "int8 per-row",
                "int4-g128": "int4 g128", "mnb8": "8-bit b{b}", "mnb4": "4-bit b{b}"}


def format_name(fmt: str, block_size: int = 32) -> str:
    return FORMAT_NAMES[fmt].format(b=block_size)


def formats(gpu: bool, precision: str, *, head: str = "fp16") -> dict[str, str]:
    """The stored format of each tensor class: ``linears``, ``head``, ``embedding`` (untied), ``other``."""
    if head not in HEADS:
        raise InputError(f"head {head!r}: expected one of {', '.join(HEADS)}")
    if precision not in KV_BYTES:
        raise InputError(f"precision {precision!r}: expected one of {', '.join(KV_BYTES)}")
    if gpu:
        if precision == "fp32":
            raise InputError("precision 'fp32': GPU targets build fp16/bf16 engines (or weight-only int8/int4)")
        dense = "bf16" if precision == "bf16" else "fp16"
        linears = {"int8": "int8-row", "int4": "int4-g128"}.get(precision, precision)
        weight_only = precision in ("int8", "int4")  # --head applies to weight-only artifacts only
        return {"linears": linears, "head": "int8-row" if head == "int8" and weight_only else dense,
                "embedding": dense, "other": dense}
    if precision in ("int8", "int4"):
        return {"linears": "mnb8" if precision == "int8" else "mnb4", "head": "mnb8", "embedding": "fp32",
                "other": "fp32"}
    dense = "fp16" if precision in ("fp16", "bf16") else "fp32"  # no bf16/fp8 on ONNX Runtime's CPU path
    return {"linears": dense, "head": dense, "embedding": dense, "other": dense}


@dataclass(frozen=True)
class Footprint:
    parameters: int
    weights_bytes: int  # what must be in memory
    read_per_token_bytes: int  # what one decode step reads
    breakdown: dict  # tensor class -> {"params", "bytes", "format", "read_per_token"}
    block_size: int

    def describe(self) -> str:
        """The formats in a few words: "int4 g128 linears, fp16 head (= the embedding)"."""
        rows = self.breakdown

        def name(row):
            return format_name(row["format"], self.block_size)

        tied = not rows["embedding"]["params"]
        parts = [f"{name(rows['linears'])} linears", f"{name(rows['head'])} head" + (" (= the embedding)" if tied else "")]
        if not tied:
            parts.append(f"{name(rows['embedding'])} embedding")
        return ", ".join(parts)


def footprint(cfg: ModelConfig, target, precision: str, *, head: str = "fp16", block_size: int = 32) -> Footprint:
    """Bytes of ``cfg`` stored for ``target`` (a targets.Target: only ``.gpu`` is read) at ``precision``."""
    fmt = formats(target.gpu, precision, head=head)
    vc = (cfg.vocab_size, cfg.hidden_size)
    linears = cfg.num_layers * sum(matrix_bytes(n, k, fmt["linears"], block_size) for n, k in layer_matrices(cfg))
    untied = 0 if cfg.tie_embeddings else 1
    other = other_params(cfg)
    breakdown = {
        "linears": {"params": cfg.num_layers * sum(n * k for n, k in layer_matrices(cfg)), "bytes": linears,
                    "format": fmt["linears"], "read_per_token": True},
        "head": {"params": vc[0] * vc[1], "bytes": matrix_bytes(*vc, fmt["head"], block_size),
                 "format": fmt["head"], "read_per_token": True},
        "embedding": {"params": untied * vc[0] * vc[1], "bytes": untied * matrix_bytes(*vc, fmt["embedding"]),
                      "format": fmt["embedding"], "read_per_token": False},  # gathered: one row per token
        "other": {"params": other, "bytes": other * DENSE_BYTES[fmt["other"]], "format": fmt["other"],
                  "read_per_token": True},
    }
    return Footprint(parameters=sum(r["params"] for r in breakdown.values()),
                     weights_bytes=sum(r["bytes"] for r in breakdown.values()),
                     read_per_token_bytes=sum(r["bytes"] for r in breakdown.values() if r["read_per_token"]),
                     breakdown=breakdown, block_size=block_size)


def params_only_bytes(params: int, target, precision: str, *, block_size: int = 32) -> int:
    """No config at hand: every parameter stored in the precision's linear format, as if one long row (so no
    per-row scales and no fp16 head): a floor, for a quick check only."""
    return matrix_bytes(1, params, formats(target.gpu, precision)["linears"], block_size)


def kv_cache_bytes(cfg: ModelConfig, precision: str, kv_tokens: int) -> int:
    """Keys and values of ``kv_tokens`` tokens in every layer."""
    return kv_tokens * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * KV_BYTES[precision]


# ------------------------------------------------------------------------------------------- paper plans
LLAMA_3_2_3B = ModelConfig(
    family="llama", vocab_size=128256, hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128,
    intermediate_size=8192, max_positions=131072, norm_eps=1e-5, norm="rms", mlp="swiglu", positions="rope",
    tie_embeddings=True, rope_theta=500000.0)
# BLOOM-7b1 as models/bloom.py reads it: hidden = heads x head size, MLP 4 x hidden, LayerNorm after the embedding
BELLE_7B = ModelConfig(
    family="bloom", vocab_size=250880, hidden_size=4096, num_layers=30, num_heads=32, num_kv_heads=32, head_dim=128,
    intermediate_size=16384, max_positions=2048, norm_eps=1e-5, norm="layer", mlp="gelu", positions="alibi",
    tie_embeddings=True, embed_norm=True, attention_bias=True, mlp_bias=True)
BELLE_7B_PRUNED_3B = BELLE_7B.replace(hidden_size=2560, head_dim=80, intermediate_size=10240)  # see the docstring
PLANS = {"llama-3.2-3b": LLAMA_3_2_3B, "belle-7b-pruned-3b": BELLE_7B_PRUNED_3B}


def plan_config(name: str) -> ModelConfig:
    if name not in PLANS:
        raise InputError(f"--shape {name!r}: unknown; known: {', '.join(PLANS)}, all")
    return PLANS[name]
