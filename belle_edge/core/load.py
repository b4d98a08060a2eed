"""Opening a local checkpoint — never fetched from a hub:

* a Hugging Face directory (:mod:`.hf_dir`);
* a GGUF file, or a directory holding exactly one (:mod:`.gguf`);
* a model known by name (``qwen2.5-0.5b``, ``smollm2-135m``: :mod:`belle_edge.known_models`);
* nothing: the default model (:mod:`belle_edge.default_model`).

A folder written by the quantize stage is not a checkpoint this opens: ``belle-edge export`` takes it.
Every failure a user can cause is a one-line ``CheckpointError`` / ``UnsupportedModelError``.
"""
from __future__ import annotations

import glob
import os

from tokenizers import Tokenizer

from ..default_model import default_model_path
from ..known_models import known_model, model_path
from ..errors import CheckpointError
from .checkpoint import Checkpoint

QUANTIZED_RECORD = "quantization.json"  # marks a folder written by the quantize stage
PRUNING_RECORD = "pruning.json"  # what the prune stage writes beside a pruned checkpoint (compile/prune/stage.py)


def load_checkpoint(model: str | None = None, *, allow_pickle: bool = False, chat_format: str = "auto",
                    max_positions: int | None = None) -> Checkpoint:
    from .gguf import read_gguf
    from .hf_dir import read_hf_dir

    path = checkpoint_path(model)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            ckpt = read_hf_dir(path, allow_pickle=allow_pickle, chat_format=chat_format)
        else:
            ckpt = read_gguf(_only_gguf(path), chat_format=chat_format)
    else:
        ckpt = read_gguf(path, chat_format=chat_format)
    if max_positions is not None:
        ckpt = ckpt.replace(config=ckpt.config.replace(max_positions=max_positions))
    return ckpt


def load_config(model: str | None = None):
    """Only the ``ModelConfig`` of a checkpoint, with no weights read: a Hugging Face directory's config.json,
    a GGUF file's metadata, or the record of a folder written by the quantize stage."""
    from ..models.config import ModelConfig
    from .gguf import read_gguf_config
    from .hf_dir import read_hf_config, read_json

    if model is not None and os.path.isfile(os.path.join(model, QUANTIZED_RECORD)):
        record = os.path.join(model, QUANTIZED_RECORD)
        data = read_json(record)
        try:
            return ModelConfig.from_dict(data["model"])
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{record}: no readable model config ({type(e).__name__}: {e})") from None
        except CheckpointError as e:  # ModelConfig names the field, not the file (fuzzing)
            raise CheckpointError(f"{record}: field model: {e}") from None
    path = checkpoint_path(model)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return read_hf_config(path)
    return read_gguf_config(_only_gguf(path) if os.path.isdir(path) else path)


def load_tokenizer(model: str | None = None) -> Tokenizer:
    """Only the tokenizer of a checkpoint (for data tools): no weights are read where that can be avoided."""
    from .gguf import converted_dir
    from .hf_dir import read_tokenizer

    path = checkpoint_path(model)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return read_tokenizer(path)[0]
    cached = converted_dir(path) if os.path.isfile(path) else None
    if cached:
        return read_tokenizer(cached)[0]
    return load_checkpoint(model).tokenizer  # a GGUF seen for the first time: convert (and cache) it


def checkpoint_path(model: str | None) -> str:
    """The absolute path ``model`` names (the default model's file for None); refuses a missing one and a
    quantize stage's output with a pointer to what takes it."""
    if model is None:
        path = default_model_path()
    elif known_model(model) is not None:  # a model known by name (known_models.py)
        path = model_path(model)
    else:
        path = os.path.abspath(os.path.expanduser(model))
    if not os.path.exists(path):
        raise CheckpointError(f"{model}: no such file or directory")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, QUANTIZED_RECORD)):
        raise CheckpointError(f"{path}: a quantized checkpoint (written by belle-edge quantize); export it to an "
                              f"artifact with: belle-edge export {model} --out ARTIFACT")
    return path


def _only_gguf(folder: str) -> str:
    ggufs = sorted(glob.glob(os.path.join(glob.escape(folder), "*.gguf")))  # "[" in a folder name is no pattern
    if len(ggufs) != 1:
        raise CheckpointError(f"{folder}: not a model directory: expected config.json or one .gguf file, "
                              f"found {len(ggufs)} .gguf files and no config.json")
    return ggufs[0]


def pruning_record(path: str) -> dict | None:
    """A pruned checkpoint's ``pruning.json`` (None for a checkpoint that has none)."""
    from .hf_dir import read_json

    record = os.path.join(path, PRUNING_RECORD)
    return read_json(record) if os.path.isfile(record) else None


def teacher_of(student: str) -> str:
    """The unpruned model a pruned checkpoint names in its ``pruning.json``: a known model's name or a path (what
    eval-fidelity compares with and distillation learns from)."""
    record = pruning_record(student)
    if record is None:
        raise CheckpointError(f"{student}: no {PRUNING_RECORD} naming its teacher; pass --teacher")
    teacher = (record.get("teacher") or {}).get("path")
    if not isinstance(teacher, str):
        raise CheckpointError(f"{os.path.join(student, PRUNING_RECORD)}: field teacher.path is missing; pass --teacher")
    return teacher


def load_named(name: str) -> Checkpoint:
    """A checkpoint as a record names it: a path or a known model's name; "default" (records written before
    the default model changed) was SmolLM2."""
    from ..default_model import LEGACY_DEFAULT

    return load_checkpoint(LEGACY_DEFAULT if name == "default" else name)
