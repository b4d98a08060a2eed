"""Pinned dialogue notes: short facts an app keeps visible to every later turn while the turn window lets the
rest of the dialogue scroll out (an order number given in turn 2 and asked about in turn 9). Torch-free.

How they follow the one mask definition (belle_edge/mask.py): the notes are one block of text whose tokens
carry **turn 0**, the system segment's turn, wherever in the sequence the block is placed. The rule keeps
every key of turn 0 visible to every later query (``t_k == 0``), and ``retained`` never evicts it, so neither
the attention (any backend, any kernel) nor the eviction needs a case of its own. Causality still holds: the
block is seen only by what comes after it.

Where the block goes: at the opening of the turn after the notes changed, between the close of the previous
reply and the new user message (on the first turn, after the system segment) — ``runtime/dialogue.py`` says
so for the session and the training collator alike. When the notes change again, the old block's tokens are
dropped from the cache and the whole block is placed anew: one block, so the format's per-message overhead
is paid once, and what the model reads is always the current set.

What the block looks like is the chat format's business (``note_text``): plain lines between two messages
where the record ends each message with a newline (ChatML: Qwen2; BELLE's formats), an exchange the assistant
acknowledges where each block opens with BOS (Llama-2).
"""
from __future__ import annotations

from ..errors import InputError
from ..mask import RULE_VERSION
from ..text_patterns import ADDRESS, ADDRESS_LEAD, EMAIL, ORDER_NUMBER, PHONE

MAX_NOTES = 16
MAX_NOTE_CHARS = 200  # per key + value: notes are facts, not documents (they stay in the cache for good)
# the rules of automatic notes: key -> (pattern, group holding the value)
RULES = {"订单号": (ORDER_NUMBER, "value"), "电话": (PHONE, 0), "地址": (ADDRESS, "value"), "邮箱": (EMAIL, 0)}


def refuse_older_mask_rule(model) -> None:
    """Notes need the rule's ``0 <=`` traced into the model's graph: an artifact compiled before it computes a
    notes block's own queries over the turns around it (its manifest's ``runtime.mask_rule`` says which)."""
    if model.mask_rule != RULE_VERSION:
        raise InputError(f"pinned notes: {model.name} was compiled with mask rule {model.mask_rule} and notes need "
                         f"rule {RULE_VERSION}; compile it again with --force")


def check_note(key, value) -> None:
    for name, text in (("key", key), ("value", value)):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"note {name}: expected a non-empty string, got {text!r}")
        if "\n" in text or "\r" in text:
            raise InputError(f"note {name}: one line expected, got {text[:40]!r}")
    if len(key) + len(value) > MAX_NOTE_CHARS:
        raise InputError(f"note {key[:20]!r}: {len(key) + len(value)} characters, at most {MAX_NOTE_CHARS}")


def notes_body(notes: dict[str, str]) -> str:
    """The text of the notes, one ``key：value`` per line ("" when there are none). No header: the keys say what
    each fact is, and every token of the block stays in the cache for good."""
    return "\n".join(f"{k}：{v}" for k, v in notes.items())


def with_found(notes: dict[str, str], message: str) -> dict[str, str]:
    """``notes`` with what the rules find in ``message`` added (or replacing a key's value): the notes a turn of
    a session with automatic notes opens with. ``notes`` itself when nothing new is found."""
    found = {k: v for k, v in notes_from_message(message).items()
             if notes.get(k) != v and len(k) + len(v) <= MAX_NOTE_CHARS}
    return {**notes, **found} if found else notes


def automatic_notes_by_turn(messages) -> dict[int, str]:
    """turn -> the notes body a session with automatic notes places at that turn's opening, for a dialogue of
    user ``messages`` (turn 1 first): what the training collator places to train as the runtime runs."""
    placed, notes, out = "", {}, {}
    for turn, message in enumerate(messages, start=1):
        notes = with_found(notes, message)
        if notes_body(notes) != placed:
            placed = out[turn] = notes_body(notes)
    return out


def notes_from_message(message: str) -> dict[str, str]:
    """Automatic notes: what the rules find in a user's message (the last match of each kind)."""
    found = {}
    for key, (pattern, group) in RULES.items():
        matches = list(pattern.finditer(message))
        if matches:
            value = matches[-1].group(group).strip()
            if pattern is ADDRESS:
                value = ADDRESS_LEAD.sub("", value)
            if value:
                found[key] = value
    return found
