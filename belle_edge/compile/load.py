"""The load pass: a local checkpoint -> canonical config + state dict, tokenizer and chat format.

Accepted, never fetched from a hub:

* a Hugging Face directory: ``config.json`` + ``*.safetensors`` shards (``*.bin`` pickle shards only with
  ``allow_pickle=True``: unpickling can run code), a tokenizer (``tokenizer.json``, or a SentencePiece
  ``tokenizer.model`` converted by transformers) and ``tokenizer_config.json`` / ``chat_template.jinja``;
* a GGUF file (or a directory holding exactly one), read through transformers' GGUF support, which
  dequantizes the weights to fp32. That takes half a minute even for the 135M default model (the reader
  parses the file several times), so the result is kept as a Hugging Face directory in a local cache
  (``$BELLE_EDGE_CACHE``, default ``~/.cache/belle_edge``) keyed by the file's path, size and mtime; the
  next load reads that in a second or two;
* nothing: the default model (:mod:`belle_edge.default_model`).

Every failure a user can cause is a one-line ``CheckpointError`` / ``UnsupportedModelError``.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass

from tokenizers import Tokenizer

from ..default_model import default_model_path
from ..errors import CheckpointError
from ..models import ModelConfig, family, family_name_for
from ..runtime.chat_format import ChatFormat, make_chat_format

GGUF_MAGIC = b"GGUF"


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict  # canonical names -> torch tensors
    tokenizer: Tokenizer
    chat_format: ChatFormat
    stop_token_ids: frozenset[int]
    source: str  # the path it was read from
    kind: str  # "hf" | "gguf"

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.config.to_dict(), sort_keys=True) + self.tokenizer.to_str()
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_checkpoint(model: str | None = None, *, allow_pickle: bool = False, chat_format: str = "auto",
                    max_positions: int | None = None) -> Checkpoint:
    path = default_model_path() if model is None else os.path.abspath(os.path.expanduser(model))
    if not os.path.exists(path):
        raise CheckpointError(f"{model}: no such file or directory")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            ckpt = _load_hf_dir(path, allow_pickle=allow_pickle, chat_format=chat_format)
        else:
            ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
            if len(ggufs) != 1:
                raise CheckpointError(f"{path}: not a model directory: expected config.json or one .gguf file, "
                                      f"found {len(ggufs)} .gguf files and no config.json")
            ckpt = _load_gguf(ggufs[0], chat_format=chat_format)
    else:
        ckpt = _load_gguf(path, chat_format=chat_format)
    if max_positions is not None:
        ckpt.config = ckpt.config.replace(max_positions=max_positions)
    return ckpt


def load_tokenizer(model: str | None = None) -> Tokenizer:
    """Only the tokenizer of a checkpoint (for data tools): no weights are read where that can be avoided."""
    path = default_model_path() if model is None else os.path.abspath(os.path.expanduser(model))
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return _read_tokenizer(path)[0]
    if os.path.isfile(path):
        cached = _gguf_cache_dir(path)
        if cached and os.path.isfile(os.path.join(cached, _CACHE_DONE)):
            return _read_tokenizer(cached)[0]
    return load_checkpoint(model).tokenizer  # a GGUF seen for the first time: convert (and cache) it


# ------------------------------------------------------------------------------------------- HF directory
def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _load_hf_dir(path: str, *, allow_pickle: bool, chat_format: str) -> Checkpoint:
    config_path = os.path.join(path, "config.json")
    hf = _read_json(config_path)
    fam = family(family_name_for(hf.get("model_type"), config_path))
    config = fam.config_from_hf(hf, where=config_path)
    state = _read_weights(path, allow_pickle=allow_pickle)
    state = fam.state_dict_from_hf(state, config, where=path)
    tokenizer, tok_cfg = _read_tokenizer(path)
    _check_vocab(tokenizer, config, path)
    fmt = make_chat_format(chat_format, template=_chat_template(path, tok_cfg), bos_token=_token(tok_cfg, "bos_token"),
                           eos_token=_token(tok_cfg, "eos_token"), where=path)
    return Checkpoint(config, state, tokenizer, fmt, _stop_ids(config, tokenizer, fmt), path, "hf")


def _read_weights(path: str, *, allow_pickle: bool) -> dict:
    shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if shards:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        state = {}
        for shard in shards:
            try:
                state.update(load_file(shard))
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{shard}: not a readable safetensors file ({e})") from None
        return state
    bins = sorted(glob.glob(os.path.join(path, "*.bin")))
    if not bins:
        raise CheckpointError(f"{path}: no weights (*.safetensors, or *.bin with --allow-pickle)")
    if not allow_pickle:
        raise CheckpointError(f"{path}: weights are .bin pickle files, and unpickling can run code; "
                              "pass --allow-pickle (allow_pickle=True) if you trust this checkpoint")
    import pickle

    import torch

    state = {}
    for shard in bins:
        try:
            state.update(torch.load(shard, map_location="cpu", weights_only=True))
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
            raise CheckpointError(f"{shard}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    return state


def _read_tokenizer(path: str) -> tuple[Tokenizer, dict]:
    cfg_path = os.path.join(path, "tokenizer_config.json")
    tok_cfg = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    tok_json = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tok_json):
        try:
            return Tokenizer.from_file(tok_json), tok_cfg
        except Exception as e:  # tokenizers raises bare Exception on malformed files
            raise CheckpointError(f"{tok_json}: not a readable tokenizer ({e})") from None
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        # SentencePiece only (original BELLE-LLaMA releases): transformers converts it to a fast tokenizer
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path).backend_tokenizer, tok_cfg
        except Exception as e:
            raise CheckpointError(f"{path}/tokenizer.model: cannot convert ({str(e).splitlines()[0]})") from None
    raise CheckpointError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model)")


def _token(tok_cfg: dict, key: str) -> str | None:
    value = tok_cfg.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(path: str, tok_cfg: dict) -> str | None:
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template or None


def _check_vocab(tokenizer: Tokenizer, config: ModelConfig, where: str) -> None:
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size:
        raise CheckpointError(f"{where}: tokenizer has {size} tokens but the model's vocab_size is {config.vocab_size}")


def _stop_ids(config: ModelConfig, tokenizer: Tokenizer, fmt: ChatFormat) -> frozenset[int]:
    ids = set(config.eos_token_ids)
    for token in (getattr(fmt, "eos_token", None), fmt.end_token):
        if token and tokenizer.token_to_id(token) is not None:
            ids.add(tokenizer.token_to_id(token))
    return frozenset(ids)


# ------------------------------------------------------------------------------------------- GGUF
def _load_gguf(path: str, *, chat_format: str) -> Checkpoint:
    cached = _gguf_cache_dir(path)
    if cached and os.path.isfile(os.path.join(cached, _CACHE_DONE)):
        ckpt = _load_hf_dir(cached, allow_pickle=False, chat_format=chat_format)
        ckpt.source, ckpt.kind = path, "gguf"
        return ckpt
    ckpt, tok = _convert_gguf(path, chat_format=chat_format)
    if cached:
        _write_hf_dir(ckpt, tok, cached)
    return ckpt


_CACHE_DONE = "belle_edge_cache_complete"


def _gguf_cache_dir(path: str) -> str | None:
    root = os.environ.get("BELLE_EDGE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "belle_edge"))
    if root.lower() in ("", "0", "off", "none"):
        return None
    import transformers

    from .. import __version__

    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{__version__}|{transformers.__version__}"
    return os.path.join(root, "gguf", hashlib.sha256(key.encode()).hexdigest()[:20])


def _write_hf_dir(ckpt: Checkpoint, tok, folder: str) -> None:
    """Write the converted checkpoint as a stock Hugging Face directory; a failure only costs the cache."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    fam = family(ckpt.config.family)
    parent = os.path.dirname(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(fam.hf_config(ckpt.config), f, indent=1)
        state = {k: v.contiguous() for k, v in fam.state_dict_to_hf(ckpt.state_dict, ckpt.config).items()}
        save_file(state, os.path.join(tmp, "model.safetensors"))
        ckpt.tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({"chat_template": tok.chat_template, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                       "source": ckpt.source}, f, indent=1, ensure_ascii=False)
        open(os.path.join(tmp, _CACHE_DONE), "w").close()
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None


def _convert_gguf(path: str, *, chat_format: str):
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (expected magic {GGUF_MAGIC!r}, got {magic!r})")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    family_name_for(_gguf_architecture(path), path)  # refuse other architectures before the slow part
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
    _check_vocab(tokenizer, config, path)
    fmt = make_chat_format(chat_format, template=tok.chat_template, bos_token=tok.bos_token,
                           eos_token=tok.eos_token, where=path)
    return Checkpoint(config, state, tokenizer, fmt, _stop_ids(config, tokenizer, fmt), path, "gguf"), tok


def _gguf_architecture(path: str) -> str:
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
