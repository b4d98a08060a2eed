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

from ..errors import CheckpointError, first_line
from ..models import family, family_name_for
from ..runtime.chat_format import make_chat_format
from ..runtime.tokenizer_file import read_tokenizer_file, usable_tokenizer
from .checkpoint import Checkpoint, check_vocab, stop_token_ids

SAFETENSORS_INDEX = "model.safetensors.index.json"  # a sharded checkpoint's map of tensor -> shard file


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        # ValueError: besides JSONDecodeError / UnicodeDecodeError, an integer of more than 4,300 digits;
        # RecursionError: arrays nested thousands deep (both found by fuzzing, tests/test_fuzz_inputs.py)
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
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):  # a sharded checkpoint: the index names its shards
        weight_map = _weight_map(index, path)
        files = sorted({os.path.join(path, shard) for shard in weight_map.values()})
        shards = {shard: _read_safetensors(shard) for shard in files}
        state = _merged(shards)
        _check_index(index, weight_map, shards)
        return state
    # glob.escape: a folder named like "qwen[int4]" is a pattern to glob, which then matched nothing (found by hand)
    shards = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if shards:
        return _merged({shard: _read_safetensors(shard) for shard in shards})
    bins = sorted(glob.glob(os.path.join(glob.escape(path), "*.bin")))
    if not bins:
        raise CheckpointError(f"{path}: no weights (*.safetensors, or *.bin with --allow-pickle)")
    if not allow_pickle:
        raise CheckpointError(f"{path}: weights are .bin pickle files, and unpickling can run code; "
                              "pass --allow-pickle (allow_pickle=True) if you trust this checkpoint")
    return _merged({shard: _read_pickle(shard) for shard in bins})


def _read_safetensors(shard: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(shard)
    except (SafetensorError, OSError, ValueError) as e:
        # first_line: the reader quotes the header, whose strings may hold a line break (fuzzing)
        raise CheckpointError(f"{shard}: not a readable safetensors file ({first_line(e)})") from None


def _read_pickle(shard: str) -> dict:
    import torch

    try:
        state = torch.load(shard, map_location="cpu", weights_only=True)
    except Exception as e:
        # weights_only runs no code, so any exception means a corrupt file: on one, torch's restricted unpickler
        # raises IndexError, KeyError, UnicodeDecodeError, ... besides UnpicklingError (fuzzing), and EOFError
        # with no message at all (which made str(e).splitlines()[0] an IndexError)
        raise CheckpointError(f"{shard}: not a readable torch checkpoint ({first_line(e)})") from None
    if not isinstance(state, dict):  # a pickled tensor or list made dict.update raise TypeError (fuzzing)
        raise CheckpointError(f"{shard}: expected a dict of tensor names to tensors, got {type(state).__name__}")
    return state


def _weight_map(index: str, folder: str) -> dict[str, str]:
    """The index's tensor -> shard map. Each shard must be a file in ``folder``: a name with a path in it ("../x",
    "/x", "sub/x") is refused, so an index cannot make us read files elsewhere, and a missing shard is named
    here (before, the shards present were read and a tensor was only missed much later)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: field weight_map: expected an object of tensor names to shard files, "
                              f"got {_describe(weight_map)}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or shard in ("", ".", "..") or os.path.basename(shard) != shard:
            raise CheckpointError(f"{index}: field weight_map[{name!r}]: expected a shard file name in the "
                                  f"checkpoint folder, got {_describe(shard)}")
        if not os.path.isfile(os.path.join(folder, shard)):
            raise CheckpointError(f"{index}: field weight_map[{name!r}]: shard {shard!r} is missing")
    return weight_map


def _check_index(index: str, weight_map: dict, shards: dict[str, dict]) -> None:
    """The index and its shards must agree tensor for tensor (fuzzing: a tensor the index put in another
    shard, or one it did not name, was read all the same)."""
    where = {name: shard for shard, tensors in shards.items() for name in tensors}
    for name, shard in weight_map.items():
        if name not in where or os.path.basename(where[name]) != shard:
            raise CheckpointError(f"{index}: field weight_map[{name!r}]: expected the shard holding that tensor, "
                                  f"got {shard!r}, which does not hold it")
    unnamed = sorted(set(where) - set(weight_map))
    if unnamed:
        raise CheckpointError(f"{index}: field weight_map: expected every tensor of the shards, got no entry for "
                              f"{unnamed[0]!r} (in {where[unnamed[0]]})")


def _merged(shards: dict[str, dict]) -> dict:
    """One state dict from its shards (file -> tensors). A tensor in two shards is refused: which copy was used
    depended on the order the shards were read in (fuzzing)."""
    state, seen = {}, {}
    for shard, tensors in shards.items():
        for name, tensor in tensors.items():
            if name in seen:
                raise CheckpointError(f"{shard}: tensor {name!r}: expected it in one shard, got it in {seen[name]} too")
            _check_weight(shard, name, tensor)
            seen[name] = shard
            state[name] = tensor
    return state


def _check_weight(shard: str, name, tensor) -> None:
    """A weight is a tensor of real numbers under a string name. Refused (fuzzing): torch's packed float4
    (converting it raised NotImplementedError in the decoder), complex numbers (their imaginary part was
    dropped with only a warning), and from a pickle, names or values of any other type."""
    import torch

    if not isinstance(name, str):
        raise CheckpointError(f"{shard}: tensor names: expected strings, got {_describe(name)}")
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"{shard}: tensor {name!r}: expected a tensor, got {type(tensor).__name__}")
    if tensor.dtype.is_complex or tensor.dtype == getattr(torch, "float4_e2m1fn_x2", None):
        raise CheckpointError(f"{shard}: tensor {name!r}: expected real numbers (float, int or bool), "
                              f"got {str(tensor.dtype).removeprefix('torch.')}")


def _describe(value) -> str:
    """A JSON value for a one-line message: its type and a short repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def read_tokenizer(path: str) -> tuple[Tokenizer, dict]:
    cfg_path = os.path.join(path, "tokenizer_config.json")
    tok_cfg = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    for key in ("bos_token", "eos_token"):  # a number or a list here failed later in the chat format (fuzzing)
        value = tok_cfg.get(key)
        if not (value is None or isinstance(value, str)
                or (isinstance(value, dict) and isinstance(value.get("content"), (str, type(None))))):
            raise CheckpointError(f"{cfg_path}: field {key!r}: expected a string, an object with a string "
                                  f"\"content\" or null, got {type(value).__name__} {str(value)[:40]!r}")
    tok_json = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tok_json):
        return read_tokenizer_file(tok_json), tok_cfg
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        # SentencePiece only (original BELLE-LLaMA releases): transformers converts it to a fast tokenizer
        from transformers import AutoTokenizer

        return usable_tokenizer(lambda: AutoTokenizer.from_pretrained(path).backend_tokenizer,
                                f"{path}/tokenizer.model"), tok_cfg
    raise CheckpointError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model)")


def _token(tok_cfg: dict, key: str) -> str | None:
    value = tok_cfg.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(path: str, tok_cfg: dict) -> str | None:
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        try:
            with open(jinja, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:  # invalid UTF-8 raised UnicodeDecodeError (fuzzing)
            raise CheckpointError(f"{jinja}: not readable UTF-8 text ({e})") from None
    where = os.path.join(path, "tokenizer_config.json")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        # each entry must be {"name": ..., "template": ...}: anything else raised AttributeError (fuzzing)
        if not all(isinstance(t, dict) for t in template):
            raise CheckpointError(f"{where}: field 'chat_template': expected a string or a list of "
                                  "{\"name\", \"template\"} objects, got a list holding something else")
        named = {t.get("name"): t.get("template") for t in template if isinstance(t.get("name"), str)}
        template = named.get("default")
    if not (template is None or isinstance(template, str)):  # a number here failed later in jinja (fuzzing)
        raise CheckpointError(f"{where}: field 'chat_template': expected a string, got {type(template).__name__}")
    return template or None
