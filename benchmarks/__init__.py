"""Benchmarks: latency against peers (``belle-edge bench``), dialogue KV growth, and later kernels."""
