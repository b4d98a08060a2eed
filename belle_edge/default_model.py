"""The model a command uses when none is named: one of belle_edge/known_models.py, by name.

Qwen2.5-Coder-0.5B-Instruct (Qwen2, Q4_K_M GGUF): it holds a Chinese customer-service dialogue, which the
SDK exists for. `make` fetches it (``belle-edge fetch-model qwen2.5-0.5b``). SmolLM2-135M-Instruct stays
available by name (``smollm2-135m``): small and fast, it is what most tests use.

Records (pruning.json, sft.json, eval results) name the model they used; :data:`LEGACY_DEFAULT` is what the
word "default" meant in records written before the default changed.
"""
from __future__ import annotations

from .known_models import MODELS, model_path

DEFAULT = "qwen2.5-0.5b"
NAME = MODELS[DEFAULT].title
LEGACY_DEFAULT = "smollm2-135m"


def default_model_path() -> str:
    return model_path(DEFAULT)
