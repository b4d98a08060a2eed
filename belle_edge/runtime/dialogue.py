"""A dialogue cut into the segments a session feeds, turn by turn — the one place that says how; the
session (runtime/session.py) and the training collator (core/rows.py) both use it, so training sees the
token boundaries inference sees. Torch-free.

A turn k opens with two or three segments, then has the reply and its close::

    turn 1:  system_text (turn 0) │ [notes (turn 0)] │ first_turn_text (turn 1)           ← opening_segments
    turn k:  close of reply k-1 (turn k-1) │ [notes (turn 0)] │ turn_text (turn k)         ← opening_segments
             reply (turn k) │ reply_end (turn k)

The notes segment (runtime/notes.py) is there only at a turn where pinned notes were placed (anew).

Each segment is tokenized on its own (``encode``), the tokenizer's special tokens (BOS) only for the
first non-empty one of the dialogue, as a format that wants them asks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

ROLES = ("system", "note", "user", "reply", "close")


@dataclass(frozen=True)
class Segment:
    text: str
    turn: int
    role: str  # "system" | "note" | "user" | "reply" | "close" (the text that ends a reply in the record)


def opening_segments(fmt, system: str | None, message: str, turn: int, *, close: str = "",
                     notes: str = "") -> list[Segment]:
    """What a session prefills when the user's message of ``turn`` arrives: on the first turn the system
    segment and the first user block; later the close of the previous reply (``close``) and the user block.
    ``notes``: the body of pinned notes placed at this turn (``fmt.note_text`` writes it; turn 0)."""
    note = [Segment(fmt.note_text(notes), 0, "note")] if notes else []
    if turn == 1:
        return [Segment(fmt.system_text(system), 0, "system"), *note,
                Segment(fmt.first_turn_text(system, message), 1, "user")]
    return [Segment(close, turn - 1, "close"), *note, Segment(fmt.turn_text(message), turn, "user")]


def dialogue_segments(fmt, system: str | None, turns: Iterable[tuple[str, str]], *,
                      prompt_for: int | None = None, notes: dict[int, str] | None = None) -> list[Segment]:
    """A whole dialogue of (user, reply) turns as a session would hold it had it been told each reply; with
    ``prompt_for=k``, only up to turn k's user block (what a session holds when the model starts replying).
    ``notes``: turn -> the body of the notes placed at that turn's opening (a session that was pinned to)."""
    segments: list[Segment] = []
    notes = notes or {}
    for k, (user, reply) in enumerate(turns, start=1):
        opening = opening_segments(fmt, system, user, k, close=fmt.reply_end, notes=notes.get(k, ""))
        segments += opening if k == 1 else opening[1:]  # the previous reply's close is already there
        if k == prompt_for:
            break
        segments += [Segment(reply, k, "reply"), Segment(fmt.reply_end, k, "close")]
    return segments


def encode(tokenizer, segments: Iterable[Segment], *, specials_first: bool) -> list[tuple[np.ndarray, Segment]]:
    """Token ids of each segment (int64); the tokenizer's special tokens go with the first non-empty
    segment only, and only when ``specials_first`` (a format whose template writes its own BOS says no)."""
    out = []
    specials = specials_first
    for seg in segments:
        ids = tokenizer.encode(seg.text, add_special_tokens=specials).ids if seg.text else []
        specials = specials and not ids  # the tokenizer's BOS rule applies to the first text only
        out.append((np.asarray(ids, dtype=np.int64), seg))
    return out
