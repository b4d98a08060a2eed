"""Incremental detokenizer: text grows only by whole characters.

Chinese characters span several byte-level tokens; ``tokenizers``' ``DecodeStream`` holds the bytes back
until they form valid UTF-8. On top we record where the text is "clean" (every pushed token accounted for in
the text), so the session can roll generated tokens back to an exact text boundary, e.g. before a stop
string. Torch-free.
"""
from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.text = ""
        self.tokens = 0
        # (tokens pushed, len(text)) at each point where no bytes were pending
        self.clean = [(0, 0)]

    def push(self, token_id: int) -> str:
        """Feed one token; returns the new text it completed ('' while a character is still partial)."""
        piece = self._stream.step(self._tokenizer, int(token_id))
        self.tokens += 1
        if piece is None:
            return ""
        self.text += piece
        self.clean.append((self.tokens, len(self.text)))
        return piece

    def boundary(self, max_tokens: int, max_chars: int) -> tuple[int, int]:
        """The last clean point with at most ``max_tokens`` tokens and ``max_chars`` characters."""
        for tokens, chars in reversed(self.clean):
            if tokens <= max_tokens and chars <= max_chars:
                return tokens, chars
        return 0, 0


def stop_holdback(text: str, stop_strings: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could still grow into a stop string (so must not be shown)."""
    hold = 0
    for stop in stop_strings:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


def find_stop(text: str, stop_strings: tuple[str, ...], start: int = 0) -> int:
    """Index of the earliest stop string in ``text[start:]`` (absolute), or -1."""
    hits = [i for i in (text.find(s, start) for s in stop_strings if s) if i >= 0]
    return min(hits) if hits else -1
