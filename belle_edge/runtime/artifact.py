"""Open a compiled artifact for chat, with no torch: manifest -> tokenizer, chat format, and a backend.

A GPU artifact runs on TensorRT when it has an engine, TensorRT and a GPU are usable here and the engine was
built for this machine (:func:`~.backends.trt_backend.check_engine`); otherwise — an Orin artifact whose
engine is still to be built, a laptop without a GPU — it chats from its portable ONNX on ONNX Runtime, and
says why on stderr (one line).
"""
from __future__ import annotations

import os
import sys

from ..errors import BelleEdgeError, InputError
from ..manifest import Manifest, read_manifest
from .chat_format import chat_format_from_dict
from .model import ChatModel
from .tokenizer_file import read_tokenizer_file

BACKENDS = ("auto", "tensorrt", "onnxruntime")


def load_artifact(folder: str, *, threads: int | None = None, backend: str = "auto") -> ChatModel:
    """``backend``: ``auto`` (TensorRT where it can run, else ONNX Runtime), ``tensorrt`` (refuse rather than
    fall back) or ``onnxruntime``."""
    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    manifest = read_manifest(folder)
    rt = manifest.runtime
    tokenizer = read_tokenizer_file(os.path.join(folder, "tokenizer.json"))
    factory, pool_factory, name, limit = None, None, "onnxruntime", None
    if backend != "onnxruntime":
        try:
            factory, pool_factory, limit = _tensorrt(folder, manifest)
            name = "tensorrt"
        except BelleEdgeError as e:
            if backend == "tensorrt":
                raise
            if rt.backend == "tensorrt":  # a GPU artifact; a cpu one runs on ONNX Runtime by design
                print(f"belle-edge: {folder} runs on ONNX Runtime (CPU) from its ONNX: {e}", file=sys.stderr)
    if factory is None:
        factory, pool_factory = _onnxruntime(folder, manifest, threads)
    return ChatModel(
        name=f"{manifest.source.name} [{manifest.target}/{manifest.precision}]",
        tokenizer=tokenizer, chat_format=chat_format_from_dict(manifest.chat_format),
        stop_token_ids=frozenset(rt.stop_token_ids), max_positions=rt.max_positions,
        fingerprint=rt.fingerprint, backend_factory=factory, backend_name=name, max_kv_tokens=limit,
        pool_factory=pool_factory, mask_rule=rt.mask_rule,
    )


def _tensorrt(folder: str, manifest: Manifest):
    """(backend factory, pool factory, KV tokens the engine can hold); raises a one-line BelleEdgeError
    saying why not."""
    from .backends.trt_backend import TrtBackend, open_engine
    from .backends.trt_pool import TrtPool

    rt = manifest.runtime
    if rt.engine is None:
        hint = (f"build it: belle-edge build-engine {folder}" if rt.engine_on_device
                else f"a {manifest.target} artifact has none")
        raise InputError(f"{folder}: no TensorRT engine ({hint})")
    engine = open_engine(folder, manifest)
    return (lambda capacity: TrtBackend(engine, capacity=capacity),
            lambda slots, capacity: TrtPool(engine, slots=slots, capacity=capacity), engine.max_past + 1)


def _onnxruntime(folder: str, manifest: Manifest, threads: int | None):
    """(backend factory, pool factory): one InferenceSession, shared by every session and pool."""
    from .backends.ort_backend import OrtBackend, make_session
    from .backends.ort_pool import OrtPool

    rt, cfg = manifest.runtime, manifest.model
    session = make_session(os.path.join(folder, rt.onnx), threads=threads)
    shape = dict(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                 vocab_size=cfg.vocab_size, kv_dtype=rt.kv_dtype)

    def factory(capacity: int) -> OrtBackend:
        return OrtBackend(session, capacity=capacity, **shape)

    def pool_factory(slots: int, capacity: int) -> OrtPool:
        return OrtPool(session, slots=slots, capacity=capacity, **shape)

    return factory, pool_factory
