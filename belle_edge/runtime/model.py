"""``ChatModel``: what an app holds after loading — tokenizer, chat format, stops, and a backend factory.

Torch-free: the loader that made it may have used torch (the torch backend) or not (onnxruntime, TensorRT).
"""
from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Callable

from tokenizers import Tokenizer

from ..mask import RULE_VERSION, MaskConfig
from .backends.base import Backend, BatchBackend
from .chat_format import ChatFormat
from .sampler import SamplingConfig
from .session import ChatSession

DEFAULT_KV_TOKENS = 4096


@dataclass
class ChatModel:
    name: str
    tokenizer: Tokenizer
    chat_format: ChatFormat
    stop_token_ids: frozenset[int]
    max_positions: int
    fingerprint: str  # identifies the weights + tokenizer, so a saved session is not restored into another model
    backend_factory: Callable[[int], Backend]  # capacity (KV slots) -> a fresh backend for one session
    backend_name: str = "torch"
    max_kv_tokens: int | None = None  # the most the backend can hold (a TensorRT engine's KV range), if bounded
    # (slots, capacity) -> a KV pool for the batched engine (runtime/engine.py); None where the backend has none
    pool_factory: Callable[[int, int], BatchBackend] | None = None
    mask_rule: int = RULE_VERSION  # the mask rule its graph traced (an artifact's manifest says; torch: this one)

    @functools.cached_property
    def special_texts(self) -> tuple[str, ...]:
        """The tokenizer's special tokens as text (``<|im_start|>``, ``</s>``...): the tokenizer turns them into
        their ids wherever they appear, so a user's text must not hold them (see ChatSession)."""
        decoder = self.tokenizer.get_added_tokens_decoder()
        return tuple(sorted({t.content for t in decoder.values() if t.special and t.content}))

    @property
    def default_capacity(self) -> int:
        return min(self.max_positions, DEFAULT_KV_TOKENS, self.max_kv_tokens or DEFAULT_KV_TOKENS)

    def session(self, *, system: str | None = None, window: int | None = 3, sinks: int = 4,
                sampling: SamplingConfig | None = None, max_new_tokens: int = 256,
                max_kv_tokens: int | None = None, stop: tuple[str, ...] = (), auto_notes: bool = False) -> ChatSession:
        """Open a dialogue. ``window=None`` switches the turn window off (plain causal attention);
        ``stop`` adds stop strings to the chat format's; ``auto_notes`` pins the order numbers, phone numbers,
        addresses and e-mails of user messages (``ChatSession.pin`` for the rest)."""
        mask = MaskConfig(window=window, sinks=sinks) if window is not None else MaskConfig.off()
        return ChatSession(self, system=system, mask=mask, sampling=sampling, max_new_tokens=max_new_tokens,
                           max_kv_tokens=max_kv_tokens, stop=stop, auto_notes=auto_notes)

    def restore(self, path: str) -> ChatSession:
        """Reopen a session written by :meth:`ChatSession.save`."""
        return ChatSession.restore(self, path)
