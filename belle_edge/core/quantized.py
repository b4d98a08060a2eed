"""Block-quantized weights, and the folder the quantize stage writes them to (what ``export`` reads).

A weight W (N, K) is cut into blocks of ``block_size`` along K and stored as unsigned codes with a float
scale and an integer zero point per block — the layout of ONNX Runtime's ``MatMulNBits``::

    W[n, k] = scale[n, b] * (code[n, k] - zero_point[n, b]) + offset[n, b]      b = k // block_size

``offset`` is optional (see compile/quantize.py for why it exists).

A quantized checkpoint folder::

    quantization.json      format "belle_edge.quantized", version 1; the model config, chat format, stop
                           tokens, source checkpoint (path, kind, fingerprint), per tensor {bits, block_size,
                           source}, and the quantize stage's record (``record``)
    weights.safetensors    every tensor kept in floating point (norms, biases, unquantized embedding), by
                           canonical name (models/decoder.py)
    quantized.safetensors  per quantized tensor NAME: NAME.codes (uint8, N x K), NAME.scales (float32),
                           NAME.zero_points (uint8), and NAME.offsets (float32) when it has them
    plan.safetensors       what a calibrated quantizer chose (compile/weight_only.py: AWQ scales, clip
                           ratios), when it ran
    tokenizer.json
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError
from ..models import ModelConfig
from ..runtime.chat_format import chat_format_from_dict
from ..runtime.tokenizer_file import read_tokenizer_file
from .checkpoint import Checkpoint
from .folders import staged_folder

FORMAT = "belle_edge.quantized"
VERSION = 1
RECORD = "quantization.json"
WEIGHTS = "weights.safetensors"
QUANTIZED = "quantized.safetensors"
PLAN = "plan.safetensors"


@dataclass(frozen=True)
class BlockQuantized:
    bits: int
    block_size: int
    codes: np.ndarray  # uint8 (N, K), values 0 .. 2^bits - 1
    scales: np.ndarray  # float32 (N, K / block_size)
    zero_points: np.ndarray  # uint8 (N, K / block_size)
    offsets: np.ndarray | None  # float32 (N, K / block_size), or None when all zero
    source: str  # "rtn" | "gguf:Q4_1" | ...

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        n, k = self.codes.shape
        blocks = self.codes.reshape(n, -1, self.block_size).astype(np.float32)
        w = self.scales[..., None] * (blocks - self.zero_points[..., None].astype(np.float32))
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(n, k)

    # ONNX Runtime layouts ------------------------------------------------------------------------------
    def packed_codes(self) -> np.ndarray:
        """(N, K/block, block*bits/8) uint8; two 4-bit codes per byte, the even element in the low nibble."""
        n, k = self.codes.shape
        blocks = self.codes.reshape(n, k // self.block_size, self.block_size)
        if self.bits == 8:
            return blocks
        return (blocks[..., 0::2] | (blocks[..., 1::2] << 4)).astype(np.uint8)

    def packed_zero_points(self) -> np.ndarray:
        """(N, ceil(K/block * bits / 8)) uint8."""
        if self.bits == 8:
            return self.zero_points
        zp = self.zero_points
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
        return (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)


def concat_rows(parts: list[BlockQuantized]) -> BlockQuantized:
    """Stack weights of one input along N (fused q/k/v or gate/up); blocks run along K, so they stay whole."""
    first = parts[0]
    assert all(p.bits == first.bits and p.block_size == first.block_size for p in parts)
    with_offsets = any(p.offsets is not None for p in parts)
    offsets = np.concatenate([p.offsets if p.offsets is not None else np.zeros_like(p.scales) for p in parts]) \
        if with_offsets else None
    return BlockQuantized(first.bits, first.block_size, np.concatenate([p.codes for p in parts]),
                          np.concatenate([p.scales for p in parts]), np.concatenate([p.zero_points for p in parts]),
                          offsets, "+".join(sorted({p.source for p in parts})))


def is_quantized_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, RECORD))


def quantized_layout(path: str) -> str:
    """"symmetric" (GPU weight-only: compile/weight_only.py) or "matmulnbits" (the CPU blocks)."""
    try:
        with open(os.path.join(path, RECORD), encoding="utf-8") as f:
            return json.load(f)["record"].get("layout", "matmulnbits")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "matmulnbits"


def quantized_precision(path: str) -> str | None:
    """The precision ("int8", "int4") a quantized checkpoint folder was written at (None if unreadable:
    reading it properly says why)."""
    try:
        with open(os.path.join(path, RECORD), encoding="utf-8") as f:
            return json.load(f)["record"]["precision"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_quantized(ckpt: Checkpoint, quantized: dict[str, BlockQuantized], record: dict, out: str, *,
                    force: bool = False, plan: dict[str, np.ndarray] | None = None) -> str:
    """Write ``ckpt`` with ``quantized`` in place of those weights to the folder ``out`` (whole or not at all);
    ``plan`` (arrays the quantizer chose: AWQ scales, clip ratios) goes to ``plan.safetensors``."""
    from safetensors.numpy import save_file as save_numpy
    from safetensors.torch import save_file as save_torch

    with staged_folder(out, force=force) as work:
        dense = {k: v.contiguous() for k, v in ckpt.state_dict.items() if k not in quantized}
        save_torch(dense, os.path.join(work, WEIGHTS), metadata={"format": "pt"})
        arrays = {}
        for name, q in quantized.items():
            arrays.update({f"{name}.codes": q.codes, f"{name}.scales": q.scales, f"{name}.zero_points": q.zero_points})
            if q.offsets is not None:
                arrays[f"{name}.offsets"] = q.offsets
        save_numpy({k: np.ascontiguousarray(v) for k, v in arrays.items()}, os.path.join(work, QUANTIZED))
        if plan:
            save_numpy({k: np.ascontiguousarray(v) for k, v in plan.items()}, os.path.join(work, PLAN))
        ckpt.tokenizer.save(os.path.join(work, "tokenizer.json"))
        doc = {"format": FORMAT, "version": VERSION, "model": ckpt.config.to_dict(),
               "chat_format": ckpt.chat_format.to_dict(), "stop_token_ids": sorted(ckpt.stop_token_ids),
               "source": {"path": ckpt.source, "kind": ckpt.kind, "fingerprint": ckpt.fingerprint},
               "tensors": {name: {"bits": q.bits, "block_size": q.block_size, "source": q.source}
                           for name, q in quantized.items()},
               "record": record}
        with open(os.path.join(work, RECORD), "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, ensure_ascii=False)
    return os.path.abspath(out)


def read_quantized(path: str) -> tuple[Checkpoint, dict]:
    """The checkpoint in a quantized folder (``quantized`` holds the block-quantized weights) and its
    ``quantization.json``."""
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import load_file as load_torch

    path = os.path.abspath(path)
    where = os.path.join(path, RECORD)
    try:
        with open(where, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise CheckpointError(f"{where}: format {doc.get('format')!r} version {doc.get('version')!r}, expected "
                                  f"{FORMAT!r} version {VERSION}")
        config = ModelConfig.from_dict(doc["model"])
        dense = load_torch(os.path.join(path, WEIGHTS))
        arrays = load_numpy(os.path.join(path, QUANTIZED))
        quantized = {name: BlockQuantized(t["bits"], t["block_size"], arrays[f"{name}.codes"],
                                          arrays[f"{name}.scales"], arrays[f"{name}.zero_points"],
                                          arrays.get(f"{name}.offsets"), t["source"])
                     for name, t in doc["tensors"].items()}
        tokenizer = read_tokenizer_file(os.path.join(path, "tokenizer.json"))
        fmt = chat_format_from_dict(doc["chat_format"])
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:  # json, safetensors and missing keys alike
        raise CheckpointError(f"{path}: not a readable quantized checkpoint ({type(e).__name__}: {e})") from None
    ckpt = Checkpoint(config, dense, tokenizer, fmt, frozenset(doc["stop_token_ids"]), path, "quantized",
                      quantized=quantized)
    return ckpt, doc
