"""The dynamic mask (turn window): the one definition everything else follows.

Every token has an absolute position ``p`` and a turn ``t``. Turn 0 is the system segment (may be empty);
turn k >= 1 is one user message plus the assistant's reply. A query ``(p_q, t_q)`` may attend a key
``(p_k, t_k)`` iff::

    p_k <= p_q  and  (t_k == 0  or  p_k < S  or  0 <= t_q - t_k <= W)

with ``W`` context turns (default 3) and ``S`` sink tokens (default 4). ``W = None`` switches the window off
(``t_q - t_k <= W`` always holds): plain causal attention, exactly the original model.

``0 <=``: a query never sees a key of a later turn. In a dialogue the turns only grow along the positions, so
for every sequence without pinned notes this changes nothing, window on or off. Pinned notes
(runtime/notes.py) are turn-0 tokens placed mid-dialogue: their keys stay visible to everything after them
(``t_k == 0``) and are never evicted, and their queries read the system segment, the sinks and earlier notes
only — not the turns around them, which eviction may already have dropped — so what a session computes for a
notes block is what one full forward under this rule computes, wherever the block sits.

The functions below use only comparison and boolean operators, so the same code runs on numpy arrays (the
runtime, which must not import torch) and on torch tensors (the reference attention, the training collator),
with ordinary broadcasting. Nothing else in the project may restate the rule: the KV-cache eviction asks
:func:`retained`, the models ask :func:`visible`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

#: Which statement of the rule above a compiled graph traced (artifacts record it: manifest ``runtime.mask_rule``).
#: 1: before ``0 <=``, when a notes block's own queries saw the turns around it; 2: as written above. The two
#: agree on every sequence without pinned notes, so only notes ask for 2 (runtime/session.py).
RULE_VERSION = 2
#: A query position larger than any real one: "some query of this turn or a later one".
FUTURE_POSITION = 2**62
#: Where the window is a number (an ONNX graph input, a kernel argument), this one means "off": no dialogue
#: has that many turns, so the rule reduces to plain causal attention.
WINDOW_OFF = 2**62


@dataclass(frozen=True)
class MaskConfig:
    """Turn-window settings. ``window=None`` is plain causal attention (the mask off)."""

    window: int | None = 3
    sinks: int = 4

    def __post_init__(self):
        if self.window is not None and (not isinstance(self.window, int) or self.window < 0):
            raise InputError(f"mask window: expected a whole number >= 0 or None (off), got {self.window!r}")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise InputError(f"mask sinks: expected a whole number >= 0, got {self.sinks!r}")

    @property
    def enabled(self) -> bool:
        return self.window is not None

    @classmethod
    def off(cls) -> "MaskConfig":
        return cls(window=None, sinks=0)


def visible(q_pos, q_turn, k_pos, k_turn, mask: MaskConfig):
    """Whether each query may attend each key (broadcasting). Arrays of numpy or torch, same kind for all.

    Typical use: ``visible(qp[:, None], qt[:, None], kp[None, :], kt[None, :], mask)`` -> (Q, K) booleans.
    """
    causal = k_pos <= q_pos
    seen = k_turn <= q_turn  # never a later turn's key: true of every key before a query, but for pinned notes
    if mask.window is not None:
        seen = seen & (q_turn - k_turn <= mask.window)
    return causal & ((k_turn == 0) | (k_pos < mask.sinks) | seen)


def retained(k_pos, k_turn, current_turn: int, mask: MaskConfig):
    """Which cached keys some query of ``current_turn`` or a later turn can still see.

    A key outside the window of the current turn is outside every later window too, so the rest may be
    evicted for good. Asked of :func:`visible` with a query from the far future of the current turn.
    """
    return visible(FUTURE_POSITION, current_turn, k_pos, k_turn, mask)
