"""What an app imports: ``belle_edge.load()`` -> :class:`ChatModel` -> ``.session()`` -> ``.stream(msg)``."""
from __future__ import annotations

from .errors import InputError, MissingDependencyError
from .runtime.model import ChatModel

DTYPES = ("float32", "bfloat16", "float16")


def load(model: str | None = None, *, device: str = "cpu", dtype: str = "float32", chat_format: str = "auto",
         allow_pickle: bool = False, max_positions: int | None = None, threads: int | None = None,
         backend: str = "auto", weight_only: str | None = None) -> ChatModel:
    """Open a model for chat.

    * a compiled artifact folder (``belle-edge compile``): its TensorRT engine where it can run here, else
      ONNX Runtime; no torch needed (``threads``; ``backend`` = auto | tensorrt | onnxruntime);
    * a local checkpoint (HF directory or GGUF; the default model when ``model`` is None): the torch
      backend (``device``, ``dtype``, ``chat_format``, ``allow_pickle``, ``max_positions``; ``weight_only``
      "int4" | "int8": the linears as round-to-nearest codes through the weight-only GEMM kernels).
    """
    import os

    from .manifest import is_artifact

    if model is not None and os.path.isdir(model) and is_artifact(model):
        from .runtime.artifact import load_artifact

        return load_artifact(model, threads=threads, backend=backend)
    if backend not in ("auto", "torch"):
        raise InputError(f"backend {backend!r}: a checkpoint runs on torch; tensorrt and onnxruntime run a "
                         "compiled artifact (belle-edge compile)")
    if dtype not in DTYPES:
        raise InputError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if weight_only not in (None, "int4", "int8"):
        raise InputError(f"weight_only {weight_only!r}: expected int4 or int8 (or none)")
    _require_torch()
    from .core.load import load_checkpoint

    ckpt = load_checkpoint(model, allow_pickle=allow_pickle, chat_format=chat_format, max_positions=max_positions)
    from .known_models import known_model

    known = known_model(model)
    named = known.title if known is not None else None
    return torch_chat_model(ckpt, device=device, dtype=dtype, name=named if model is not None else "default",
                            weight_only=weight_only)


def torch_chat_model(ckpt, *, device: str = "cpu", dtype: str = "float32", name: str | None = None,
                     decoder=None, weight_only: str | None = None, fuse: bool | None = None) -> ChatModel:
    """A ChatModel over the torch backend from a loaded :class:`~belle_edge.core.checkpoint.Checkpoint`
    (``decoder``: the checkpoint's canonical model, when the caller has built it already; it is changed in
    place by ``fuse`` and ``weight_only``).

    ``fuse`` (default: on CUDA) runs q/k/v and gate/up as one linear each (Decoder.fuse_projections).
    ``weight_only`` ("int4" group 128 | "int8" per channel, round-to-nearest) holds the linears as codes +
    scales and runs them through ``belle::weight_only_gemm`` (kernels on CUDA fp16/bf16, the dequantizing
    reference elsewhere); the LM head stays in the model's dtype."""
    torch = _require_torch()
    from .default_model import NAME as DEFAULT_NAME
    from .models.decoder import Decoder
    from .runtime.backends.torch_backend import TorchBackend
    from .runtime.backends.torch_pool import TorchPool

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"device {device!r}: expected cpu or cuda[:N]") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"device {device!r}: no such CUDA device on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r}: expected cpu or cuda[:N]")
    bits = {None: None, "int4": 4, "int8": 8}.get(weight_only, 0)
    if bits == 0:
        raise InputError(f"weight_only {weight_only!r}: expected int4 or int8 (or none)")
    if decoder is None:
        decoder = Decoder.from_state_dict(ckpt.config, ckpt.state_dict, where=ckpt.source,
                                          dtype=getattr(torch, dtype), device=device)
    if dev.type == "cuda" if fuse is None else fuse:
        decoder.fuse_projections()
    if bits:
        from .ops.weight_only import quantize_linears

        quantize_linears(decoder, bits)
    return ChatModel(
        name=DEFAULT_NAME if name == "default" else (name or ckpt.source),
        tokenizer=ckpt.tokenizer, chat_format=ckpt.chat_format, stop_token_ids=ckpt.stop_token_ids,
        max_positions=ckpt.config.max_positions, fingerprint=ckpt.fingerprint,
        backend_factory=lambda capacity: TorchBackend(decoder, capacity), backend_name="torch",
        pool_factory=lambda slots, capacity: TorchPool(decoder, slots, capacity),
    )


def _require_torch():
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("the torch backend needs torch: pip install 'belle_edge[torch]'") from None
    return torch
