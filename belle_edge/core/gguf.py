"""Reading a GGUF checkpoint through transformers' GGUF support, which dequantizes the weights to fp32.

That takes half a minute even for the 135M model (the reader parses the file several times), so the
result is kept as a Hugging Face directory in the cache (:func:`belle_edge.paths.cache_dir`) keyed by the
file's path, size and mtime and the versions that converted it; the next load reads that in a second or two.
"""
from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct

from ..errors import CheckpointError
from ..models import family, family_name_for
from ..paths import cache_dir
from ..runtime.chat_format import make_chat_format
from ..runtime.tokenizer_file import usable_tokenizer
from .checkpoint import Checkpoint, check_vocab, stop_token_ids

GGUF_MAGIC = b"GGUF"
CACHE_RECORD = "belle_edge_cache.json"  # written last: a cache folder without it is incomplete

# The GGUF header as _check_layout walks it (the spec: github.com/ggml-org/ggml/blob/master/docs/gguf.md).
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_UINT32, _STRING, _ARRAY = 4, 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
# Bounds on what a header may claim, far above any model's (a few dozen keys, vocabularies of ~260k, a few
# thousand tensors): gguf's reader makes a Python object per key, array item and tensor, so a file that claims
# millions of them would take gigabytes even where its bytes are there.
_MAX_KEYS = 2**16
_MAX_ARRAY = 2**22
_MAX_TENSORS = 2**20


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
    _check_layout(path)
    family_name_for(_architecture(path), path)
    # abspath: a bare file name split into folder "", which transformers refused as a repo id (found by hand)
    folder, name = os.path.split(os.path.abspath(path))
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
    held = _check_layout(path)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    family_name_for(_architecture(path), path)  # refuse other architectures before the slow part
    folder, name = os.path.split(os.path.abspath(path))  # see read_gguf_config
    hf_logging.disable_progress_bar()
    try:
        hf_config = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    except Exception as e:  # the GGUF reader raises many types; all mean "this file cannot be used"
        raise _gguf_error(path, e) from None
    fam = family(family_name_for(hf_config.get("model_type"), path))
    config = fam.config_from_hf(hf_config, where=path)
    _check_parameters(path, config, held)
    tok = usable_tokenizer(lambda: AutoTokenizer.from_pretrained(folder, gguf_file=name), path,
                           backend=lambda t: t.backend_tokenizer)
    try:
        hf_model, info = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                              output_loading_info=True)
    except Exception as e:
        raise _gguf_error(path, e) from None
    if info["missing_keys"]:  # transformers fills a weight the file lacks with random numbers, and only logs it
        missing = sorted(info["missing_keys"])
        raise CheckpointError(f"{path}: weights missing for the configured model: {', '.join(missing[:3])}"
                              + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
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


def _check_parameters(path: str, config, held: int) -> None:
    """The metadata's shapes may not need more parameters than the file's tensors hold: transformers builds the
    model from the metadata before it reads a tensor, so a corrupt block count or width allocated that model in
    full (gigabytes for a few flipped bits, found by fuzzing) and then filled what the file lacks at random."""
    from ..footprint import count_params

    needed = count_params(config)
    if needed > held:
        raise CheckpointError(f"{path}: config contradicts weights: the metadata's shapes need {needed:,} "
                              f"parameters, the file's tensors hold {held:,}")


def _check_layout(path: str) -> int:
    """Walk the GGUF header of ``path``, checking each length, count and type it claims against the bytes the
    file has, before gguf's GGUFReader (and transformers on top of it) reads it: that reader trusts them, so an
    array claiming 2**63 numbers at the end of a file looped for ever, growing a list (found by fuzzing).
    Returns the number of elements the file's tensors hold."""
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: an empty file
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    with buf:
        return _walk(_Cursor(path, buf))


class _Cursor:
    """A position in a GGUF file's bytes; every read first checks that the bytes are there."""

    def __init__(self, path: str, buf):
        self.path, self.buf, self.pos = path, buf, 0
        self.order = "<"

    def error(self, what: str, expected: str, got) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a usable GGUF checkpoint: {what}: expected {expected}, got {got}")

    def take(self, n: int, what: str) -> int:
        """Step over ``n`` bytes; returns where they start."""
        left = len(self.buf) - self.pos
        if n > left:
            raise self.error(what, f"{n:,} bytes at offset {self.pos:,}", f"{left:,} left in the file")
        self.pos += n
        return self.pos - n

    def number(self, fmt: str, what: str) -> int:
        return struct.unpack_from(self.order + fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.number("Q", f"{what} length")
        start = self.take(n, what)
        return self.buf[start:self.pos].decode("utf-8", "replace")

    def skip_strings(self, n: int, what: str) -> None:
        """Step over ``n`` strings: a vocabulary, hundreds of thousands of them, so one lean loop."""
        unpack, buf, pos, size = struct.Struct(self.order + "Q").unpack_from, self.buf, self.pos, len(self.buf)
        for i in range(n):
            pos += 8 + (unpack(buf, pos)[0] if pos + 8 <= size else size)  # past the end: any length fails
            if pos > size:
                raise self.error(f"{what}[{i}]", "a string within the file", f"one that ends at offset {pos:,} "
                                                                               f"of {size:,}")
        self.pos = pos

    def count(self, n: int, least: int, most: int, what: str) -> int:
        """A claimed number of items of at least ``least`` bytes each: at most ``most`` and what the bytes
        left can hold, checked before any is read."""
        left = len(self.buf) - self.pos
        if n > most or n * least > left:
            raise self.error(what, f"at most {min(most, left // least):,} (what the file's {left:,} bytes left "
                                   f"can hold)", f"{n:,}")
        return n


def _walk(c: _Cursor) -> int:
    c.take(4, "magic")
    version = c.number("I", "version")
    if version & 0xFFFF == 0:  # as gguf's reader: a file of the other byte order
        c.order = ">"
        version = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version not in (2, 3):
        raise c.error("version", "2 or 3", version)
    n_tensors = c.number("Q", "tensor count")
    n_keys = c.count(c.number("Q", "metadata count"), 8 + 4 + 1, _MAX_KEYS, "metadata count")
    alignment = 32
    for i in range(n_keys):
        key = c.string(f"metadata key #{i}")
        what = f"metadata {key!r}"
        value_type = c.number("I", f"{what} type")
        if key == "general.alignment":  # where the tensor data starts depends on it
            if value_type != _UINT32:
                raise c.error(what, f"type {_UINT32} (uint32)", value_type)
            alignment = c.number("I", what)
            if alignment == 0 or alignment & (alignment - 1):
                raise c.error(what, "a power of two", alignment)
        else:
            _skip_value(c, value_type, what)
    c.count(n_tensors, 8 + 4 + 4 + 8, _MAX_TENSORS, "tensor count")
    tensors = [_tensor_info(c, i) for i in range(n_tensors)]
    data = -(-c.pos // alignment) * alignment
    for name, offset, n_bytes, _ in tensors:
        if data + offset + n_bytes > len(c.buf):
            raise c.error(f"tensor {name!r}", f"its {n_bytes:,} bytes at offset {data + offset:,}",
                          f"a file of {len(c.buf):,} bytes")
    return sum(n for *_, n in tensors)


def _skip_value(c: _Cursor, value_type: int, what: str) -> None:
    if value_type in _SCALAR_BYTES:
        c.take(_SCALAR_BYTES[value_type], what)
    elif value_type == _STRING:
        c.take(c.number("Q", f"{what} length"), what)
    elif value_type == _ARRAY:
        item_type = c.number("I", f"{what} item type")
        n = c.number("Q", f"{what} length")
        if item_type in _SCALAR_BYTES:
            c.take(c.count(n, _SCALAR_BYTES[item_type], _MAX_ARRAY, f"{what} length") * _SCALAR_BYTES[item_type],
                   what)
        elif item_type == _STRING:
            c.skip_strings(c.count(n, 8, _MAX_ARRAY, f"{what} length"), what)
        else:  # no model's metadata nests arrays; gguf's reader would recurse on them
            raise c.error(f"{what} item type", "a number, boolean or string type (0-8, 10-12)", item_type)
    else:
        raise c.error(f"{what} type", "a value type 0-12", value_type)


def _tensor_info(c: _Cursor, i: int) -> tuple[str, int, int, int]:
    """(name, data offset, bytes, elements) of the i-th tensor."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name = c.string(f"tensor #{i} name")
    what = f"tensor {name!r}"
    n_dims = c.number("I", f"{what} dimension count")
    if n_dims > _MAX_DIMS:
        raise c.error(f"{what} dimension count", f"at most {_MAX_DIMS}", n_dims)
    dims = [c.number("Q", f"{what} dimensions") for _ in range(n_dims)]
    type_id = c.number("I", f"{what} type")
    offset = c.number("Q", f"{what} offset")
    try:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise c.error(f"{what} type", "a GGML tensor type", type_id) from None
    if dims and dims[0] % block:
        raise c.error(f"{what} row length", f"whole blocks of {block}", dims[0])
    n = math.prod(dims)
    return name, offset, n // block * block_bytes, n


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
