"""Token sampling on numpy logits: greedy, temperature, top-k, top-p, repetition penalty, seed. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature=0`` is greedy. ``top_k=0`` and ``top_p=1`` switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0):
            raise InputError(f"sampling temperature: expected >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"sampling top_k: expected a whole number >= 0, got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise InputError(f"sampling top_p: expected a value in (0, 1], got {self.top_p!r}")
        if not (self.repetition_penalty > 0):
            raise InputError(f"sampling repetition_penalty: expected > 0, got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, context_ids: np.ndarray | None = None) -> int:
        """Pick the next token from (V,) logits; ``context_ids`` are the tokens the penalty applies to."""
        cfg = self.config
        logits = np.asarray(logits, dtype=np.float32)
        if cfg.repetition_penalty != 1.0 and context_ids is not None and len(context_ids):
            # as CTRL / transformers: make seen tokens less likely whatever the sign of their logit
            seen = np.unique(context_ids)
            seen = seen[seen < logits.shape[0]]
            logits = logits.copy()
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / cfg.repetition_penalty, vals * cfg.repetition_penalty)
        if cfg.greedy:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / cfg.temperature
        candidates = np.arange(scaled.shape[0])
        if cfg.top_k and cfg.top_k < scaled.shape[0]:
            candidates = np.argpartition(-scaled, cfg.top_k - 1)[:cfg.top_k]
        order = candidates[np.argsort(-scaled[candidates], kind="stable")]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            # keep the smallest head whose mass reaches top_p (always at least one token)
            keep = int(np.searchsorted(np.cumsum(probs), cfg.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
