"""``ChatSession``: dialogue state over one backend. Torch-free.

One turn, step by step::

    message --format--> text of the new turn (+ the close of the previous reply, not yet in the cache)
            --tokenize--> new tokens, each with (position, turn)
            --evict-->    drop cached turns that left the window (mask.retained)
            --shift?-->   if positions would pass the model's limit, re-prefill what is kept at 0..n-1
            --prefill-->  only the new tokens (prefix reuse: the cache already holds the rest)
            --decode-->   sample, stream whole characters, stop on EOS / stop strings / limits (decode.py)
            --settle-->   roll the cache back to a clean text boundary, remember the unfed tail

The turn's text comes from runtime/dialogue.py, which the training collator uses too. ``add_turn`` feeds
an exchange whose reply is known (an earlier conversation, a reference reply) without generating.

Pinned notes (``pin``/``unpin``, runtime/notes.py) are facts that stay visible to every later turn: their
block carries turn 0, so the mask keeps it and eviction never drops it. A change of the notes is placed at the
opening of the next turn; the block it replaces is dropped from the cache then.

Consistency: the ledger always says what the cache *should* hold; ``_valid`` says how many of its leading
slots the backend really holds (never more than its ``n``). A forward call appends to the ledger only after
it returned; work that rewrites the backend's cache (eviction, a context shift) first drops ``_valid``, so if
it is interrupted (Ctrl-C, a closed stream) the next call cuts the backend back to ``_valid`` and
re-prefills the rest of the ledger. A turn that fails before its
prompt is in leaves the dialogue as it was; one interrupted while decoding keeps the reply so far.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import zipfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import ContextFullError, InputError, SessionFileError, first_line
from ..mask import MaskConfig, retained
from .decode import Decoding
from .detokenizer import IncrementalDetokenizer
from .dialogue import Segment, dialogue_segments, encode, opening_segments
from .kv_cache import CacheLedger
from .notes import MAX_NOTES, check_note, notes_body, refuse_older_mask_rule, with_found
from .sampler import Sampler, SamplingConfig

SESSION_FILE_VERSION = 1


@dataclass
class TurnStats:
    turn: int
    prompt_tokens: int  # tokens prefilled for this turn: only the new ones
    new_tokens: int  # tokens the model generated (the EOS that ended the reply not counted)
    ttft_ms: float  # from the message to the first generated token
    prefill_tok_s: float
    decode_tok_s: float
    kv_tokens: int  # tokens held in the KV cache after the turn
    evicted_tokens: int  # tokens dropped at the start of this turn (left the window)
    context_shift: bool
    finish_reason: str  # eos | stop | length | context | interrupted
    total_ms: float


@dataclass
class Reply:
    text: str
    stats: TurnStats


class ChatSession:
    """``model``: what runtime/model.py's ChatModel provides — tokenizer, chat_format, stop_token_ids,
    max_positions, fingerprint, default_capacity and backend_factory(capacity)."""

    def __init__(self, model, *, system: str | None = None, mask: MaskConfig | None = None,
                 sampling: SamplingConfig | None = None, max_new_tokens: int = 256,
                 max_kv_tokens: int | None = None, stop: tuple[str, ...] = (), prefill_chunk: int = 512,
                 backend=None, auto_notes: bool = False):
        """``backend``: one made for this session (the batched engine's slot of a shared pool); by default
        the model's factory makes one. ``auto_notes``: pin what the rules of runtime/notes.py find in each user
        message (order numbers, phone numbers, addresses, e-mails)."""
        self.model = model
        self.system = system or None
        self.mask = mask or MaskConfig()
        self.prefill_chunk = prefill_chunk
        self.auto_notes = bool(auto_notes)
        if self.auto_notes:
            refuse_older_mask_rule(model)
        capacity = max_kv_tokens or (backend.capacity if backend is not None else model.default_capacity)
        if capacity < 2:
            raise InputError(f"max_kv_tokens: expected >= 2, got {capacity}")
        self.backend = backend if backend is not None else model.backend_factory(capacity)
        self.ledger = CacheLedger(capacity)
        self._fmt = model.chat_format
        if self.system:
            refuse_special_tokens(model, self.system, "system prompt")
        self.configure(sampling=sampling, max_new_tokens=max_new_tokens, stop=stop)
        self._active = None  # the reply iterator in flight, if any
        self._epoch = 0  # bumped by reset(): a stale reply iterator must not touch the new dialogue
        self._clear()

    def _clear(self) -> None:
        self.ledger.truncate(0)
        self._valid = 0  # leading ledger slots the backend really holds
        self.turn = 0  # number of the last turn taken (0: none yet)
        self.history: list[dict] = []  # {"user": ..., "reply": ...}
        self.stats: list[TurnStats] = []
        self._opened = False  # the system segment (turn 0) is in the cache
        self._pending = ""  # close of the last reply (unfed tail + reply_end), prefilled with the next turn
        self._shifts = 0  # context shifts so far
        self.notes: dict[str, str] = {}  # pinned notes (pin / unpin); placed at the next turn's opening
        self._notes_placed = ""  # the body of the notes block in the cache ("" none)
        self._note_span: tuple[int, int] | None = None  # (first position, tokens) of that block

    # ---------------------------------------------------------------- public API
    def configure(self, *, sampling: SamplingConfig | None = None, max_new_tokens: int = 256,
                  stop: tuple[str, ...] = ()) -> None:
        """How the next replies are generated: sampling (its seed restarts the random stream), length
        limit, extra stop strings beyond the chat format's. The dialogue is untouched."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected a whole number >= 1, got {max_new_tokens!r}")
        self.sampling = sampling or SamplingConfig()
        self.sampler = Sampler(self.sampling)
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(stop)  # extra stop strings, beyond the chat format's
        self._stops = tuple(self._fmt.stop_strings) + self.stop

    def reset(self) -> None:
        """Forget the dialogue (the system prompt and settings stay)."""
        self._close_active()
        self._epoch += 1
        self._clear()

    def stop_reply(self) -> None:
        """End the reply in flight, if one is half-read (a stream left after Ctrl-C): what it produced so far
        stays in the dialogue and its stats are recorded now rather than at the next turn."""
        self._close_active()

    @property
    def last_stats(self) -> TurnStats | None:
        return self.stats[-1] if self.stats else None

    @property
    def kv_tokens(self) -> int:
        return self.ledger.n

    @property
    def note_tokens(self) -> int:
        """Tokens the notes block holds in the cache."""
        return self._note_span[1] if self._note_span else 0

    def pin(self, key: str, value: str) -> None:
        """Keep ``key: value`` visible to every later turn (replacing an earlier note of that key); it enters
        the cache with the next turn."""
        self.check_notes(self.model, {key: value})
        if key not in self.notes and len(self.notes) >= MAX_NOTES:
            raise InputError(f"note {key!r}: {MAX_NOTES} notes already pinned; unpin one first")
        self.notes[key] = value

    def unpin(self, key: str) -> None:
        """Forget the note ``key``; its tokens leave the cache at the next turn."""
        if key not in self.notes:
            raise InputError(f"note {key!r}: not pinned (pinned: {', '.join(self.notes) or 'none'})")
        del self.notes[key]

    def set_notes(self, notes: dict[str, str]) -> None:
        """Make ``notes`` the pinned notes, all or none of them (each checked as ``pin`` checks it)."""
        self.check_notes(self.model, notes)
        self.notes = dict(notes)

    @staticmethod
    def check_notes(model, notes) -> None:
        """What ``pin`` and ``set_notes`` (and the engine, for a request's notes) refuse before anything changes."""
        if not isinstance(notes, dict) or len(notes) > MAX_NOTES:
            raise InputError(f"notes: expected an object of at most {MAX_NOTES} key: value strings")
        if notes:
            refuse_older_mask_rule(model)
        for key, value in notes.items():
            check_note(key, value)
            refuse_special_tokens(model, key + value, "note")

    def send(self, message: str) -> Reply:
        text = "".join(self.stream(message))
        return Reply(text, self.last_stats)

    def stream(self, message: str) -> Iterator[str]:
        """Check and plan the turn now (errors raise here, the session untouched); the returned iterator
        prefills and yields the reply's text in whole characters."""
        t0 = time.perf_counter()
        self._close_active()  # a reply left half-read ends here, settled, before the next turn is planned
        if not isinstance(message, str) or not message.strip():
            raise InputError("message is empty")
        refuse_special_tokens(self.model, message, "message")
        turn, notes, close, new, kept = self._plan_turn(message)
        if kept + len(new[0]) + 1 > self._room:
            self._refuse(kept, len(new[0]), self._room)
        self._active = self._run_turn(t0, turn, message, close, new, notes)
        return self._active

    # ---------------------------------------------------------------- planning
    @property
    def _room(self) -> int:
        return min(self.ledger.capacity, self.model.max_positions)

    def _plan_turn(self, message: str):
        """(turn, the notes it opens with, close, new, tokens kept) for the next turn; nothing changes yet. The
        notes are the session's, with the automatic ones of ``message`` added."""
        turn = self.turn + 1
        notes = with_found(self.notes, message) if self.auto_notes else self.notes
        body = notes_body(notes)
        replaces = body != self._notes_placed
        close, new = self._tokenize_turn(turn, message, body if replaces else "")
        return turn, notes, close, new, self._kept_after(turn, close, drop_notes=replaces)

    def _kept_after(self, turn: int, close, *, drop_notes: bool) -> int:
        """Tokens the cache will hold once the new turn is in: everything a query of ``turn`` can still see,
        less the notes block when the turn replaces it."""
        start = self.ledger.next_position
        positions = np.concatenate([self.ledger.positions, np.arange(start, start + len(close[0]))])
        turns = np.concatenate([self.ledger.turns, close[1]])
        kept = retained(positions, turns, turn, self.mask) if self.mask.enabled else np.ones(len(positions), bool)
        if drop_notes:
            kept &= ~self._in_note_span(positions)
        return int(kept.sum())

    def _in_note_span(self, positions: np.ndarray) -> np.ndarray:
        if self._note_span is None:
            return np.zeros(len(positions), dtype=bool)
        first, count = self._note_span
        return (positions >= first) & (positions < first + count)

    def _close_active(self) -> None:
        if self._active is not None:
            active, self._active = self._active, None
            active.close()

    def _tokenize_turn(self, turn: int, message: str, notes_block: str):
        """Two groups of (ids, turns): what closes the previous turn (or the system segment, on the first
        turn), and the new turn up to the assistant's reply, led by ``notes_block`` (the body of notes placed
        anew; "" none) (runtime/dialogue.py)."""
        segments = opening_segments(self._fmt, self.system, message, turn, close=self._pending, notes=notes_block)
        if turn == 1 and self._opened:  # an interrupted first turn already fed the system segment
            segments[0] = Segment("", 0, "system")
        specials = not self._opened and self._fmt.add_special_tokens_first
        pieces = [(ids, np.full(len(ids), seg.turn, dtype=np.int64))
                  for ids, seg in encode(self.model.tokenizer, segments, specials_first=specials)]
        return pieces[0], tuple(np.concatenate(group) for group in zip(*pieces[1:]))

    def _refuse(self, kept: int, new: int, room: int):
        if not self.mask.enabled and kept:
            raise ContextFullError(
                f"the context is full: {kept} tokens held + {new} new > {room} (window off keeps every turn); "
                "/reset, or turn the window on")
        raise InputError(
            f"message too long: the turn is {new} tokens and the dialogue keeps {kept}, but the context holds "
            f"{room} (max_kv_tokens / the model's positions); shorten the message")

    # ---------------------------------------------------------------- running
    def _run_turn(self, t0, turn, message, close, new, notes) -> Iterator[str]:
        epoch, shifts, t_prefill = self._epoch, self._shifts, time.perf_counter()
        evicted, logits = self._open_turn(turn, message, close, new, notes)
        stats = TurnStats(turn=turn, prompt_tokens=len(close[0]) + len(new[0]), new_tokens=0, ttft_ms=0.0,
                          prefill_tok_s=0.0, decode_tok_s=0.0, kv_tokens=0, evicted_tokens=evicted,
                          context_shift=False, finish_reason="interrupted", total_ms=0.0)
        decoding = Decoding(self.model.tokenizer, self.sampler, stop_token_ids=self.model.stop_token_ids,
                            stop_strings=self._stops, max_new_tokens=self.max_new_tokens)
        decode_start = self.ledger.n  # generated tokens are the ledger's slots from here on
        reply = ""
        try:
            yield from decoding.run(logits, lambda token: self._step(token, turn), self._penalty_context)
        finally:
            # every exit, Ctrl-C and a closed stream included, leaves a consistent session
            if epoch == self._epoch:
                reply = self._settle(decoding.detok, self.ledger.n - decode_start, decoding.stop_at)
                self.stats.append(self._turn_stats(stats, decoding, t0, t_prefill, shifts))
        if decoding.emitted < len(reply):
            yield reply[decoding.emitted:]

    def _open_turn(self, turn, message, close, new, notes) -> tuple[int, np.ndarray]:
        """Prefill the close of the previous reply, the notes block if the notes changed, and the new turn;
        the turn is part of the dialogue from here on. Returns (tokens evicted, the logits that start the
        reply)."""
        # The close of the previous reply belongs to that turn, so it is computed while that turn's window is
        # still in the cache (exactly as a full forward would see it) — when it fits without evicting or
        # shifting; otherwise the old turns go first.
        fits = (self.ledger.n + len(close[0]) + 1 <= self._room
                and self.ledger.next_position + len(close[0]) + 1 <= self.model.max_positions)
        if fits:
            self._append_close(close)
        body = notes_body(notes)
        replaced = body != self._notes_placed
        evicted = self._evict(turn, drop_notes=replaced)
        if not fits:
            self._append_close(close)
        at = self.ledger.n
        logits = self._append(*new)
        self.turn = turn
        self.history.append({"user": message, "reply": ""})
        self.notes = dict(notes)
        if replaced:
            count = int((new[1] == 0).sum())  # the block leads the new tokens; a user block is never turn 0
            self._note_span = (int(self.ledger.positions[at]), count) if count else None
            self._notes_placed = body
            if body:
                self.history[-1]["notes"] = body
        return evicted, logits

    def _step(self, token: int, turn: int) -> np.ndarray | None:
        """Feed a generated token; None when the context has no room for it."""
        if not self._room_for_one():
            return None
        return self._append(np.array([token]), np.array([turn]))

    def _penalty_context(self) -> np.ndarray | None:
        return self.ledger.ids if self.sampling.repetition_penalty != 1.0 else None

    def _turn_stats(self, stats: TurnStats, decoding: Decoding, t0: float, t_prefill: float, shifts: int) -> TurnStats:
        stats.new_tokens, stats.finish_reason = decoding.new_tokens, decoding.finish_reason
        if decoding.t_first is not None:
            stats.ttft_ms = (decoding.t_first - t0) * 1e3
            stats.prefill_tok_s = stats.prompt_tokens / max(decoding.t_first - t_prefill, 1e-9)
            stats.decode_tok_s = decoding.decode_tok_s
        stats.kv_tokens = self.ledger.n
        stats.context_shift = self._shifts > shifts
        stats.total_ms = (time.perf_counter() - t0) * 1e3
        return stats

    def add_turn(self, message: str, reply: str) -> None:
        """Feed an exchange whose reply is known — an earlier conversation, a reference reply — as if the
        model had said it: prefilled, not generated, no stats. The reply's close goes in with the next turn,
        exactly as after a generated reply."""
        self._close_active()
        if not isinstance(message, str) or not message.strip():
            raise InputError("message is empty")
        turn, notes, close, new, kept = self._plan_turn(message)
        ((ids, seg),) = encode(self.model.tokenizer, [Segment(reply, turn, "reply")], specials_first=False)
        if kept + len(new[0]) + len(ids) + 1 > self._room:
            self._refuse(kept, len(new[0]) + len(ids), self._room)
        self._open_turn(turn, message, close, new, notes)
        self._append(ids, np.full(len(ids), turn, dtype=np.int64))
        self._pending = self._fmt.reply_end
        self.history[-1]["reply"] = reply

    def realign(self) -> int | None:
        """Make the cache hold exactly what a fresh session told this history (``add_turn`` for each turn)
        would hold, keeping the longest prefix it already has; returns the tokens kept (None: nothing can be
        kept — a context shift renumbered the positions, or the difference lies where turns were evicted).

        Why: a reply generated token by token may be cut into other tokens when its text is tokenized again,
        and a reply that ended at a limit holds its last token back; a client that sends the conversation
        back as text (the HTTP API) must get what a re-prefill of that text gives. Eviction keeps positions,
        so cache and re-prefill are compared position by position."""
        self._close_active()
        if self._shifts or not self.history:
            return None
        segments = dialogue_segments(self._fmt, self.system, [(h["user"], h["reply"]) for h in self.history],
                                     notes={k: h["notes"] for k, h in enumerate(self.history, 1) if "notes" in h})
        pieces = encode(self.model.tokenizer, segments[:-1],  # the last reply's close comes with the next turn
                        specials_first=self._fmt.add_special_tokens_first)
        ids = np.concatenate([p[0] for p in pieces])
        turns = np.concatenate([np.full(len(p[0]), p[1].turn, dtype=np.int64) for p in pieces])
        held, positions = self.ledger.ids, self.ledger.positions
        same = (positions < len(ids)) & (ids[np.minimum(positions, len(ids) - 1)] == held)
        keep = int(np.argmin(same)) if not same.all() else len(same)  # slots before the first difference
        start = int(positions[keep - 1]) + 1 if keep else 0
        if keep < len(positions) and int(positions[keep]) != start:
            return None  # the difference follows an evicted gap: rebuild instead
        self.ledger.truncate(keep)
        self._valid = min(self._valid, keep)
        self._append(ids[start:], turns[start:])
        self._pending, self._opened = self._fmt.reply_end, True
        return keep

    def _append_close(self, close) -> None:
        self._append(*close)
        self._pending = ""
        self._opened = True

    def _append(self, ids: np.ndarray, turns: np.ndarray) -> np.ndarray | None:
        """Prefill tokens at the next positions (shifting first if they would pass the model's limit) and
        return the last one's logits. If interrupted, the tokens were simply never added."""
        if not len(ids):
            return None
        if self.ledger.next_position + len(ids) + 1 > self.model.max_positions:
            self._context_shift()
        self._sync()
        start = self.ledger.next_position
        return self._prefill(ids, np.arange(start, start + len(ids), dtype=np.int64), turns)

    def _prefill(self, ids, positions, turns) -> np.ndarray:
        """Run tokens through the backend in chunks after the slots it holds; the ledger grows per chunk."""
        assert self._valid == self.ledger.n == self.backend.n
        logits = None
        for a in range(0, len(ids), self.prefill_chunk):
            b = min(a + self.prefill_chunk, len(ids))
            logits = self.backend.forward(ids[a:b], positions[a:b], turns[a:b], mask=self.mask)
            self.ledger.append(ids[a:b], positions[a:b], turns[a:b])
            self._valid = self.ledger.n
        return logits

    def _sync(self) -> None:
        """Bring the backend to the ledger: cut it back to the slots it really holds (``_valid``: after a
        rolled-back reply, an interrupted eviction or context shift) and re-prefill the rest, leaving the
        ledger as it is. Keys it evicted are gone for good: this recomputes, it does not restore."""
        held = min(self._valid, self.backend.n)
        if self.backend.n != held:
            self.backend.truncate(held)
        self._valid = held
        ids, positions, turns = self.ledger.ids, self.ledger.positions, self.ledger.turns
        while self._valid < self.ledger.n:
            a = self._valid
            b = min(a + self.prefill_chunk, self.ledger.n)
            self.backend.forward(ids[a:b], positions[a:b], turns[a:b], mask=self.mask)
            self._valid = b

    def _evict(self, turn: int, *, drop_notes: bool = False) -> int:
        """Compact the cache to what ``turn`` can still see (and, with ``drop_notes``, without the notes block,
        which the turn replaces); returns the tokens dropped."""
        if not self.mask.enabled and not (drop_notes and self._note_span):
            return 0
        keep = self.ledger.keep_slots(turn, self.mask) if self.mask.enabled else np.arange(self.ledger.n)
        if drop_notes:
            keep = keep[~self._in_note_span(self.ledger.positions[keep])]
        evicted = self.ledger.n - len(keep)
        if evicted:
            self._sync()  # compact what the backend really holds: the ledger's slots, all of them
            self._valid = 0  # the backend's copy is in flux until both sides are compacted
            self.backend.keep(keep)
            self.ledger.keep(keep)
            self._valid = self.ledger.n
        if drop_notes:  # the cache holds no block now, whatever happens to the rest of the turn
            self._note_span, self._notes_placed = None, ""
        return evicted

    def _room_for_one(self) -> bool:
        if self.ledger.free < 1:
            return False
        if self.ledger.next_position < self.model.max_positions:
            return True
        if self.ledger.n < self.model.max_positions:  # positions have gaps (evicted turns): close them
            self._context_shift()
            return True
        return False

    def _context_shift(self) -> None:
        """Re-prefill the kept tokens at fresh positions 0..n-1 (positions stay absolute, never truncated)."""
        self._valid = 0
        if self._note_span is not None:  # the block keeps its slots; their positions become the slot numbers
            first = int(np.searchsorted(self.ledger.positions, self._note_span[0]))
            self._note_span = (first, self._note_span[1])
        self.ledger.reposition()
        self._shifts += 1
        self._sync()

    def _settle(self, detok: IncrementalDetokenizer, fed: int, stop_at: int) -> str:
        """Fix the reply's text and roll the cache back to the last clean text boundary within it."""
        limit = len(detok.text)
        if stop_at >= 0:  # what precedes a stop string is the reply; its trailing blank lines are not
            limit = len(detok.text[:stop_at].rstrip())
        reply = detok.text[:limit]
        tokens, chars = detok.boundary(fed, limit)
        self.ledger.truncate(self.ledger.n - (fed - tokens))
        self._valid = min(self._valid, self.ledger.n)
        self._pending = reply[chars:] + self._fmt.reply_end
        self.history[-1]["reply"] = reply
        return reply

    # ---------------------------------------------------------------- save / restore
    def save(self, path: str) -> None:
        """Write the whole session (KV included, so a restore continues exactly) to ``path`` (.npz)."""
        self._close_active()
        self._sync()
        meta = {
            "version": SESSION_FILE_VERSION, "fingerprint": self.model.fingerprint, "system": self.system,
            "mask": dataclasses.asdict(self.mask), "sampling": dataclasses.asdict(self.sampling),
            "max_new_tokens": self.max_new_tokens, "capacity": self.ledger.capacity, "stop": list(self.stop),
            "turn": self.turn, "opened": self._opened, "history": self.history, "pending": self._pending,
            "sampler_state": self.sampler.state(), "stats": [dataclasses.asdict(s) for s in self.stats],
            "notes": self.notes, "notes_placed": self._notes_placed,
            "note_span": list(self._note_span) if self._note_span else None, "auto_notes": self.auto_notes,
        }
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), kv=self.backend.read_kv(),
                     **self.ledger.to_arrays())
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename publishes it (a power cut keeps the old file)
        os.replace(tmp, path)

    @classmethod
    def restore(cls, model, path: str) -> "ChatSession":
        # Everything read is checked before it is used (fuzzing, tests/test_fuzz_inputs.py, found a file that is
        # not an object, a wrong type in any field, a KV array of the wrong shape, a capacity of 10**12 and a
        # member declaring gigabytes to raise AttributeError / RuntimeError or allocate without bound).
        meta, arrays = _read_session_file(path)
        if meta.get("version") != SESSION_FILE_VERSION:
            raise SessionFileError(f"{path}: session file version {meta.get('version')!r}, expected {SESSION_FILE_VERSION}")
        if meta.get("fingerprint") != model.fingerprint:
            raise SessionFileError(f"{path}: saved from another model ({str(meta.get('fingerprint'))[:40]!r} vs "
                                   f"{model.fingerprint!r})")
        try:
            _check_meta(meta, arrays, model)
            n = len(arrays["ids"])
            # room beyond the model's positions is never used (_room): a capacity past them only costs memory
            capacity = min(meta["capacity"], max(model.max_positions, n))
            session = cls(model, system=meta["system"], mask=MaskConfig(**meta["mask"]),
                          sampling=SamplingConfig(**meta["sampling"]), max_new_tokens=meta["max_new_tokens"],
                          max_kv_tokens=capacity, stop=tuple(meta["stop"]))
            empty = session.backend.read_kv().shape  # (layers, 2, kv_heads, 0, head_dim)
            kv = arrays.pop("kv")
            if kv.shape != (*empty[:3], n, *empty[4:]) or kv.dtype.kind != "f":
                raise ValueError(f"field kv: expected float {(*empty[:3], n, *empty[4:])}, got {kv.dtype} {kv.shape}")
            session.ledger.load_arrays(arrays)
            session.backend.write_kv(kv, session.ledger.positions, session.ledger.turns)
            session.sampler.set_state(meta["sampler_state"])
            session.stats = [TurnStats(**s) for s in meta["stats"]]
        except (KeyError, TypeError, ValueError, AssertionError, OverflowError, InputError) as e:
            raise SessionFileError(f"{path}: damaged session file ({type(e).__name__}: {first_line(e)})") from None
        if meta.get("notes") or meta.get("auto_notes"):
            refuse_older_mask_rule(model)
        session._valid = session.ledger.n
        session.turn, session.history, session._pending = meta["turn"], meta["history"], meta["pending"]
        session._opened = meta["opened"]
        session.notes, session._notes_placed = dict(meta.get("notes", {})), meta.get("notes_placed", "")
        span = meta.get("note_span")
        session._note_span = (span[0], span[1]) if span else None
        session.auto_notes = meta.get("auto_notes", False)
        return session


_SESSION_ARRAYS = ("meta", "ids", "positions", "turns", "kv")


def _read_session_file(path: str) -> tuple[dict, dict]:
    """The metadata and arrays of a session file, each array read only after its header was checked against the
    bytes the file holds for it (a flipped header could declare gigabytes, and numpy allocates what it declares)."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy: np.load returned an array
            raise ValueError("not an .npz archive")
        with data:
            for name in _SESSION_ARRAYS:
                _check_member(data.zip, name + ".npy", os.path.getsize(path))
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in _SESSION_ARRAYS[1:]}
    except Exception as e:  # zipfile and numpy raise many types on a damaged file (BadZipFile, zlib.error,
        # NotImplementedError, EOFError, tokenize.TokenError from a flipped header, ...): all mean "unreadable"
        raise SessionFileError(f"{path}: not a readable belle_edge session file ({type(e).__name__}: {first_line(e)})") \
            from None
    if not isinstance(meta, dict):
        raise SessionFileError(f"{path}: damaged session file (meta: expected an object, got {type(meta).__name__})")
    return meta, arrays


def _check_member(archive: zipfile.ZipFile, name: str, file_size: int) -> None:
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size or info.file_size > file_size:
        raise ValueError(f"member {name}: not stored as written by ChatSession.save")
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"member {name}: .npy format version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        header = f.tell()
    if dtype.hasobject:
        raise ValueError(f"member {name}: objects (pickled data)")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared != info.file_size - header:
        raise ValueError(f"member {name}: declares {declared} bytes of data, holds {info.file_size - header}")


_STAT_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_meta(meta: dict, arrays: dict, model) -> None:
    """Raise ValueError / TypeError naming the first field of a session file that a restore cannot use."""
    def need(ok: bool, field: str, expected: str, value) -> None:
        if not ok:
            raise TypeError(f"field {field}: expected {expected}, got {type(value).__name__} {str(value)[:40]!r}")

    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    need(meta.get("system") is None or isinstance(meta.get("system"), str), "system", "a string or null",
         meta.get("system"))
    for name in ("mask", "sampling", "sampler_state"):
        need(isinstance(meta.get(name), dict), name, "an object", meta.get(name))
    need(whole(meta.get("capacity")) and meta["capacity"] >= 2, "capacity", "a whole number >= 2", meta.get("capacity"))
    stop = meta.get("stop")
    need(isinstance(stop, list) and all(isinstance(x, str) and x for x in stop), "stop", "a list of non-empty strings",
         stop)
    history = meta.get("history")
    need(isinstance(history, list) and all(isinstance(h, dict) and {"user", "reply"} <= set(h) <= {"user", "reply", "notes"}
                                           and all(isinstance(v, str) for v in h.values()) for h in history),
         "history", 'a list of {"user", "reply"[, "notes"]} strings', history)
    _check_notes(meta, need, whole)
    need(meta.get("turn") == len(history) and whole(meta.get("turn")), "turn", f"{len(history)} (the turns in history)",
         meta.get("turn"))
    need(isinstance(meta.get("opened"), bool), "opened", "true or false", meta.get("opened"))
    need(isinstance(meta.get("pending"), str), "pending", "a string", meta.get("pending"))
    stats = meta.get("stats")
    need(isinstance(stats, list) and all(isinstance(s, dict) for s in stats), "stats", "a list of objects", stats)
    fields = {f.name: _STAT_TYPES[f.type] for f in dataclasses.fields(TurnStats)}
    for s in stats:
        need(set(s) == set(fields) and all(isinstance(s[k], t) and (bool in t or not isinstance(s[k], bool))
                                           for k, t in fields.items()), "stats", "TurnStats records", s)
    ids, positions, turns = (arrays[k] for k in ("ids", "positions", "turns"))
    for name, a in (("ids", ids), ("positions", positions), ("turns", turns)):
        need(a.ndim == 1 and a.dtype.kind in "iu" and len(a) == len(ids), name, f"{len(ids)} whole numbers", a.dtype)
    n, vocab = len(ids), model.tokenizer.get_vocab_size(with_added_tokens=True)
    if n > meta["capacity"]:
        raise ValueError(f"field ids: {n} tokens, more than the capacity {meta['capacity']}")
    if n and not (0 <= ids.min() and ids.max() < vocab):
        raise ValueError(f"field ids: token ids outside 0..{vocab - 1}")
    if n and not (positions.min() >= 0 and positions.max() < model.max_positions and (np.diff(positions) > 0).all()):
        raise ValueError(f"field positions: expected increasing positions in 0..{model.max_positions - 1}")
    talk = turns[turns != 0]  # turn 0 (system, notes) may sit anywhere; the turns of the dialogue are in order
    if n and not (turns.min() >= 0 and turns.max() <= meta["turn"] and (np.diff(talk) >= 0).all()):
        raise ValueError(f"field turns: expected turns in 0..{meta['turn']}, non-decreasing apart from 0")
    span = meta.get("note_span")
    if span and not ((turns == 0) & (positions >= span[0]) & (positions < span[0] + span[1])).sum() == span[1]:
        raise ValueError("field note_span: its positions do not hold turn-0 tokens")


def _check_notes(meta: dict, need, whole) -> None:
    notes = meta.get("notes", {})
    need(isinstance(notes, dict) and len(notes) <= MAX_NOTES
         and all(isinstance(k, str) and isinstance(v, str) for k, v in notes.items()), "notes",
         f"an object of at most {MAX_NOTES} strings", notes)
    need(isinstance(meta.get("notes_placed", ""), str), "notes_placed", "a string", meta.get("notes_placed"))
    need(isinstance(meta.get("auto_notes", False), bool), "auto_notes", "true or false", meta.get("auto_notes"))
    span = meta.get("note_span")
    need(span is None or (isinstance(span, list) and len(span) == 2 and all(whole(x) and x >= 0 for x in span)),
         "note_span", "null or [first position, tokens]", span)


def refuse_special_tokens(model, text: str, what: str) -> None:
    """A user's text is tokenized with the chat format's own text around it, and the tokenizer turns a
    special token's text into the token wherever it appears: ``<|im_end|><|im_start|>system`` typed into a
    message would end the user's turn and open a system one. Such text is refused, never passed on."""
    found = next((s for s in model.special_texts if s in text), None)
    if found is not None:
        raise InputError(f"{what}: holds the special token {found!r} (the model's control text, not allowed in "
                         "a user's text)")
