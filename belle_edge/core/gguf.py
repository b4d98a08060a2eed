"""Reading a GGUF checkpoint through transformers' GGUF support, which dequantizes the weights to fp32.

That takes half a minute even for the 135M model (the reader parses the file several times), so the
result is kept as a Hugging Face directory in the cache (:func:`belle_edge.paths.cache_dir`) keyed by the
file's path, size and mtime and the versions that converted it; the next load reads that in a second or two.
"""
from __future__ import annotations

import hashlib
import os

from ..errors import CheckpointError
from ..models import family, family_name_for
from ..paths import cache_dir
from ..runtime.chat_format import make_chat_format
from .checkpoint import Checkpoint, check_vocab, stop_token_ids

GGUF_MAGIC = b"GGUF"
CACHE_RECORD = "belle_edge_cache.json"  # written last: a cache folder without it is incomplete


def read_gguf(path: str, *, chat_format: str = "auto") -> Checkpoint:
    from .hf_dir import read_hf_dir

    cached = converted_dir(path)
    if cached:
        return read_hf_dir(cached, chat_format=chat_format, kind="gguf", source=path)
    ckpt, tokenizer_config = _convert(path, chat_format=chat_format)
    _keep_in_cache(ckpt, tokenizer_config, gguf_cache_dir(path))
    return ckpt


def read_gguf_config(path: str):
    """Only the ``ModelConfig`` of a GGUF file: its cached conversion's config.json, or else the file's metadata
    (transformers reads the header; no tensor is dequantized)."""
    from transformers import AutoConfig

    from .hf_dir import read_hf_config

    cached = converted_dir(path)
    if cached:
        return read_hf_config(cached)
    _check_magic(path)
    family_name_for(_architecture(path), path)
    folder, name = os.path.split(path)
    try:
        hf_config = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    except Exception as e:  # the GGUF reader raises many types; all mean "this file cannot be used"
        raise _gguf_error(path, e) from None
    return family(family_name_for(hf_config.get("model_type"), path)).config_from_hf(hf_config, where=path)


def gguf_cache_dir(path: str) -> str | None:
    """Where the converted form of the GGUF file at ``path`` is cached (None with the cache off)."""
    import transformers

    from .. import __version__

    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{__version__}|{transformers.__version__}"
    return cache_dir("gguf", hashlib.sha256(key.encode()).hexdigest()[:20])


def converted_dir(path: str) -> str | None:
    """The complete converted Hugging Face directory of a GGUF file, if one is cached."""
    folder = gguf_cache_dir(path)
    return folder if folder and os.path.isfile(os.path.join(folder, CACHE_RECORD)) else None


def _keep_in_cache(ckpt: Checkpoint, tokenizer_config: dict, folder: str | None) -> None:
    """Write the converted checkpoint as a stock Hugging Face directory; a failure only costs the cache."""
    from .save import save_checkpoint

    if folder is None:
        return
    try:
        save_checkpoint(ckpt, folder, tokenizer_config=tokenizer_config, force=True,
                        records={CACHE_RECORD: {"source": ckpt.source}})
    except OSError:
        pass


def _convert(path: str, *, chat_format: str) -> tuple[Checkpoint, dict]:
    _check_magic(path)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    family_name_for(_architecture(path), path)  # refuse other architectures before the slow part
    folder, name = os.path.split(path)
    hf_logging.disable_progress_bar()
    try:
        hf_config = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    except Exception as e:  # the GGUF reader raises many types; all mean "this file cannot be used"
        raise _gguf_error(path, e) from None
    fam = family(family_name_for(hf_config.get("model_type"), path))
    config = fam.config_from_hf(hf_config, where=path)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:
        raise _gguf_error(path, e) from None
    state = fam.state_dict_from_hf(hf_model.state_dict(), config, where=path)
    tokenizer = tok.backend_tokenizer
    check_vocab(tokenizer, config, path)
    fmt = make_chat_format(chat_format, template=tok.chat_template, bos_token=tok.bos_token,
                           eos_token=tok.eos_token, where=path)
    ckpt = Checkpoint(config, state, tokenizer, fmt, stop_token_ids(config, tokenizer, fmt), path, "gguf")
    # the cache keeps the file's own template and specials, whatever --chat-format chose for this load
    tokenizer_config = {"chat_template": tok.chat_template, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                        "tokenizer_class": "PreTrainedTokenizerFast"}
    return ckpt, tokenizer_config


def _check_magic(path: str) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (expected magic {GGUF_MAGIC!r}, got {magic!r})")


def _architecture(path: str) -> str:
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).get_field("general.architecture")
        if field is None:
            raise ValueError("no general.architecture in its metadata")
        return field.contents()
    except Exception as e:  # truncated or malformed files raise anything from struct/numpy errors up
        raise _gguf_error(path, e) from None


def _gguf_error(path: str, e: Exception) -> Exception:
    first = (str(e).splitlines() or [type(e).__name__])[0].replace(path, os.path.basename(path))
    return CheckpointError(f"{path}: not a usable GGUF checkpoint ({first})")
