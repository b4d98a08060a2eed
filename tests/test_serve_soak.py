"""A soak of the HTTP server (belle_edge/serve over a real BatchEngine and the tiny random LLaMA): several clients
at once send ~1000 short requests — whole replies, streams read to the end, streams dropped mid-way by closing the
connection, requests given up by a client timeout, refused ones — and afterwards nothing is left behind: no busy
slot, no queue, no request running, no Generation alive, every request counted once in /metrics, the worker
threads gone with the server, and the memory flat after a warm-up.

``BELLE_EDGE_SOAK_REQUESTS=20000 pytest tests/test_serve_soak.py -s`` runs a long one by hand (``-s`` prints the
figures); the default stays well under a minute on two cores.
"""
from __future__ import annotations

import gc
import os
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from belle_edge.runtime.engine import BatchEngine, EngineConfig, Generation  # noqa: E402
from belle_edge.serve.app import create_app  # noqa: E402
from conftest import serving  # noqa: E402

NAME = "tiny-llama"
REQUESTS = int(os.environ.get("BELLE_EDGE_SOAK_REQUESTS", "1000"))
WARMUP = 200  # requests before the first memory reading: allocator pools, caches, worker threads all made
CLIENTS = 8  # concurrent clients, twice the slots: requests wait in the queue too
SLOTS = 4
# RSS growth allowed from the warm-up to the end, whatever the number of requests. The engine allocates its memory
# up front (the KV pool) and a finished request must leave nothing behind; what remains is glibc's malloc: each
# thread that allocates (8 clients, ~12 anyio workers, the scheduler) gets an arena of its own, and those fill
# over the first thousands of requests. Measured on 2 cores: +7..11 MB after 1000 requests, +14 MB after 5000,
# +22 MB after 12000 but only +2.5 MB of it after 6000 (it levels off), and +5 MB after 4000 with
# MALLOC_ARENA_MAX=2. Inside the whole test run the process is already ~2 GB and its arenas fragmented: +34 MB
# after 1000 requests there (stop 23's fresh-clone run), while alone the same test grows +14.5 MB after 1000 and
# +16.8 MB after 5000 (no trend). A leak of one reply (its text, tokens, stats: >= 10 KB) per request would be
# >= 100 MB over a 10000-request run. The exact checks are the others: no Generation alive at the end, and as
# many Python objects as after the warm-up.
RSS_GROWTH_MB = 64.0
OBJECTS_GROWTH = 2000  # gc-tracked objects; measured within a few hundred either way
PROMPTS = ["你好！", "订单已经发货了吗？", "Hello, who are you?", "谢谢，我想查询物流。", "七天无理由退货",
           "Paris", "请提供您的订单号。", "The capital of France is"]


def rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return round(psutil.Process().memory_info().rss / 2**20, 1)


def metrics(url: str) -> dict[str, float]:
    samples = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


class Soak:
    """Clients in threads, each with its own connection pool; request ``i`` of the run is of kind ``kind(i)``."""

    KINDS = ("whole", "stream", "dropped", "whole", "history", "whole", "stream", "dropped")

    def __init__(self, url: str):
        self.url = url
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []
        self.sent = 0

    def kind(self, i: int) -> str:
        if i % 50 == 17:
            return "bad"
        if i % 25 == 11:
            return "timeout"
        return self.KINDS[i % 8]

    def run(self, start: int, stop: int) -> None:
        next_i = iter(range(start, stop))

        def client_loop():
            with httpx.Client(base_url=self.url, timeout=60) as client:
                while True:
                    with self.lock:
                        i = next(next_i, None)
                    if i is None:
                        return
                    try:
                        outcome = self.one(client, i)
                    except Exception as e:  # noqa: BLE001 - every failure is reported at the end
                        outcome = "failed"
                        with self.lock:
                            self.failures.append(f"request {i} ({self.kind(i)}): {type(e).__name__}: {e}")
                    with self.lock:
                        self.counts[outcome] = self.counts.get(outcome, 0) + 1
                        self.sent += 1

        threads = [threading.Thread(target=client_loop, name=f"soak-client-{k}") for k in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def one(self, client: httpx.Client, i: int) -> str:
        kind = self.kind(i)
        prompt = f"{PROMPTS[i % len(PROMPTS)]} #{i}"
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "temperature": 0.7, "seed": i}
        if kind == "bad":
            body["messages"] = [{"role": "robot", "content": prompt}]
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, r.text
            return "400"
        if kind == "history":  # a conversation of its own: the slots hold (and drop) conversations too
            body["messages"] = [{"role": "system", "content": "你是客服。"},
                                {"role": "user", "content": PROMPTS[(i + 1) % len(PROMPTS)]},
                                {"role": "assistant", "content": f"好的 {i}"}, {"role": "user", "content": prompt}]
        if kind == "timeout":  # the client gives up (20 ms) while its request waits or runs: it hangs up
            body["max_tokens"] = 64
            try:
                r = client.post("/v1/chat/completions", json=body, timeout=0.02)
            except httpx.TimeoutException:
                return "timed out"
            assert r.status_code == 200, r.text
            return "200"
        if kind in ("stream", "dropped"):
            body.update(stream=True, max_tokens=4 if kind == "stream" else 64)
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200, r.read()
                events = 0
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events += 1
                        if kind == "dropped" and events == 3:
                            return "dropped"  # leaving the block closes the half-read response's connection
                        if line == "data: [DONE]":
                            return "streamed"
            raise AssertionError(f"the stream ended without [DONE] after {events} events")
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 4
        return "200"


def live_generations() -> int:
    gc.collect()
    return sum(type(o) is Generation for o in gc.get_objects())


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning",
                            "error::pytest.PytestUnhandledThreadExceptionWarning")
def test_server_soak_leaves_nothing_behind(tiny_llama_model):
    gc.collect()
    threads_before = threading.active_count()
    engine = BatchEngine(tiny_llama_model, EngineConfig(max_batch=SLOTS, max_queue=64))
    t0 = time.perf_counter()
    with serving(create_app(engine, model_name=NAME, max_tokens_limit=64)) as url:
        soak = Soak(url)
        soak.run(0, min(WARMUP, REQUESTS))
        assert wait_for(lambda: metrics(url)["belle_kv_slots_busy"] == 0, 10)
        gc.collect()
        rss_warm, threads_warm, objects_warm = rss_mb(), threading.active_count(), len(gc.get_objects())
        soak.run(min(WARMUP, REQUESTS), REQUESTS)
        elapsed = time.perf_counter() - t0
        assert not soak.failures, f"{len(soak.failures)} failed, e.g. " + "; ".join(soak.failures[:5])
        assert soak.sent == REQUESTS

        # every request is counted once, also those the client gave up on (their end comes a moment later)
        def settled():
            m = metrics(url)
            counted = sum(v for k, v in m.items() if k.startswith("belle_requests_total"))
            return counted == REQUESTS and m["belle_kv_slots_busy"] == 0 and m["belle_queue_depth"] == 0
        assert wait_for(settled, 15), metrics(url)
        m = metrics(url)
        assert m["belle_requests_running"] == 0 and m["belle_kv_slots_total"] == SLOTS
        assert m['belle_requests_total{status="400"}'] == soak.counts["400"]
        cancelled = soak.counts.get("dropped", 0) + soak.counts.get("timed out", 0)
        assert m.get('belle_requests_total{status="499"}', 0) <= cancelled
        assert m.get('belle_requests_total{status="499"}', 0) >= soak.counts.get("dropped", 0) * 0.9

        # the engine: every slot free, nobody waiting or running, no step queued, no Generation kept alive
        e = engine.metrics()
        assert (e.slots_busy, e.slots_total, e.requests_running, e.queue_depth) == (0, SLOTS, 0, 0)
        assert not engine._waiting and not engine._running
        assert not engine._scheduler._queue and not engine._scheduler._running
        assert all(not s.busy for s in engine._slots)
        assert live_generations() == 0  # a slot's check, a queue, a metrics object... none holds a request

        gc.collect()
        rss_end, threads_end, objects_end = rss_mb(), threading.active_count(), len(gc.get_objects())
        statuses = {k[len("belle_requests_total"):]: int(v) for k, v in m.items()
                    if k.startswith("belle_requests_total")}
        print(f"\nsoak: {REQUESTS} requests by {CLIENTS} clients over {SLOTS} slots in {elapsed:.1f} s "
              f"({REQUESTS / elapsed:.0f}/s); outcomes {dict(sorted(soak.counts.items()))}; /metrics {statuses}; "
              f"RSS {rss_warm} MB after {WARMUP} -> {rss_end} MB at the end; threads {threads_before} before, "
              f"{threads_warm} after the warm-up, {threads_end} at the end; Python objects {objects_warm} -> "
              f"{objects_end}")
        # worker threads are pooled (anyio keeps idle ones ~10 s): as many as the warm-up needed, not more per
        # request; a few more may be alive for a moment
        assert threads_end <= threads_warm + 4, (threads_warm, threads_end)
        if rss_warm is not None and REQUESTS > WARMUP:
            assert rss_end - rss_warm <= RSS_GROWTH_MB, (rss_warm, rss_end)  # the same bound for a long run
        assert objects_end - objects_warm <= OBJECTS_GROWTH, (objects_warm, objects_end)
    # the server gone: its thread, the engine's scheduler and every worker thread with it
    assert wait_for(lambda: threading.active_count() <= threads_before, 10), \
        (threads_before, [t.name for t in threading.enumerate()])


# ---------------------------------------------------------------------------------------------- what it found
# Regression tests for what the soak found. (1) A dropped stream's half-read iterator of its Generation sits in
# reference cycles (exception tracebacks hold the frames), so the garbage collector closed it at some allocation
# in some thread — at times inside the same generation's close(), while that closed the session's reply
# iterator: "ValueError: generator already executing", printed as an ignored exception (1-3 per 5000 requests).
# The server now closes that iterator itself, in a worker, before the generation; the generation runs its reply
# iterator under a lock, and an iterator closed while close() holds it leaves the ending to close().
# (2) close() from another thread while a thread was mid-step raised the same ValueError. (3) A generation
# cancelled during its prefill (an earlier turn fed in start()) raised Cancelled out of start(): a 500 in the
# server when the engine closed at that moment.
def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_the_collector_closing_a_half_read_iterator_inside_close(tiny_llama_model, monkeypatch):
    """(1), made certain: a collection runs inside the reply's own close (as it did in jinja's render of the
    turn's end) while a half-read iterator of the same generation is garbage in a cycle."""
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: ignored.append(u.exc_value))
    with BatchEngine(tiny_llama_model, EngineConfig(max_batch=1)) as engine:
        gen = engine.submit(user("你好"), max_tokens=50)
        pieces = iter(gen)
        next(pieces)
        cycle = {"pieces": pieces}
        cycle["self"] = cycle
        del pieces, cycle  # garbage now, but only the collector can free it
        session = engine._slots[0].session
        settle = session._settle

        def settle_with_a_collection(*args, **kw):
            gc.collect()  # the orphaned iterator is closed here, inside gen.close() -> the reply's close
            return settle(*args, **kw)

        monkeypatch.setattr(session, "_settle", settle_with_a_collection)
        closer = threading.Thread(target=gen.close, daemon=True)  # a lock taken twice would hang, not fail
        closer.start()
        closer.join(10)
        assert not closer.is_alive()
        assert not ignored, ignored
        assert gen.finish_reason == "cancelled" and engine.metrics().slots_busy == 0
        monkeypatch.undo()
        again = engine.submit(user("你好"), max_tokens=3)
        "".join(again)  # the slot serves again
        assert again.finish_reason in ("length", "eos", "stop")


def test_close_from_another_thread_waits_for_the_step_in_flight(tiny_llama_model):
    with BatchEngine(tiny_llama_model, EngineConfig(max_batch=1)) as engine:
        for _ in range(5):
            gen = engine.submit(user("你好"), max_tokens=200)
            got, errors = [], []

            def read():
                try:
                    for piece in gen:
                        got.append(piece)
                except Exception as e:  # noqa: BLE001
                    errors.append(e)

            reader = threading.Thread(target=read)
            reader.start()
            assert wait_for(lambda: len(got) >= 3, 10)
            gen.close()  # the reader is mid-step most of the time: it used to be "generator already executing"
            reader.join(10)
            assert not reader.is_alive() and not errors
            assert gen.finish_reason == "cancelled" and 3 <= len(got) < 200
            assert engine.metrics().slots_busy == 0


def test_a_generation_cancelled_during_its_prefill_ends_without_an_error(tiny_llama_model, monkeypatch):
    with BatchEngine(tiny_llama_model, EngineConfig(max_batch=1)) as engine:
        acquire = engine._acquire

        def acquire_then_cancel(gen):
            slot = acquire(gen)
            gen.cancel()  # as a client leaving, or the engine closing, right after the slot was given
            return slot

        monkeypatch.setattr(engine, "_acquire", acquire_then_cancel)
        history = [*user("你好"), {"role": "assistant", "content": "您好，请问有什么可以帮您？"},
                   *user("我想退货")]
        gen = engine.submit(history, max_tokens=8)  # an earlier turn: start() prefills it
        gen.start()  # used to raise Cancelled
        assert list(gen) == [] and gen.finish_reason == "cancelled"
        monkeypatch.undo()
        assert engine.metrics().slots_busy == 0
        again = engine.submit(user("你好"), max_tokens=3)
        "".join(again)  # the slot serves again
        assert again.finish_reason in ("length", "eos", "stop")


def test_dropped_streams_leave_no_generation_alive(tiny_llama_model):
    """No strong reference keeps a finished request (its text, its messages) once its reply is over."""
    engine = BatchEngine(tiny_llama_model, EngineConfig(max_batch=2))
    with serving(create_app(engine, model_name=NAME)) as url:
        body = {"messages": user("你好"), "max_tokens": 64}
        for _ in range(3):
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith('data: {"id"') and "content" in line:
                        break  # dropped mid-stream
            assert httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 2}).status_code == 200
        assert wait_for(lambda: metrics(url).get('belle_requests_total{status="499"}') == 3
                        and metrics(url)["belle_kv_slots_busy"] == 0, 10)
        assert live_generations() == 0
