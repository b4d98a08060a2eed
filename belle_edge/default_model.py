"""The model a command uses when none is named: one of belle_edge/known_models.py, by name.

Still SmolLM2-135M-Instruct (issue 12 moves the default to the Chinese-speaking Qwen2.5-0.5B once the
compiled demo path is in place); both can be named anywhere a model is taken (``belle-edge chat
qwen2.5-0.5b``), and fetched with ``belle-edge fetch-model``.
"""
from __future__ import annotations

from .known_models import MODELS, model_path

DEFAULT = "smollm2-135m"
NAME = MODELS[DEFAULT].title


def default_model_path() -> str:
    return model_path(DEFAULT)
