"""Dialogues -> training rows: the runtime's tokenization, the runtime's turn-window mask, loss on replies only.
Shared by training (SFT, distillation) and evaluation (reply perplexity).

A dialogue is tokenized segment by segment exactly as ``ChatSession`` feeds it (runtime/dialogue.py:
system text in turn 0, then per turn k the user text, the reply and the reply's closing text, all in turn
k), so training sees the token boundaries inference will see. The loss covers the reply tokens and the first token of the close (the
end-of-turn token the model must learn to emit), nothing the user or the template wrote.

Several dialogues are packed into one row. Inside a dialogue the attention mask is ``mask.visible`` with the
session's window and sinks (the one definition); across dialogues nothing is visible. Positions restart at
0 for each dialogue, as they would in a fresh session.

Pinned notes (runtime/notes.py) go where a session places them — the notes segment of turn 0 at the opening
of the turn they changed — and, as in the session, a replaced block is hidden from every token after the
opening that replaced it (``dropped_at``: the one thing the mask rule does not say, since a session deletes
those keys). ``TrainConfig.notes = "rules"`` trains with the notes a session with automatic notes places.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..mask import MaskConfig, visible
from ..runtime.dialogue import dialogue_segments, encode
from ..runtime.notes import automatic_notes_by_turn


OPEN_ROWS = 64
NEVER = 2**62  # dropped_at of a token never dropped


@dataclass
class Example:
    """One tokenized dialogue."""
    ids: np.ndarray        # int64 (L,)
    turns: np.ndarray      # int64 (L,): 0 = system, k = turn k
    loss: np.ndarray       # bool (L,): this token is a target (a reply token or the end of a reply)
    dropped_at: np.ndarray | None = None  # int64 (L,): from this position on the token is gone (a replaced note)


@dataclass
class Row:
    """Packed dialogues: one training sequence."""
    ids: np.ndarray
    positions: np.ndarray
    turns: np.ndarray
    segments: np.ndarray   # which dialogue each token belongs to
    loss: np.ndarray
    dropped_at: np.ndarray | None = None

    def allowed(self, mask: MaskConfig) -> np.ndarray:
        """(T, T) bool: the turn-window mask within each dialogue, nothing across dialogues, no replaced note
        after its replacement."""
        p, t, s = self.positions, self.turns, self.segments
        allowed = visible(p[:, None], t[:, None], p[None, :], t[None, :], mask) & (s[:, None] == s[None, :])
        if self.dropped_at is not None:
            allowed &= p[:, None] < self.dropped_at[None, :]
        return allowed

    @property
    def targets(self) -> np.ndarray:
        """Next-token targets (T-1,), -100 where no loss is taken (PyTorch's ignore index)."""
        nxt = self.ids[1:].copy()
        keep = self.loss[1:] & (self.segments[1:] == self.segments[:-1])
        nxt[~keep] = -100
        return nxt


def training_notes(dialogue, config) -> dict[int, str] | None:
    """The notes a session places in ``dialogue`` under ``config.notes`` (None: no notes)."""
    if getattr(config, "notes", "none") != "rules":
        return None
    return automatic_notes_by_turn([t.user for t in dialogue.turns])


def encode_dialogue(dialogue, tokenizer, chat_format, *, prompt_for: int | None = None,
                    notes: dict[int, str] | None = None) -> Example:
    """The whole dialogue; with ``prompt_for=k``, the prompt of turn k instead: turns before it with their
    reference replies, then turn k's user text (what a session holds when the model starts replying).
    ``notes``: turn -> the notes body placed at that turn's opening ("" removes the notes there), as a
    session's history says (``automatic_notes_by_turn`` for automatic notes)."""
    notes = notes or {}
    segments = dialogue_segments(chat_format, dialogue.system, [(t.user, t.assistant) for t in dialogue.turns],
                                 prompt_for=prompt_for, notes=notes)
    ids, turns, loss, drops = [], [], [], []
    at, users, opening, block = 0, 0, False, None
    for piece, seg in encode(tokenizer, segments, specials_first=chat_format.add_special_tokens_first):
        start, at = at, at + len(piece)
        if seg.role in ("note", "user") and not opening:  # turn users+1 opens: a change of notes drops the old
            opening = True
            if users + 1 in notes and block is not None:
                drops.append((*block, start))
                block = None
        if seg.role == "note":
            block = (start, at)
        elif seg.role == "user":
            users, opening = users + 1, False
        target = np.zeros(len(piece), dtype=bool)
        if seg.role == "reply":
            target[:] = True
        elif seg.role == "close" and len(piece):
            target[0] = True  # the model learns to close its reply; the rest of the close is template
        ids.append(piece)
        turns.append(np.full(len(piece), seg.turn, dtype=np.int64))
        loss.append(target)
    dropped_at = np.full(at, NEVER, dtype=np.int64)
    for a, b, when in drops:
        dropped_at[a:b] = when
    return Example(np.concatenate(ids), np.concatenate(turns), np.concatenate(loss), dropped_at)


def pack(examples: list[Example], max_len: int) -> tuple[list[Row], int]:
    """Greedy first-fit packing in the given order over the last ``OPEN_ROWS`` rows (linear time on millions
    of dialogues); returns (rows, dialogues dropped for exceeding max_len)."""
    rows: list[list[Example]] = []
    sizes: list[int] = []
    dropped = 0
    for ex in examples:
        if len(ex.ids) > max_len or not ex.loss.any():
            dropped += 1
            continue
        for r in range(max(0, len(sizes) - OPEN_ROWS), len(sizes)):
            if sizes[r] + len(ex.ids) <= max_len:
                rows[r].append(ex)
                sizes[r] += len(ex.ids)
                break
        else:
            rows.append([ex])
            sizes.append(len(ex.ids))
    return [_row(r) for r in rows], dropped


def _row(examples: list[Example]) -> Row:
    cat = np.concatenate
    return Row(ids=cat([e.ids for e in examples]), positions=cat([np.arange(len(e.ids)) for e in examples]),
               turns=cat([e.turns for e in examples]),
               segments=cat([np.full(len(e.ids), i) for i, e in enumerate(examples)]),
               loss=cat([e.loss for e in examples]),
               dropped_at=cat([e.dropped_at if e.dropped_at is not None else np.full(len(e.ids), NEVER, np.int64)
                               for e in examples]))


class ReplyLoss:
    """Summed cross-entropy of the next token wherever the row marks a target (reply tokens)."""

    def __init__(self, mask: MaskConfig):
        self.mask = mask

    @staticmethod
    def count(row: Row) -> int:
        return int((row.targets != -100).sum())

    def logits(self, model, row: Row, allowed: torch.Tensor | None = None) -> torch.Tensor:
        if allowed is None:
            allowed = torch.from_numpy(row.allowed(self.mask))
        return model(torch.from_numpy(row.ids)[None], row.positions, row.turns, self.mask, allowed=allowed)[0]

    def __call__(self, model, row: Row):
        targets = torch.from_numpy(row.targets)
        loss = F.cross_entropy(self.logits(model, row)[:-1].float(), targets, ignore_index=-100, reduction="sum")
        return loss, self.count(row)
