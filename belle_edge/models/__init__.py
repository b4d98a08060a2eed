"""Model families and the canonical decoder.

A family is a module named after its Hugging Face ``model_type``, with ``config_from_hf``, ``state_dict_from_hf``,
``state_dict_to_hf`` and ``hf_config``. Importing this package imports no torch; the decoder and the
family converters do, so ask for them through :func:`family` and ``belle_edge.models.decoder``.
"""
from __future__ import annotations

import importlib

from ..errors import UnsupportedModelError
from .config import ModelConfig

_FAMILY_MODULES = {"llama": "llama", "bloom": "bloom", "qwen2": "qwen2"}


def family_name_for(model_type: str | None, where: str) -> str:
    for name in _FAMILY_MODULES:
        if model_type == name:
            return name
    raise UnsupportedModelError(
        f"{where}: architecture {model_type!r} is not supported; supported: {', '.join(_FAMILY_MODULES)}")


def family(name: str):
    """The family module (``llama``, ``bloom`` or ``qwen2``); imports torch (bloom's converter)."""
    if name not in _FAMILY_MODULES:
        raise UnsupportedModelError(f"model family {name!r} is not supported; supported: {', '.join(_FAMILY_MODULES)}")
    return importlib.import_module(f"{__name__}.{_FAMILY_MODULES[name]}")


__all__ = ["ModelConfig", "family", "family_name_for"]
