"""Where belle_edge keeps files of its own: the cache, fetched models, and the kernel sources of a checkout.

One helper per place, so every user of the cache honours ``BELLE_EDGE_CACHE`` the same way:

* ``BELLE_EDGE_CACHE=/some/dir`` moves the cache (default ``~/.cache/belle_edge``);
* ``BELLE_EDGE_CACHE=off`` (or ``0``, ``none``, empty) turns it off: :func:`cache_dir` answers ``None`` and
  each caller works without one (a converted GGUF is not kept; a kernel build or the TensorRT-RTX library
  links go to a temporary folder that lives as long as the process).
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from .errors import MissingDependencyError

CACHE_ENV = "BELLE_EDGE_CACHE"
MODELS_ENV = "BELLE_EDGE_MODELS"
KERNELS_ENV = "BELLE_EDGE_KERNELS"
_OFF = ("", "0", "off", "none", "false")


def cache_dir(*parts: str) -> str | None:
    """``$BELLE_EDGE_CACHE/<parts>`` (not created), or None when the cache is switched off."""
    root = os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "belle_edge"))
    if root.strip().lower() in _OFF:
        return None
    return os.path.join(root, *parts)


def cache_or_temp_dir(*parts: str) -> str:
    """The cache folder for ``parts`` (created), or, with the cache off, a temporary folder removed when
    the process exits: for files that must exist while we run (a shared library, symlinks) but need not
    outlive us."""
    path = cache_dir(*parts)
    if path is None:
        path = tempfile.mkdtemp(prefix="belle_edge-" + "-".join(parts) + "-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    return path


def models_dir() -> str:
    """Where fetched models live (known_models.py): ``$BELLE_EDGE_MODELS``, default ``~/.cache/belle_edge/models``.
    Not the cache: a model is fetched once and kept whatever ``BELLE_EDGE_CACHE`` says (the tests move the
    cache, not the models)."""
    return os.environ.get(MODELS_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "belle_edge", "models")


def repo_root() -> str:
    """The checkout this package was installed from (an editable install): the folder above ``belle_edge/``."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernels_dir() -> str:
    """``kernels/`` of this checkout, or ``$BELLE_EDGE_KERNELS``; refuses when the sources are not there."""
    here = os.path.abspath(os.environ.get(KERNELS_ENV) or os.path.join(repo_root(), "kernels"))
    if not os.path.isfile(os.path.join(here, "include", "belle_attention.h")):
        raise MissingDependencyError(f"kernel sources not found at {here}: use a source checkout "
                                     f"(pip install -e .) or set {KERNELS_ENV}")
    return here


def kernels_build_dir() -> str:
    """Where CMake builds the kernels and the TensorRT plugin (``kernels/build``), whether or not it exists."""
    here = os.environ.get(KERNELS_ENV) or os.path.join(repo_root(), "kernels")
    return os.path.join(os.path.abspath(here), "build")
