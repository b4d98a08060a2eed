"""Dialogues -> training rows: the runtime's tokenization, the runtime's turn-window mask, loss on replies only.
Shared by training (SFT, distillation) and evaluation (reply perplexity).

A dialogue is tokenized segment by segment exactly as ``ChatSession`` feeds it (system text in turn 0, then
per turn k the user text, the reply and the reply's closing text, all in turn k), so training sees the
token boundaries inference will see. The loss covers the reply tokens and the first token of the close (the
end-of-turn token the model must learn to emit), nothing the user or the template wrote.

Several dialogues are packed into one row. Inside a dialogue the attention mask is ``mask.visible`` with the
session's window and sinks (the one definition); across dialogues nothing is visible. Positions restart at
0 for each dialogue, as they would in a fresh session.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..mask import MaskConfig, visible


OPEN_ROWS = 64


@dataclass
class Example:
    """One tokenized dialogue."""
    ids: np.ndarray        # int64 (L,)
    turns: np.ndarray      # int64 (L,): 0 = system, k = turn k
    loss: np.ndarray       # bool (L,): this token is a target (a reply token or the end of a reply)


@dataclass
class Row:
    """Packed dialogues: one training sequence."""
    ids: np.ndarray
    positions: np.ndarray
    turns: np.ndarray
    segments: np.ndarray   # which dialogue each token belongs to
    loss: np.ndarray

    def allowed(self, mask: MaskConfig) -> np.ndarray:
        """(T, T) bool: the turn-window mask within each dialogue, nothing across dialogues."""
        p, t, s = self.positions, self.turns, self.segments
        return visible(p[:, None], t[:, None], p[None, :], t[None, :], mask) & (s[:, None] == s[None, :])

    @property
    def targets(self) -> np.ndarray:
        """Next-token targets (T-1,), -100 where no loss is taken (PyTorch's ignore index)."""
        nxt = self.ids[1:].copy()
        keep = self.loss[1:] & (self.segments[1:] == self.segments[:-1])
        nxt[~keep] = -100
        return nxt


def encode_dialogue(dialogue, tokenizer, chat_format, *, prompt_for: int | None = None) -> Example:
    """The whole dialogue; with ``prompt_for=k``, the prompt of turn k instead: turns before it with their
    reference replies, then turn k's user text (what a session holds when the model starts replying)."""
    fmt = chat_format
    ids, turns, loss = [], [], []

    def add(text: str, turn: int, target: bool, specials: bool = False, first_only: bool = False):
        if not text:
            return
        piece = tokenizer.encode(text, add_special_tokens=specials).ids
        for j, i in enumerate(piece):
            ids.append(i)
            turns.append(turn)
            loss.append(target and (not first_only or j == 0))

    specials = getattr(fmt, "add_special_tokens_first", False)
    system_text = fmt.system_text(dialogue.system)
    add(system_text, 0, False, specials)
    for k, turn in enumerate(dialogue.turns, start=1):
        user = fmt.first_turn_text(dialogue.system, turn.user) if k == 1 else fmt.turn_text(turn.user)
        add(user, k, False, specials and not ids)
        if k == prompt_for:
            break
        add(turn.assistant, k, True)
        add(fmt.reply_end, k, True, first_only=True)  # the model learns to close its reply; the rest is template
    return Example(np.asarray(ids, np.int64), np.asarray(turns, np.int64), np.asarray(loss, bool))


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
               loss=cat([e.loss for e in examples]))


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
