"""``Checkpoint``: one model in memory, as every stage and tool hands it on — canonical config and weights,
tokenizer, chat format, stop tokens, and where it came from. Frozen: a pass that changes a model returns a
new Checkpoint (``ckpt.replace(...)``), it never edits the one it was given.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Mapping

from tokenizers import Tokenizer

from ..errors import CheckpointError
from ..models import ModelConfig
from ..runtime.chat_format import ChatFormat

KINDS = ("hf", "gguf", "quantized")


@dataclass(frozen=True)
class Checkpoint:
    config: ModelConfig
    state_dict: Mapping  # canonical names (models/decoder.py) -> torch tensors
    tokenizer: Tokenizer
    chat_format: ChatFormat
    stop_token_ids: frozenset[int]
    source: str  # the path it was read from
    kind: str  # "hf" | "gguf" | "quantized" (a folder written by the quantize stage)
    # weights held block-quantized (canonical name -> compile.quantize.BlockQuantized); ``state_dict`` then
    # holds every other tensor. Empty for an ordinary checkpoint.
    quantized: Mapping = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Checkpoint.kind {self.kind!r}: expected one of {KINDS}")

    @property
    def fingerprint(self) -> str:
        """Identifies the model a session or artifact was made from: config + tokenizer (not the weights,
        which would cost a pass over gigabytes)."""
        blob = json.dumps(self.config.to_dict(), sort_keys=True) + self.tokenizer.to_str()
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def parameters(self) -> int:
        """Parameters of the model (ALiBi slopes are buffers, not parameters)."""
        dense = sum(v.numel() for k, v in self.state_dict.items() if not k.endswith("slopes"))
        return int(dense + sum(q.codes.size for q in self.quantized.values()))

    def replace(self, **changes) -> "Checkpoint":
        return dataclasses.replace(self, **changes)


def check_vocab(tokenizer: Tokenizer, config: ModelConfig, where: str) -> None:
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size:
        raise CheckpointError(f"{where}: tokenizer has {size} tokens but the model's vocab_size is {config.vocab_size}")


def stop_token_ids(config: ModelConfig, tokenizer: Tokenizer, fmt: ChatFormat) -> frozenset[int]:
    """The config's EOS ids, plus the chat format's EOS and end-of-reply tokens where they are single tokens."""
    ids = set(config.eos_token_ids)
    for token in (getattr(fmt, "eos_token", None), fmt.end_token):
        if token and tokenizer.token_to_id(token) is not None:
            ids.add(tokenizer.token_to_id(token))
    return frozenset(ids)
