"""``ModelConfig``: the canonical description of a decoder, shared by every family.

A family module (``llama.py``, ``bloom.py``, ``qwen2.py``) maps a checkpoint's own config onto this; every later pass
(prune, export, build) reads and writes only this. Architectural traits are fields, not family checks, so a
pruned LLaMA is just a ModelConfig with other sizes.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from dataclasses import dataclass

from ..errors import CheckpointError

NORMS = ("rms", "layer")
MLPS = ("swiglu", "gelu")
POSITIONS = ("rope", "alibi")
# The largest size a config may give: every dimension must fit int32, what ONNX and TensorRT index with. (Fuzzing
# found sizes such as 10**30 accepted and only failing, or allocating, far later.)
MAX_SIZE = 2**31 - 1
_SIZES = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
          "max_positions")
_FLAGS = ("tie_embeddings", "embed_norm", "attention_bias", "qkv_bias", "mlp_bias")


def _show(value) -> str:
    """A value for a one-line message: its JSON type and a short repr."""
    kind = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, numbers.Number) else type(value).__name__)
    text = repr(value)
    return f"{kind} {text[:39] + '…' if len(text) > 40 else text}".replace("\n", "\\n")


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_SIZE


def _is_positive_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:  # an int too large for a float
        return False


def _token_id(value) -> int | None:
    """``value`` as a token id (an int, numpy's included, >= 0), else None."""
    if isinstance(value, (bool, float, str)):
        return None
    try:
        value = operator.index(value)
    except TypeError:
        return None
    return value if 0 <= value <= MAX_SIZE else None


# Reading the fields of a checkpoint's own config.json (the family modules): each checks the type and range of
# what it reads, so a wrong file gives one line naming the file and the field instead of a TypeError or
# ZeroDivisionError inside the conversion (found by fuzzing tests/test_fuzz_inputs.py).
def hf_size(hf: dict, key: str, where: str, *, default: int | None = None) -> int:
    """A positive whole-number field; ``default`` where it is absent, null or 0 (None: the field is required)."""
    value = hf.get(key)
    if value is None or (value == 0 and default is not None and not isinstance(value, bool)):
        if default is None:
            raise CheckpointError(f"{where}: config field {key!r} is missing")
        return default
    if not _is_size(value):
        raise CheckpointError(f"{where}: config field {key!r}: expected a whole number in 1..{MAX_SIZE}, "
                              f"got {_show(value)}")
    return value


def hf_positive(hf: dict, key: str, where: str, default: float, *, value=None) -> float:
    """A finite number > 0 (an epsilon, a RoPE base); ``default`` where it is absent or null. ``value``: the value
    itself where it comes from elsewhere (rope_parameters)."""
    value = hf.get(key) if value is None else value
    if value is None:
        return default
    if not _is_positive_number(value):
        raise CheckpointError(f"{where}: config field {key!r}: expected a finite number > 0, got {_show(value)}")
    return float(value)


def hf_flag(hf: dict, key: str, where: str, default: bool) -> bool:
    """A true/false field (0 and 1 accepted); ``default`` where it is absent or null."""
    value = hf.get(key)
    if value is None:
        return default
    if value not in (True, False) or not isinstance(value, (bool, int)):
        raise CheckpointError(f"{where}: config field {key!r}: expected true or false, got {_show(value)}")
    return bool(value)


def hf_object(hf: dict, key: str, where: str) -> dict:
    """An object field (``rope_scaling``); {} where it is absent or null."""
    value = hf.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: config field {key!r}: expected an object or null, got {_show(value)}")
    return value


def hf_bos_id(hf: dict, where: str) -> int | None:
    value = hf.get("bos_token_id")
    if value is not None and _token_id(value) is None:
        raise CheckpointError(f"{where}: config field 'bos_token_id': expected a token id (a whole number >= 0) or "
                              f"null, got {_show(value)}")
    return value


def hf_eos_ids(hf: dict, where: str) -> tuple[int, ...]:
    value = hf.get("eos_token_id")
    ids = () if value is None else tuple(value) if isinstance(value, list) else (value,)
    if any(_token_id(i) is None for i in ids):
        raise CheckpointError(f"{where}: config field 'eos_token_id': expected a token id (a whole number >= 0), a "
                              f"list of them or null, got {_show(value)}")
    return ids


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
        if not isinstance(self.family, str):
            raise CheckpointError(f"model config field family: expected a string, got {_show(self.family)}")
        for name in _SIZES:
            value = getattr(self, name)
            if not _is_size(value):
                raise CheckpointError(f"model config field {name}: expected a whole number in 1..{MAX_SIZE}, "
                                      f"got {_show(value)}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("positions", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise CheckpointError(f"model config field {name}: expected one of {allowed}, got {getattr(self, name)!r}")
        # what a config from a file may get wrong beyond the sizes (found by fuzzing): a NaN or negative epsilon, a
        # string where a flag or a token id belongs
        for name in ("norm_eps", "rope_theta"):
            if not _is_positive_number(getattr(self, name)):
                raise CheckpointError(f"model config field {name}: expected a finite number > 0, "
                                      f"got {_show(getattr(self, name))}")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise CheckpointError(f"model config field {name}: expected true or false, got {_show(getattr(self, name))}")
        if self.bos_token_id is not None:
            if _token_id(self.bos_token_id) is None:
                raise CheckpointError(f"model config field bos_token_id: expected a token id or null, "
                                      f"got {_show(self.bos_token_id)}")
            object.__setattr__(self, "bos_token_id", _token_id(self.bos_token_id))
        ids = self.eos_token_ids if isinstance(self.eos_token_ids, (tuple, list)) else None
        if ids is None or any(_token_id(i) is None for i in ids):
            raise CheckpointError(f"model config field eos_token_ids: expected a list of token ids, "
                                  f"got {_show(self.eos_token_ids)}")
        object.__setattr__(self, "eos_token_ids", tuple(_token_id(i) for i in ids))

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
        # a record's "model" object may be anything (fuzzing found a list or a missing field to raise TypeError)
        if not isinstance(d, dict):
            raise CheckpointError(f"model config: expected an object, got {_show(d)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise CheckpointError(f"model config: unknown fields {unknown[:8]}")
        missing = [name for name, f in fields.items() if name not in d
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise CheckpointError(f"model config: missing fields {missing}")
        d = dict(d)
        d["eos_token_ids"] = d.get("eos_token_ids", ())
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def qkv_has_bias(self) -> bool:
        return self.attention_bias or self.qkv_bias
