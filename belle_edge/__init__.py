"""belle_edge: compile BELLE-family chat models for edge devices and chat with them.

``import belle_edge`` stays light (no torch): the names below load on first use.
"""
__version__ = "0.1.0"

_LAZY = {
    "load": ("belle_edge.api", "load"),
    "ChatModel": ("belle_edge.runtime.model", "ChatModel"),
    "ChatSession": ("belle_edge.runtime.session", "ChatSession"),
    "SamplingConfig": ("belle_edge.runtime.sampler", "SamplingConfig"),
    "BatchEngine": ("belle_edge.runtime.engine", "BatchEngine"),
    "EngineConfig": ("belle_edge.runtime.engine", "EngineConfig"),
    "MaskConfig": ("belle_edge.mask", "MaskConfig"),
    "BelleEdgeError": ("belle_edge.errors", "BelleEdgeError"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'belle_edge' has no attribute {name!r}")


__all__ = list(_LAZY)
