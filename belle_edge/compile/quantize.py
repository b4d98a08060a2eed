"""The quantize pass: block-wise weight-only quantization of the linear layers (and the LM head).

Two layouts: the CPU's (below: ONNX Runtime's MatMulNBits blocks) and the GPU targets' symmetric INT4/INT8
(weight_only.py: RTN or AWQ, what TensorRT parses); the stage runs one or the other.

Each weight W (N, K) is cut into blocks of ``block_size`` along K and stored as unsigned codes with a
float scale and an integer zero point per block — the layout of ONNX Runtime's ``MatMulNBits``::

    W[n, k] = scale[n, b] * (code[n, k] - zero_point[n, b]) + offset[n, b]      b = k // block_size

``offset`` is our addition and is optional. Integer zero points are what makes ``MatMulNBits`` fast
(float zero points are supported but ~25x slower here), yet rounding the zero point moves a whole block by
up to half a step. The offset puts that back exactly; the export adds it as ``blocksum(x) @ offsetᵀ``,
a (K/block_size)-row matmul (1/32 of the layer at block 32). With it, RTN becomes "min + scale * code"
(the Q4_1 form), and GGUF Q4_1 blocks are carried over bit-exactly.

Sources:

* ``gguf``: when the checkpoint is a GGUF file whose tensors are Q4_0 / Q4_1 / Q8_0 (block 32), their codes,
  scales and minimums are carried over as they are — no second rounding. Checked against the loaded
  weights; a tensor that does not match exactly is re-quantized instead, and the record says which.
* ``rtn``: round-to-nearest with the block's min and max, for everything else.

Offsets are used for 4-bit RTN only. Precisions: ``int8`` (8-bit everywhere) and ``int4`` (4-bit linears,
8-bit LM head/embedding: the head decides every token and is where 4-bit hurts most; llama.cpp's Q4 files
keep it at Q8_0 too).

The stage writes a quantized checkpoint folder (core/quantized.py), which ``belle-edge export`` reads;
``belle-edge quantize`` runs it alone. Details recorded: ``precision``, ``bits``, ``head_bits``,
``block_size``, ``offsets``, ``tensors``, ``sources`` (tensors per origin: "rtn", "gguf:Q4_1", ...),
``tensors_by_bits``, ``quantized_params``, ``quantized_bytes``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..core.checkpoint import Checkpoint
from ..core.quantized import BlockQuantized, write_quantized
from ..core.stage import measured
from ..errors import InputError
from ..manifest import StageRecord
from ..models.config import ModelConfig
from .weight_only import WeightOnlyRequest, plan_arrays, quantize_weight_only

if TYPE_CHECKING:
    from .job import Job

PRECISION_BITS = {"int8": 8, "int4": 4}


def quantize_to_folder(ckpt: Checkpoint, precision: str, out: str, *, block_size: int = 32,
                       force: bool = False, weight_only: WeightOnlyRequest | None = None) -> tuple[Checkpoint, dict]:
    """Quantize ``ckpt`` and write the quantized checkpoint to ``out``; returns it (as read from ``out``) and
    the record. CPU blocks (``weight_only`` None): a GGUF checkpoint's own blocks are carried over where they
    match its weights exactly. ``weight_only``: the GPU targets' symmetric weights (weight_only.py)."""
    if precision not in PRECISION_BITS:
        raise InputError(f"precision {precision!r}: the quantize stage makes {' or '.join(PRECISION_BITS)}")
    plan = None
    if weight_only is not None:
        dense, quantized, record, chosen = quantize_weight_only(ckpt.config, ckpt.state_dict, ckpt.tokenizer,
                                                                weight_only)
        ckpt, plan = ckpt.replace(state_dict=dense), plan_arrays(chosen)
    else:
        blocks = gguf_blocks(ckpt.source, ckpt.config) if ckpt.kind == "gguf" else None
        quantized, record = quantize_weights(ckpt.config, ckpt.state_dict, precision, block_size=block_size,
                                             gguf_blocks=blocks)
    path = write_quantized(ckpt, quantized, record, out, force=force, plan=plan)
    rest = {k: v for k, v in ckpt.state_dict.items() if k not in quantized}
    return ckpt.replace(state_dict=rest, quantized=quantized, source=path, kind="quantized"), record


@dataclass(frozen=True)
class QuantizeStage:
    precision: str  # "int8" | "int4"
    block_size: int = 32  # CPU blocks
    weight_only: WeightOnlyRequest | None = None  # GPU targets: symmetric INT4 g128 / INT8 per channel

    name = "quantize"
    reads = "checkpoint (a GGUF file's own blocks are carried over where they reproduce its weights exactly)"
    writes = "quantized checkpoint folder: quantization.json + weights/quantized safetensors + tokenizer"

    def run(self, job: "Job") -> StageRecord:
        out = job.scratch(self.name)
        return measured(self, lambda: self._quantize(job, out), reads=job.checkpoint().source, writes=(out,))

    def _quantize(self, job: "Job", out: str) -> dict:
        quantized, record = quantize_to_folder(job.checkpoint(), self.precision, out, block_size=self.block_size,
                                               weight_only=self.weight_only)
        job.hand_on(out, quantized)
        return record


def linear_names(cfg: ModelConfig) -> list[str]:
    names = []
    for i in range(cfg.num_layers):
        names += [f"layers.{i}.attn.{p}_proj.weight" for p in ("q", "k", "v", "o")]
        names += [f"layers.{i}.mlp.{p}_proj.weight" for p in (("gate", "up", "down") if cfg.mlp == "swiglu"
                                                               else ("up", "down"))]
    return names


def head_name(cfg: ModelConfig) -> str:
    return "embed.weight" if cfg.tie_embeddings else "lm_head.weight"


def quantize_weights(cfg: ModelConfig, state_dict: dict, precision: str, *, block_size: int = 32,
                     offsets: bool = True, gguf_blocks: dict[str, BlockQuantized] | None = None
                     ) -> tuple[dict[str, BlockQuantized], dict]:
    """Quantize every linear weight (+ the LM head); returns the weights and the manifest record."""
    t0 = time.perf_counter()
    bits = PRECISION_BITS[precision]
    plan = {name: bits for name in linear_names(cfg)}
    plan[head_name(cfg)] = 8
    embed = (gguf_blocks or {}).get("embed.weight")
    if not cfg.tie_embeddings and embed is not None and embed.bits == 8 and embed.offsets is None:
        # an untied embedding the file stores in 8-bit blocks: looked up from its own codes
        # (GatherBlockQuantized), not stored in fp32 — it is a quarter of a small model
        plan["embed.weight"] = 8
    out, sources = {}, {}
    gguf_blocks = gguf_blocks or {}
    for name in plan:
        k = state_dict[name].shape[1]
        if k % block_size:
            raise InputError(f"block size {block_size} does not divide the input width {k} of {name}; "
                             f"choose one that does (e.g. {next(b for b in (128, 64, 32, 16) if k % b == 0)})"
                             if any(k % b == 0 for b in (128, 64, 32, 16)) else
                             f"{name}: input width {k} is not a multiple of 16; it cannot be block-quantized")
    for name, b in plan.items():
        w = state_dict[name].detach().float().cpu().numpy()
        carried = gguf_blocks.get(name)
        # a file's own blocks go in wherever they reproduce the weight exactly: at their own width and block
        # in an int4 artifact (a Q5_0 or Q6_K tensor at 8 bits rather than rounded a second time), only
        # 8-bit ones in an int8 artifact
        if carried is not None and (carried.bits == b or b == 4) \
                and np.allclose(carried.dequantize(), w, rtol=0, atol=1e-6 * max(1.0, float(np.abs(w).max()))):
            q = carried
        else:
            # 8-bit steps are fine enough that a rounded zero point costs little, and without offsets the
            # quantized head can also serve the embedding (GatherBlockQuantized has no offsets)
            q = quantize_rtn(w, b, block_size, offsets=offsets and b == 4)
        out[name] = q
        sources[q.source] = sources.get(q.source, 0) + 1
    params = sum(q.codes.size for q in out.values())
    nbytes = sum(q.packed_codes().nbytes + q.scales.nbytes + q.packed_zero_points().nbytes
                 + (q.offsets.nbytes if q.offsets is not None else 0) for q in out.values())
    widths = {}
    for q in out.values():
        widths[str(q.bits)] = widths.get(str(q.bits), 0) + 1
    record = {"precision": precision, "bits": bits, "head_bits": 8, "block_size": block_size, "offsets": offsets,
              "tensors": len(out), "sources": sources, "tensors_by_bits": widths, "quantized_params": int(params),
              "quantized_bytes": int(nbytes), "seconds": round(time.perf_counter() - t0, 2)}
    return out, record


def quantize_rtn(w: np.ndarray, bits: int, block_size: int, *, offsets: bool = True) -> BlockQuantized:
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of the block size {block_size}")
    qmax = (1 << bits) - 1
    blocks = w.reshape(n, k // block_size, block_size).astype(np.float32)
    lo, hi = blocks.min(-1), blocks.max(-1)
    scale = (hi - lo) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # a constant block: any scale, all codes 0
    zp = np.clip(np.round(-lo / scale), 0, qmax)
    if offsets:
        codes = np.clip(np.round((blocks - lo[..., None]) / scale[..., None]), 0, qmax)
        off = (lo + scale * zp).astype(np.float32)  # exact: scale*(code - zp) + off = lo + scale*code
    else:
        codes = np.clip(np.round(blocks / scale[..., None]) + zp[..., None], 0, qmax)
        off = None
    return BlockQuantized(bits, block_size, codes.reshape(n, k).astype(np.uint8), scale,
                          zp.astype(np.uint8), off, "rtn")


# ------------------------------------------------------------------------------------------- GGUF blocks
_GGUF_LLAMA_NAMES = {"attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
                     "attn_output": "attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                     "ffn_down": "mlp.down_proj"}


GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")  # what MatMulNBits expresses exactly


def gguf_blocks(path: str, cfg: ModelConfig) -> dict[str, BlockQuantized]:
    """The GGUF file's own blocks under canonical names, as MatMulNBits blocks that reproduce them exactly:
    Q4_0/Q4_1/Q4_K at 4 bits (K-quants by their 32-wide sub-blocks, scale and minimum each), Q5_0/Q5_K/Q8_0
    at 8 bits with block 32, Q6_K at 8 bits with block 16. Rows in the order transformers' loader gives them
    (it un-permutes LLaMA's Q and K for RoPE; Qwen2 files are not permuted)."""
    from gguf import GGUFReader

    if cfg.family not in ("llama", "qwen2"):
        return {}
    out = {}
    for t in GGUFReader(path).tensors:
        name = _canonical_gguf_name(t.name, cfg)
        if name is None or t.tensor_type.name not in GGUF_TYPES:
            continue
        q = _decode_blocks(np.asarray(t.data), t.tensor_type.name)
        if cfg.family == "llama" and name.endswith("q_proj.weight"):
            q = _permute_rows(q, _unpermute_order(q.shape[0], cfg.num_heads))
        elif cfg.family == "llama" and name.endswith("k_proj.weight"):
            q = _permute_rows(q, _unpermute_order(q.shape[0], cfg.num_kv_heads))
        out[name] = q
    return out


def _canonical_gguf_name(name: str, cfg: ModelConfig) -> str | None:
    if name == "token_embd.weight":
        return "embed.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LLAMA_NAMES and parts[3] == "weight":
        return f"layers.{parts[1]}.{_GGUF_LLAMA_NAMES[parts[2]]}.weight"
    return None


def _decode_blocks(data: np.ndarray, qtype: str) -> BlockQuantized:
    if qtype in _K_QUANTS:
        return _K_QUANTS[qtype](data)
    rows = data.shape[0]
    if qtype == "Q5_0":  # {fp16 d; uint32 qh; q[16]}: w = d*(q-16), q 5-bit: 8-bit codes
        blk = data.reshape(rows, -1, 22)
        d = _f16(blk[..., 0:2])
        high = np.unpackbits(blk[..., 2:6], axis=-1, bitorder="little")  # (rows, blocks, 32): bit j of qh
        low = np.concatenate([blk[..., 6:] & 0x0F, blk[..., 6:] >> 4], axis=-1)
        q = low | (high << 4)
        return BlockQuantized(8, 32, q.reshape(rows, -1).astype(np.uint8), d, np.full(d.shape, 16, np.uint8),
                              None, "gguf:Q5_0")
    if qtype == "Q8_0":  # {fp16 d; int8 q[32]}: w = d*q
        blk = data.reshape(rows, -1, 34)
        d = blk[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = blk[..., 2:].copy().view(np.int8).astype(np.int16) + 128
        return BlockQuantized(8, 32, q.reshape(rows, -1).astype(np.uint8), d, np.full(d.shape, 128, np.uint8),
                              None, "gguf:Q8_0")
    size = 18 if qtype == "Q4_0" else 20
    blk = data.reshape(rows, -1, size)
    d = blk[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blk[..., size - 16:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j in the low nibble, j+16 in the high
    if qtype == "Q4_0":  # {fp16 d; q[16]}: w = d*(q-8)
        return BlockQuantized(4, 32, q.reshape(rows, -1).astype(np.uint8), d, np.full(d.shape, 8, np.uint8),
                              None, "gguf:Q4_0")
    m = blk[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)  # {fp16 d; fp16 m; q[16]}: w = d*q + m
    safe = np.where(d != 0, d, 1.0)
    zp = np.clip(np.round(-m / safe), 0, 15)
    return BlockQuantized(4, 32, q.reshape(rows, -1).astype(np.uint8), d, zp.astype(np.uint8),
                          (m + d * zp).astype(np.float32), "gguf:Q4_1")


def _f16(raw: np.ndarray) -> np.ndarray:
    """(..., 2) bytes -> (...) float32, little-endian fp16."""
    return raw.copy().view(np.float16)[..., 0].astype(np.float32)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and minimums packed in a K-quant super-block's 12 bytes (llama.cpp's layout)."""
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _with_minimum(bits: int, block: int, q: np.ndarray, scale: np.ndarray, minimum: np.ndarray,
                  source: str) -> BlockQuantized:
    """Blocks of w = scale*q - minimum as MatMulNBits' scale*(q - zero_point) + our offset (Q4_1's form)."""
    rows = q.shape[0]
    scale, minimum = scale.reshape(rows, -1), minimum.reshape(rows, -1)
    safe = np.where(scale != 0, scale, 1.0)
    zp = np.clip(np.round(minimum / safe), 0, (1 << bits) - 1)
    return BlockQuantized(bits, block, q.reshape(rows, -1).astype(np.uint8), scale.astype(np.float32),
                          zp.astype(np.uint8), (scale * zp - minimum).astype(np.float32), source)


def _q4_k(data: np.ndarray) -> BlockQuantized:
    """{fp16 d; fp16 dmin; scales[12]; q[128]} per 256: eight sub-blocks of 32, w = d*sc*q - dmin*m."""
    rows = data.shape[0]
    blk = data.reshape(rows, -1, 144)
    d, dmin = _f16(blk[..., 0:2])[..., None], _f16(blk[..., 2:4])[..., None]
    sc, mn = _scale_min_k4(blk[..., 4:16])
    qs = blk[..., 16:].reshape(rows, -1, 4, 32)  # byte i of group g: sub-block 2g (low nibble), 2g+1 (high)
    q = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(rows, -1, 8, 32)
    return _with_minimum(4, 32, q, d * sc, dmin * mn, "gguf:Q4_K")


def _q5_k(data: np.ndarray) -> BlockQuantized:
    """{fp16 d; fp16 dmin; scales[12]; qh[32]; q[128]} per 256: as Q4_K with a fifth bit: 8-bit codes."""
    rows = data.shape[0]
    blk = data.reshape(rows, -1, 176)
    d, dmin = _f16(blk[..., 0:2])[..., None], _f16(blk[..., 2:4])[..., None]
    sc, mn = _scale_min_k4(blk[..., 4:16])
    qs = blk[..., 48:].reshape(rows, -1, 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(rows, -1, 8, 32)
    qh = blk[..., 16:48].reshape(rows, -1, 1, 32)
    high = (qh >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1  # bit s of byte i: sub-block s
    return _with_minimum(8, 32, low | (high << 4), d * sc, dmin * mn, "gguf:Q5_K")


def _q6_k(data: np.ndarray) -> BlockQuantized:
    """{ql[128]; qh[64]; scales[16] int8; fp16 d} per 256: sixteen sub-blocks of 16, w = d*sc*(q-32)."""
    rows = data.shape[0]
    blk = data.reshape(rows, -1, 210)
    n = blk.shape[1]
    ql = blk[..., :128].reshape(rows, n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(rows, n, 8, 32)
    qh = blk[..., 128:192].reshape(rows, n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    qh = (qh & 0x03).reshape(rows, n, 8, 32)
    q = (ql | (qh << 4)).reshape(rows, n, 16, 16)  # 0..63, stored with zero point 32
    scale = _f16(blk[..., 208:210])[..., None] * blk[..., 192:208].copy().view(np.int8).astype(np.float32)
    return BlockQuantized(8, 16, q.reshape(rows, -1).astype(np.uint8), scale.reshape(rows, -1).astype(np.float32),
                          np.full((rows, n * 16), 32, np.uint8), None, "gguf:Q6_K")


_K_QUANTS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def _unpermute_order(rows: int, heads: int) -> np.ndarray:
    # llama.cpp interleaves each head's two RoPE halves; transformers undoes it (rows only)
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(rows)


def _permute_rows(q: BlockQuantized, order: np.ndarray) -> BlockQuantized:
    return BlockQuantized(q.bits, q.block_size, q.codes[order], q.scales[order], q.zero_points[order],
                          None if q.offsets is None else q.offsets[order], q.source)
