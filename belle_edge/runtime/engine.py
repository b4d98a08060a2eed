"""``BatchEngine``: many dialogues at once over one copy of the weights. Torch-free.

What a server (belle_edge/serve) or an app that serves several users holds::

    engine = BatchEngine(model, EngineConfig(max_batch=4))
    gen = engine.submit(messages, sampling=SamplingConfig(temperature=0.7, seed=1), max_tokens=200)
    for piece in gen:           # in any thread; many generations iterate at once
        ...

The KV pool has ``max_batch`` slots of ``kv_tokens`` each, allocated at start: the memory bound. Each
request is stateless (it carries the whole conversation, as in OpenAI's API), but a slot keeps its
conversation's :class:`~.session.ChatSession` after the reply, so the next request that extends the same
conversation — the same system prompt and the same earlier turns, replies as they were given — continues
from its cache and prefills only what is new (a reuse *hit*). The cache kept is the longest prefix of the
tokens a re-prefill of the request would hold (``ChatSession.realign``: a generated reply tokenized again
can be cut differently), never more. Anything else starts over in a slot of its own: the history is fed
again turn by turn (``ChatSession.add_turn``), so the cache a request ends with is the cache a single
session would have, turn window and evictions included. A request that finds no slot
free takes the least recently used idle conversation's; if none is idle it waits, in order, and a request
beyond ``max_queue`` waiting ones is refused (``QueueFullError``).

The model runs in one scheduler thread (runtime/scheduler.py); each generation's own logic (sampling, stop
strings, the window) runs in the thread that iterates it.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator

from ..errors import EngineClosedError, InputError, QueueFullError
from ..mask import MaskConfig
from .sampler import SamplingConfig
from .scheduler import Cancelled, SlotView, StepScheduler
from .session import ChatSession

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 4  # KV slots in the pool = sequences decoded together
    kv_tokens: int | None = None  # KV tokens per slot (default: the model's default capacity)
    max_queue: int = 16  # requests that may wait for a slot; one more is refused
    window: int | None = 3  # the turn window; None switches it off
    sinks: int = 4
    prefill_chunk: int = 128  # tokens per prefill step: what one long prompt may delay the others by
    max_wait_ms: float = 3.0  # how long a step waits for running sequences' rows before it goes without

    def __post_init__(self):
        for name in ("max_batch", "prefill_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"engine {name}: expected a whole number >= 1, got {value!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise InputError(f"engine max_queue: expected a whole number >= 0, got {self.max_queue!r}")
        if self.kv_tokens is not None and (not isinstance(self.kv_tokens, int) or self.kv_tokens < 2):
            raise InputError(f"engine kv_tokens: expected a whole number >= 2, got {self.kv_tokens!r}")

    @property
    def mask(self) -> MaskConfig:
        return MaskConfig(window=self.window, sinks=self.sinks) if self.window is not None else MaskConfig.off()


@dataclass
class EngineMetrics:
    requests_total: int
    requests_running: int
    queue_depth: int
    reuse_hits: int
    reuse_misses: int
    prompt_tokens_total: int
    completion_tokens_total: int
    decode_steps: int
    batch_occupancy: float  # mean sequences per batched decode step
    kv_tokens_used: int
    kv_tokens_capacity: int
    slots_busy: int
    slots_idle: int  # holding an idle conversation for reuse
    slots_total: int


def parse_messages(messages) -> tuple[str | None, list[tuple[str, str]], str]:
    """OpenAI-style messages -> (system, earlier (user, reply) turns, the new user message); InputError
    naming the message and the field otherwise."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages: expected a non-empty list of {role, content}")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"messages[{i}]: expected an object with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"messages[{i}].role: expected one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InputError(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InputError(f"messages[{i}].content: expected a string, got {type(content).__name__}")
        parsed.append((role, content))
    system = None
    if parsed[0][0] == "system":
        system = parsed.pop(0)[1]
    expected = "user"
    for i, (role, _) in enumerate(parsed, start=1 if system is not None else 0):
        if role != expected:
            raise InputError(f"messages[{i}].role: expected {expected!r} (after an optional first system "
                             f"message, user and assistant alternate), got {role!r}")
        expected = "assistant" if role == "user" else "user"
    if not parsed or parsed[-1][0] != "user":
        raise InputError("messages: the last message must be the user's")
    turns = [(parsed[k][1], parsed[k + 1][1]) for k in range(0, len(parsed) - 1, 2)]
    return system, turns, parsed[-1][1]


class _Slot:
    def __init__(self, index: int, view: SlotView):
        self.index, self.view = index, view
        self.session: ChatSession | None = None  # the conversation it holds (busy or idle)
        self.busy = False
        self.last_used = 0.0


class Generation:
    """One request's reply. Iterate it for the text (in whole characters); afterwards, or from another
    thread, its attributes say how it went. :meth:`cancel` from any thread stops it at its next step;
    :meth:`close` from any thread ends it (once the step in flight is over).

    The session's reply iterator only runs under the generation's lock. An iterator of the generation left
    half-read is closed by whoever drops it last — or by the garbage collector, in any thread, at any
    allocation, also one inside :meth:`close` of the same generation, while it closes the session's
    iterator: the iterator then leaves the ending to close() ("generator already executing" otherwise,
    printed as an ignored exception, and the turn not settled by it)."""

    def __init__(self, engine: "BatchEngine", system, turns, message, sampling, max_tokens, stop, notes=None):
        self._engine = engine
        self._request = (system, turns, message)
        self._notes = notes  # None: the conversation's notes as the slot holds them; a dict: these
        self._settings = dict(sampling=sampling, max_new_tokens=max_tokens, stop=tuple(stop))
        self.t_submit = time.perf_counter()
        self._slot: _Slot | None = None
        self._stream: Iterator[str] | None = None
        self._cancelled = threading.Event()
        self._lock = threading.Lock()  # held while the session's reply iterator runs (a step, or its close)
        self._closing = False  # close() has begun: it ends the generation
        self._finished = False
        self.text = ""
        self.finish_reason: str | None = None  # eos | stop | length | context | cancelled | error
        self.reused = False
        self.prompt_tokens = 0  # the conversation as the model saw it before replying (KV reused included)
        self.cached_tokens = 0  # of which came from an earlier request's cache
        self.completion_tokens = 0
        self.ttft_s: float | None = None  # submit -> first token
        self.decode_s = 0.0  # first -> last token

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        """Wait for a slot, bring its cache to the conversation, plan the turn. Errors raise here (an
        over-long message: InputError), with the slot's conversation left as it was. Idempotent."""
        with self._lock:  # close() from another thread cancels the wait or the prefill, then finishes
            self._start()

    def _start(self) -> None:
        if self._stream is not None or self._finished:
            return  # started, or over (cancelled while it waited: iterating yields nothing)
        try:
            slot = self._engine._acquire(self)
        except Cancelled:  # cancelled while it waited: nothing to reply
            self._finish("cancelled")
            return
        except BaseException:  # the engine closed while it waited
            self._finish("error")
            raise
        self._slot = slot
        slot.view.check = self._check
        try:
            self._engine._scheduler.running(slot.index, True)
            session = self._prepare(slot)
            self._stats_before = len(session.stats)
            self._t_stream = time.perf_counter()
            self._stream = session.stream(self._request[2])
        except Cancelled:  # cancelled (or the engine closed) during the prefill: nothing to reply, as above
            self._finish("cancelled")
        except BaseException:
            self._finish("cancelled" if self._cancelled.is_set() else "error")
            raise

    def __iter__(self) -> Iterator[str]:
        self.start()
        if self._stream is None:
            return
        try:
            while True:
                with self._lock:  # one step; close() from another thread waits for it
                    piece = next(self._stream, None)
                if piece is None:
                    break
                self.text += piece
                yield piece
        except Cancelled:
            pass
        finally:
            # once close() has begun it ends the generation: not waiting for its lock, which may be held further
            # up this very thread's stack (the collector closing this iterator from inside close())
            if self._lock.acquire(blocking=not self._closing):
                try:
                    self._stream.close()  # settles the turn if the consumer left early
                    self._finish("cancelled" if self._cancelled.is_set() else None)
                finally:
                    self._lock.release()

    def cancel(self) -> None:
        self._cancelled.set()
        self._engine._wake()

    def close(self) -> None:
        """Let go of the request without (further) iterating: cancels it and frees its slot. From any thread;
        a step running in another thread ends first (cancelled, at its next forward)."""
        self._closing = True
        self.cancel()
        with self._lock:
            if self._stream is not None:
                self._stream.close()
            self._finish("cancelled")

    # ------------------------------------------------------------------ inside
    def _check(self) -> None:
        if self._cancelled.is_set():
            raise Cancelled("request cancelled")

    def _prepare(self, slot: _Slot) -> ChatSession:
        """The slot's session, holding this request's earlier turns (reused as far as they match)."""
        system, turns, _ = self._request
        engine = self._engine
        session = slot.session
        fed = slot.view.fed
        held = _held_turns(session, system, engine.config.mask, turns)
        kept = session.realign() if held is not None else None  # the tokens a re-prefill would hold
        if kept is None:  # nothing to reuse: a fresh conversation in this slot
            if session is None:
                session = ChatSession(engine.model, system=system, mask=engine.config.mask, backend=slot.view,
                                      prefill_chunk=engine.config.prefill_chunk)
                slot.session = session
            else:
                session.system = system or None
                session.reset()
            held = 0
        self.reused = bool(kept)
        self.cached_tokens = kept or 0
        engine._count("reuse_hits" if self.reused else "reuse_misses")
        session.configure(**self._settings)
        for user, reply in turns[held:]:
            session.add_turn(user, reply)
        if self._notes is not None:  # a change is placed with this request's turn
            session.set_notes(self._notes)
        self._fed_history = slot.view.fed - fed  # prefilled to bring the cache to the request's history
        return session

    def _finish(self, reason: str | None) -> None:
        if self._finished:
            return
        self._finished = True
        slot, self._slot = self._slot, None
        session = slot.session if slot is not None else None
        if session is not None and self._stream is not None and len(session.stats) > self._stats_before:
            stats = session.stats[-1]  # this turn's
            self.finish_reason = reason or stats.finish_reason
            self.completion_tokens = stats.new_tokens
            self.prompt_tokens = self.cached_tokens + self._fed_history + stats.prompt_tokens
            if stats.ttft_ms:
                self.ttft_s = self._t_stream - self.t_submit + stats.ttft_ms / 1e3
                self.decode_s = max(stats.total_ms - stats.ttft_ms, 0.0) / 1e3
        else:
            self.finish_reason = reason or "cancelled"
        self._engine._release(self, slot)


def _held_turns(session: ChatSession | None, system, mask: MaskConfig, turns) -> int | None:
    """How many of ``turns`` the idle ``session`` holds exactly as given (a prefix), or None when it cannot
    continue this conversation (another system prompt or window, or an earlier turn that differs)."""
    if session is None or session.turn == 0 or (session.system or None) != (system or None) or session.mask != mask:
        return None
    held = [(h["user"], h["reply"]) for h in session.history]
    if len(held) > len(turns) or held != list(turns[:len(held)]):
        return None
    return len(held)


class BatchEngine:
    def __init__(self, model, config: EngineConfig | None = None):
        self.model = model
        self.config = config or EngineConfig()
        factory = getattr(model, "pool_factory", None)
        if factory is None:
            raise InputError(f"the {model.backend_name} backend does not serve batches yet; use the torch or "
                             "onnxruntime backend")
        capacity = self.config.kv_tokens or model.default_capacity
        self.pool = factory(self.config.max_batch, capacity)
        self._scheduler = StepScheduler(self.pool, max_wait_s=self.config.max_wait_ms / 1e3)
        self._slots = [_Slot(i, SlotView(self._scheduler, i)) for i in range(self.config.max_batch)]
        self._cond = threading.Condition()
        self._waiting: deque[Generation] = deque()  # submitted, no slot yet, in order
        self._closed = False
        self._running: set[Generation] = set()
        self._counts = dict(requests_total=0, reuse_hits=0, reuse_misses=0, prompt_tokens_total=0,
                            completion_tokens_total=0)

    # ------------------------------------------------------------------ public
    def submit(self, messages, *, sampling: SamplingConfig | None = None, max_tokens: int = 256,
               stop: tuple[str, ...] | list[str] = (), notes: dict[str, str] | None = None) -> Generation:
        """Queue a request: OpenAI-style ``messages`` ending with the user's. Returns at once; the reply
        comes by iterating the Generation. InputError for a bad request, QueueFullError when too many wait.
        ``notes``: the conversation's pinned notes (runtime/notes.py) from this turn on — a change enters the
        cache with this request's turn; None keeps what the conversation's slot holds (none for a new one)."""
        system, turns, message = parse_messages(messages)
        if notes is not None:  # checked here, so that a bad request fails at once and alone
            ChatSession.check_notes(self.model, notes)
        if not message.strip():
            raise InputError("message is empty")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InputError(f"max_tokens: expected a whole number >= 1, got {max_tokens!r}")
        if not all(isinstance(s, str) and s for s in stop):
            raise InputError("stop: expected non-empty strings")
        gen = Generation(self, system, turns, message, sampling or SamplingConfig(), max_tokens, stop, notes)
        with self._cond:
            if self._closed:
                raise EngineClosedError("the server is shutting down")
            if len(self._waiting) >= self.config.max_queue and not self._free_slot_now():
                raise QueueFullError(f"too many requests waiting ({len(self._waiting)}); try again shortly")
            self._waiting.append(gen)
            self._counts["requests_total"] += 1
        return gen

    def metrics(self) -> EngineMetrics:
        with self._cond:
            busy = sum(s.busy for s in self._slots)
            idle = sum(not s.busy and s.session is not None for s in self._slots)
            used = sum(self.pool.n(s.index) for s in self._slots if s.session is not None)
            steps, rows = self._scheduler.steps, self._scheduler.decode_rows
            return EngineMetrics(**self._counts, requests_running=len(self._running),
                                 queue_depth=len(self._waiting), decode_steps=steps,
                                 batch_occupancy=rows / steps if steps else 0.0, kv_tokens_used=used,
                                 kv_tokens_capacity=self.pool.slots * self.pool.capacity, slots_busy=busy,
                                 slots_idle=idle, slots_total=len(self._slots))

    def pool_steps(self) -> tuple[int, int]:
        """(batched decode steps run, sequences they carried): their quotient is the mean batch."""
        return self._scheduler.steps, self._scheduler.decode_rows

    def close(self, timeout: float = 10.0) -> None:
        """Take no new requests; let the running ones finish for up to ``timeout`` seconds, then cancel them."""
        with self._cond:
            self._closed = True
            for gen in self._waiting:
                gen._cancelled.set()
            self._waiting.clear()  # those blocked in _acquire wake to the cancellation
            self._cond.notify_all()
            end = time.monotonic() + timeout
            while self._running and time.monotonic() < end:
                self._cond.wait(max(end - time.monotonic(), 0.01))
            for gen in self._running:
                gen._cancelled.set()
            while self._running:  # cancelled: they end at their next step
                if not self._cond.wait(5):
                    break
        self._scheduler.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ slots
    def _free_slot_now(self) -> bool:
        return not self._waiting and any(not s.busy for s in self._slots)

    def _count(self, name: str, n: int = 1) -> None:
        with self._cond:
            self._counts[name] += n

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _acquire(self, gen: Generation) -> _Slot:
        """A slot for ``gen``: the idle one holding its conversation, else an empty one, else the least
        recently used idle one; waits in order while every slot is busy."""
        with self._cond:
            try:
                while True:
                    if self._closed:
                        raise EngineClosedError("the server is shutting down")
                    if gen._cancelled.is_set():
                        raise Cancelled("request cancelled")
                    slot = self._pick(gen)
                    if slot is not None:
                        break
                    self._cond.wait()
            except BaseException:
                self._drop_waiting(gen)
                raise
            self._drop_waiting(gen)
            slot.busy = True
            self._running.add(gen)
            gen._t_started = time.perf_counter()
            return slot

    def _pick(self, gen: Generation) -> _Slot | None:
        system, turns, _ = gen._request
        idle = [s for s in self._slots if not s.busy]
        for s in idle:  # its own conversation, whatever its place in the queue
            if _held_turns(s.session, system, self.config.mask, turns):
                return s
        if not idle or self._waiting[0] is not gen:
            return None
        empty = [s for s in idle if s.session is None or s.session.turn == 0]
        return empty[0] if empty else min(idle, key=lambda s: s.last_used)

    def _drop_waiting(self, gen: Generation) -> None:
        if gen in self._waiting:
            self._waiting.remove(gen)
            self._cond.notify_all()

    def _release(self, gen: Generation, slot: _Slot | None) -> None:
        if slot is not None:
            self._scheduler.running(slot.index, False)
            slot.view.check = lambda: None
        with self._cond:
            self._drop_waiting(gen)
            self._running.discard(gen)
            self._counts["prompt_tokens_total"] += gen.prompt_tokens
            self._counts["completion_tokens_total"] += gen.completion_tokens
            if slot is not None:
                slot.busy = False
                slot.last_used = time.monotonic()
            self._cond.notify_all()
