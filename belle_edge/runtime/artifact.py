"""Open a compiled artifact for chat, with no torch: manifest -> tokenizer, chat format, ONNX Runtime."""
from __future__ import annotations

import os

from tokenizers import Tokenizer

from ..manifest import read_manifest
from .backends.ort_backend import OrtBackend, make_session
from .chat_format import chat_format_from_dict
from .model import ChatModel


def load_artifact(folder: str, *, threads: int | None = None) -> ChatModel:
    manifest = read_manifest(folder)
    rt, cfg = manifest["runtime"], manifest["model"]
    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    session = make_session(os.path.join(folder, rt["onnx"]), threads=threads)

    def backend(capacity: int) -> OrtBackend:
        return OrtBackend(session, num_layers=cfg["num_layers"], num_kv_heads=cfg["num_kv_heads"],
                          head_dim=cfg["head_dim"], vocab_size=cfg["vocab_size"], kv_dtype=rt["kv_dtype"],
                          capacity=capacity)

    return ChatModel(
        name=f"{manifest['source']['name']} [{manifest['target']}/{manifest['precision']}]",
        tokenizer=tokenizer, chat_format=chat_format_from_dict(manifest["chat_format"]),
        stop_token_ids=frozenset(rt["stop_token_ids"]), max_positions=rt["max_positions"],
        fingerprint=rt["fingerprint"], backend_factory=backend, backend_name="onnxruntime",
    )
