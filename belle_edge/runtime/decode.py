"""The decode loop: from the logits that end a prompt to a reply — sample, stop on an end token, a stop
string or a limit, and stream the text in whole characters. One loop for everything that generates: the
chat session (and through it ``belle-edge eval``) and the benchmark runners. Torch-free.

What it does not know: where the tokens go. ``step(token)`` feeds one token to the model and returns
the next logits, or None when there is no room for it (the reply ends with ``context``).
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np

from .detokenizer import IncrementalDetokenizer, find_stop, stop_holdback
from .sampler import Sampler

FINISH_REASONS = ("eos", "stop", "length", "context", "interrupted")


class Decoding:
    """One reply. Iterate :meth:`run` for its text; afterwards the attributes say how it went."""

    def __init__(self, tokenizer, sampler: Sampler, *, stop_token_ids=frozenset(), stop_strings: tuple[str, ...] = (),
                 max_new_tokens: int = 256):
        self.sampler = sampler
        self.stop_token_ids = stop_token_ids
        self.stop_strings = tuple(stop_strings)
        self.max_new_tokens = max_new_tokens
        self.detok = IncrementalDetokenizer(tokenizer)
        self.new_tokens = 0  # tokens of the reply (an end token that stopped it not counted)
        self.sampled = 0  # tokens sampled, the end token included
        self.finish_reason = "interrupted"  # until the loop ends by itself
        self.stop_at = -1  # where a stop string starts in ``detok.text``
        self.emitted = 0  # characters of ``detok.text`` streamed so far
        self.t_first = self.t_last = None  # perf_counter times of the first and last sample

    def run(self, logits: np.ndarray, step: Callable[[int], np.ndarray | None],
            context: Callable[[], np.ndarray | None] = lambda: None) -> Iterator[str]:
        """Yield the reply's text as it grows. ``context()``: the tokens a repetition penalty applies to."""
        while True:
            token = self.sampler(logits, context())
            self.sampled += 1
            self.t_last = time.perf_counter()
            if self.t_first is None:
                self.t_first = self.t_last
            if token in self.stop_token_ids:
                self.finish_reason = "eos"
                return
            self.new_tokens += 1
            self.detok.push(token)
            text = self.detok.text
            self.stop_at = find_stop(text, self.stop_strings, self.emitted)
            if self.stop_at >= 0:
                self.finish_reason = "stop"
                return
            show = len(text) - stop_holdback(text, self.stop_strings)  # what cannot turn into a stop string
            if show > self.emitted:
                piece, self.emitted = text[self.emitted:show], show
                yield piece
            if self.new_tokens >= self.max_new_tokens:
                self.finish_reason = "length"
                return
            logits = step(token)
            if logits is None:
                self.finish_reason = "context"
                return

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first (which the prefill paid for)."""
        if self.t_first is None or self.t_last <= self.t_first:
            return 0.0
        return (self.sampled - 1) / (self.t_last - self.t_first)
