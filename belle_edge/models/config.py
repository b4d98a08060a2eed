"""``ModelConfig``: the canonical description of a decoder, shared by every family.

A family module (``llama.py``, ``bloom.py``, ``qwen2.py``) maps a checkpoint's own config onto this; every later pass
(prune, export, build) reads and writes only this. Architectural traits are fields, not family checks, so a
pruned LLaMA is just a ModelConfig with other sizes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import CheckpointError

NORMS = ("rms", "layer")
MLPS = ("swiglu", "gelu")
POSITIONS = ("rope", "alibi")


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" | "bloom" | "qwen2": which module converts its checkpoints
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    norm_eps: float
    norm: str  # "rms" (LLaMA) | "layer" (BLOOM)
    mlp: str  # "swiglu" (LLaMA) | "gelu" (BLOOM, tanh approximation)
    positions: str  # "rope" (LLaMA) | "alibi" (BLOOM)
    tie_embeddings: bool = True
    embed_norm: bool = False  # BLOOM's LayerNorm right after the embedding
    attention_bias: bool = False  # q/k/v/o biases
    qkv_bias: bool = False  # q/k/v biases only, o_proj without (Qwen2)
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"model config field {name}: expected a positive whole number, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("positions", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise CheckpointError(f"model config field {name}: expected one of {allowed}, got {getattr(self, name)!r}")
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 = multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"model config: unknown fields {unknown}")
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def qkv_has_bias(self) -> bool:
        return self.attention_bias or self.qkv_bias
