"""Reading a ``tokenizer.json`` that came from anywhere (a checkpoint, an artifact copied to a device, a GGUF's
conversion): it loads and can encode, or one ``CheckpointError`` names the file; its padding and truncation are switched off. Torch-free.

Two ways the ``tokenizers`` library fails that ``except Exception`` misses or defers (fuzzing,
tests/test_fuzz_inputs.py): a panic inside its Rust code reaches Python as pyo3's ``PanicException``, a
``BaseException``; and a file whose model section contradicts itself can load and fail only on its first text.
"""
from __future__ import annotations

from typing import Callable

from tokenizers import Tokenizer

from ..errors import CheckpointError, first_line

PROBE = "你好, hello 123"


def is_rust_panic(e: BaseException) -> bool:
    return type(e).__name__ == "PanicException"


def usable_tokenizer(load: Callable, where: str, *, backend: Callable = lambda tok: tok):
    """``load()`` a tokenizer, then encode and decode a probe text with ``backend(tokenizer)`` (a
    ``tokenizers.Tokenizer``; transformers' tokenizers hold one); any failure is ``where``'s, in one line."""
    try:
        tokenizer = load()
        probe = backend(tokenizer)
        # The runtime encodes one text at a time and bounds the context itself: a file's padding (a fixed
        # length of 10**12 aborts the process, Rust's allocation failure) and truncation (a stride past the
        # length panics; any length silently cuts a user's message) have no business here.
        probe.no_padding()
        probe.no_truncation()
        ids = probe.encode(PROBE).ids
        if not ids:  # a post-processor can replace every text by nothing: each turn would feed no tokens
            raise CheckpointError(f"{where}: not a usable tokenizer (it encodes {PROBE!r} to no tokens)")
        probe.decode(ids)
        return tokenizer
    except CheckpointError:
        raise
    except Exception as e:  # tokenizers raises bare Exception (and transformers many types) on malformed files
        raise CheckpointError(f"{where}: not a readable tokenizer ({first_line(e)})") from None
    except BaseException as e:
        if not is_rust_panic(e):
            raise
        raise CheckpointError(f"{where}: not a usable tokenizer (tokenizers failed: {first_line(e)})") from None


def read_tokenizer_file(path: str) -> Tokenizer:
    return usable_tokenizer(lambda: Tokenizer.from_file(path), path)

