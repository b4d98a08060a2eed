"""Reading a Hugging Face checkpoint directory: ``config.json`` + ``*.safetensors`` shards (``*.bin`` pickle
shards only with ``allow_pickle=True``: unpickling can run code), a tokenizer (``tokenizer.json``, or a
SentencePiece ``tokenizer.model`` converted by transformers) and ``tokenizer_config.json`` /
``chat_template.jinja``. Every failure a user can cause is a one-line ``CheckpointError``.
"""
from __future__ import annotations

import glob
import json
import os

from tokenizers import Tokenizer

from ..errors import CheckpointError
from ..models import family, family_name_for
from ..runtime.chat_format import make_chat_format
from .checkpoint import Checkpoint, check_vocab, stop_token_ids


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_hf_dir(path: str, *, allow_pickle: bool = False, chat_format: str = "auto", kind: str = "hf",
                source: str | None = None) -> Checkpoint:
    """The checkpoint in a Hugging Face directory; ``kind``/``source`` name what it stands for (a GGUF file's
    converted cache is read as that file)."""
    config_path = os.path.join(path, "config.json")
    hf = read_json(config_path)
    fam = family(family_name_for(hf.get("model_type"), config_path))
    config = fam.config_from_hf(hf, where=config_path)
    state = _read_weights(path, allow_pickle=allow_pickle)
    state = fam.state_dict_from_hf(state, config, where=path)
    tokenizer, tok_cfg = read_tokenizer(path)
    check_vocab(tokenizer, config, path)
    fmt = make_chat_format(chat_format, template=_chat_template(path, tok_cfg), bos_token=_token(tok_cfg, "bos_token"),
                           eos_token=_token(tok_cfg, "eos_token"), where=path)
    return Checkpoint(config, state, tokenizer, fmt, stop_token_ids(config, tokenizer, fmt), source or path, kind)


def read_hf_config(path: str):
    """Only the ``ModelConfig`` of a Hugging Face directory (its config.json; no weights, no tokenizer)."""
    config_path = os.path.join(path, "config.json")
    hf = read_json(config_path)
    return family(family_name_for(hf.get("model_type"), config_path)).config_from_hf(hf, where=config_path)


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


def read_tokenizer(path: str) -> tuple[Tokenizer, dict]:
    cfg_path = os.path.join(path, "tokenizer_config.json")
    tok_cfg = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
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
