"""Continuous batching: one thread runs the model for every sequence of a KV pool. Torch-free.

Each sequence is an ordinary :class:`~.session.ChatSession` running in its caller's thread over a
:class:`SlotView` — one slot of the pool, seen as a single-sequence backend. Its ``forward`` does not run
the model: it queues the row and waits. The scheduler thread gathers the queued rows into steps::

    wait for a row; then until every running sequence has queued one, or ``max_wait`` has passed
    step = all queued decode rows (one token each, up to the pool's size)  -> one batched forward
         + the oldest queued prefill chunk (several tokens)                  -> one forward of its own

So a request that arrives joins at the next step, and a long prompt — prefilled in chunks by its session
— delays the others by one chunk per step, never by the whole prompt. Sessions keep all their logic
(turn window, eviction, context shift, stop strings, sampling); only the forward is shared.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..mask import MaskConfig
from .backends.base import BatchBackend


class Cancelled(Exception):
    """Raised in a sequence's thread at its next forward once its request was cancelled."""


@dataclass
class _Row:
    slot: int
    ids: np.ndarray
    positions: np.ndarray
    turns: np.ndarray
    mask: MaskConfig
    queued: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    logits: np.ndarray | None = None
    error: BaseException | None = None


class StepScheduler:
    def __init__(self, pool: BatchBackend, *, max_wait_s: float = 0.003):
        self.pool = pool
        self.max_wait_s = max_wait_s
        self.lock = threading.Lock()  # held while the pool runs or a slot is compacted
        self._cond = threading.Condition()
        self._queue: list[_Row] = []
        self._running: set[int] = set()  # slots whose sequence is in a turn
        self._closed = False
        self.steps = 0  # batched decode steps run
        self.decode_rows = 0  # sequences they carried, summed (mean occupancy = decode_rows / steps)
        self._step_end = 0.0  # perf_counter when the last step ended
        self._thread = threading.Thread(target=self._loop, name="belle-edge-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called from sequence threads
    def running(self, slot: int, on: bool) -> None:
        """A sequence starts or ends its turn: the scheduler waits for the running ones' rows."""
        with self._cond:
            (self._running.add if on else self._running.discard)(slot)
            self._cond.notify_all()

    def forward(self, slot: int, ids, positions, turns, mask: MaskConfig) -> np.ndarray:
        row = _Row(slot, np.asarray(ids, dtype=np.int64), np.asarray(positions, dtype=np.int64),
                   np.asarray(turns, dtype=np.int64), mask)
        with self._cond:
            if self._closed:
                raise Cancelled("the engine is closed")
            self._queue.append(row)
            self._cond.notify_all()
        row.done.wait()
        if row.error is not None:
            raise row.error
        return row.logits

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the scheduler thread
    def _next_step(self) -> tuple[list[_Row], _Row | None] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            # from the first row's arrival, or the last step's end if it came during that step: a row that
            # waited through a step must not make the next step leave at once without the rows of the
            # sequences that step was serving (they ping-pong in alternate steps forever otherwise)
            deadline = max(self._queue[0].queued, self._step_end) + self.max_wait_s
            while len(self._queue) < len(self._running) and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            decode = [r for r in self._queue if len(r.ids) == 1][:self.pool.slots]
            prefill = next((r for r in self._queue if len(r.ids) > 1), None)
            taken = {id(r) for r in decode} | ({id(prefill)} if prefill else set())
            self._queue = [r for r in self._queue if id(r) not in taken]
            return decode, prefill

    def _loop(self) -> None:
        while (step := self._next_step()) is not None:
            decode, prefill = step
            for group in _by_mask(decode):
                self._run(group)
                self.steps += 1
                self.decode_rows += len(group)
            if prefill is not None:
                self._run([prefill])
            self._step_end = time.perf_counter()
        with self._cond:  # closed: whoever still waits is told so
            for row in self._queue:
                row.error = Cancelled("the engine is closed")
                row.done.set()
            self._queue.clear()

    def _run(self, rows: list[_Row]) -> None:
        try:
            with self.lock:
                logits = self.pool.forward_rows([(r.slot, r.ids, r.positions, r.turns) for r in rows],
                                                mask=rows[0].mask)
            for r, row_logits in zip(rows, logits):
                r.logits = row_logits
        except BaseException as e:  # reported to each waiting sequence; the scheduler goes on
            for r in rows:
                r.error = e
        for r in rows:
            r.done.set()


def _by_mask(rows: list[_Row]) -> list[list[_Row]]:
    groups: dict[MaskConfig, list[_Row]] = {}
    for r in rows:
        groups.setdefault(r.mask, []).append(r)
    return list(groups.values())


class SlotView:
    """One slot of a pool as the single-sequence backend a ChatSession drives (backends/base.py's Backend):
    forwards go through the scheduler, cache edits run under its lock. ``check`` runs before each forward
    (the engine's cancellation)."""

    def __init__(self, scheduler: StepScheduler, slot: int):
        self.scheduler, self.pool, self.slot = scheduler, scheduler.pool, slot
        self.name = self.pool.name
        self.capacity = self.pool.capacity
        self.vocab_size = self.pool.vocab_size
        self.check = lambda: None
        self.fed = 0  # tokens forwarded through this slot so far

    @property
    def n(self) -> int:
        return self.pool.n(self.slot)

    def forward(self, token_ids, positions, turns, *, mask: MaskConfig) -> np.ndarray:
        self.check()
        logits = self.scheduler.forward(self.slot, token_ids, positions, turns, mask)
        self.fed += len(token_ids)
        return logits

    def truncate(self, n: int) -> None:
        with self.scheduler.lock:
            self.pool.truncate(self.slot, n)

    def keep(self, slots: np.ndarray) -> None:
        with self.scheduler.lock:
            self.pool.keep(self.slot, slots)

    def read_kv(self) -> np.ndarray:
        with self.scheduler.lock:
            return self.pool.read_kv(self.slot)

    def write_kv(self, kv: np.ndarray, positions: np.ndarray, turns: np.ndarray) -> None:
        with self.scheduler.lock:
            self.pool.write_kv(self.slot, kv, positions, turns)
