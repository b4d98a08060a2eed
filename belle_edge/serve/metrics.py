"""``GET /metrics``: the server's and the engine's figures in Prometheus' text format (version 0.0.4), by hand.

=========================================  =========  ====================================================
metric                                     type       what
=========================================  =========  ====================================================
belle_requests_total{status}               counter    chat completion requests by HTTP status (499: the
                                                      client went away before the reply was complete)
belle_prompt_tokens_total                  counter    prompt tokens of finished requests (cached included)
belle_completion_tokens_total              counter    tokens generated
belle_reuse_hits_total                     counter    requests that continued a cached conversation
belle_reuse_misses_total                   counter    requests that prefilled their history afresh
belle_queue_depth                          gauge      requests waiting for a KV slot
belle_requests_running                     gauge      requests holding a KV slot
belle_batch_occupancy                      gauge      mean sequences per batched decode step, so far
belle_kv_tokens_used                       gauge      KV tokens held (idle conversations included)
belle_kv_tokens_capacity                   gauge      KV tokens the pool holds at most
belle_kv_slots_busy / belle_kv_slots_total gauge      slots serving a request / in the pool
belle_time_to_first_token_seconds          histogram  submit -> first token, per request
belle_time_per_output_token_seconds        histogram  first -> last token over the tokens after the first
=========================================  =========  ====================================================
"""
from __future__ import annotations

import bisect
import math
import threading

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        assert list(buckets) == sorted(buckets)
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1  # bucket le=b holds values <= b
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip(self.buckets + (math.inf,), self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        out += [f"{name}_sum {_number(self.sum)}", f"{name}_count {self.count}"]
        return out


class ServerMetrics:
    """What the server counts itself; the engine's own figures are read at each scrape."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)

    def count_request(self, status: int) -> None:
        with self._lock:
            self.requests[str(status)] = self.requests.get(str(status), 0) + 1

    def observe(self, gen) -> None:
        """A finished :class:`~belle_edge.runtime.engine.Generation`'s latencies."""
        with self._lock:
            if gen.ttft_s is not None:
                self.ttft.observe(gen.ttft_s)
            if gen.completion_tokens > 1:
                self.tpot.observe(gen.decode_s / (gen.completion_tokens - 1))

    def render(self, engine_metrics) -> str:
        m = engine_metrics
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        with self._lock:
            requests = sorted(self.requests.items())
            ttft, tpot = self.ttft.lines("belle_time_to_first_token_seconds"), \
                self.tpot.lines("belle_time_per_output_token_seconds")
        family("belle_requests_total", "counter", "Chat completion requests by HTTP status (499: client went away).",
               [f'belle_requests_total{{status="{s}"}} {n}' for s, n in requests])
        for name, kind, help_text, value in (
            ("belle_prompt_tokens_total", "counter", "Prompt tokens of finished requests, cached ones included.",
             m.prompt_tokens_total),
            ("belle_completion_tokens_total", "counter", "Tokens generated.", m.completion_tokens_total),
            ("belle_reuse_hits_total", "counter", "Requests that continued a cached conversation.", m.reuse_hits),
            ("belle_reuse_misses_total", "counter", "Requests that prefilled their history afresh.",
             m.reuse_misses),
            ("belle_queue_depth", "gauge", "Requests waiting for a KV slot.", m.queue_depth),
            ("belle_requests_running", "gauge", "Requests holding a KV slot.", m.requests_running),
            ("belle_batch_occupancy", "gauge", "Mean sequences per batched decode step.", m.batch_occupancy),
            ("belle_kv_tokens_used", "gauge", "KV tokens held, idle conversations included.", m.kv_tokens_used),
            ("belle_kv_tokens_capacity", "gauge", "KV tokens the pool holds at most.", m.kv_tokens_capacity),
            ("belle_kv_slots_busy", "gauge", "KV slots serving a request.", m.slots_busy),
            ("belle_kv_slots_total", "gauge", "KV slots in the pool.", m.slots_total),
        ):
            family(name, kind, help_text, [f"{name} {_number(value)}"])
        family("belle_time_to_first_token_seconds", "histogram", "Time from submit to the first token.", ttft)
        family("belle_time_per_output_token_seconds", "histogram", "Time per token after the first.", tpot)
        return "\n".join(out) + "\n"


def _number(value) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))
