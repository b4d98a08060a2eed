"""Soak: one dialogue of many turns (400 in CI; ``BELLE_EDGE_SOAK_TURNS=1000`` and more by hand) on the
torch and ONNX Runtime backends with the turn window on: the KV cache stays bounded by the window, and the
process's resident memory is flat after the first 100 turns (growth <= 5%)."""
import os

import pytest

from belle_edge.api import torch_chat_model
from belle_edge.core.load import load_checkpoint

TURNS = int(os.environ.get("BELLE_EDGE_SOAK_TURNS", "400"))
WARM = 100
pytestmark = pytest.mark.slow

MESSAGES = ["你好", "订单已经发货了吗？", "Hello! How can I help you?", "请提供您的订单号。", "谢谢你的帮助！",
            "能换个颜色吗", "What is the return policy for shoes bought online last week?"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _soak(model, label: str) -> None:
    session = model.session(window=2, sinks=4, max_new_tokens=12, max_kv_tokens=400)
    kv_peak, rss_warm = 0, None
    for turn in range(1, TURNS + 1):
        reply = session.send(MESSAGES[turn % len(MESSAGES)] + f" #{turn}")
        kv_peak = max(kv_peak, reply.stats.kv_tokens)
        if turn == WARM:
            rss_warm = _rss_bytes()
    rss_end = _rss_bytes()
    growth = rss_end / rss_warm - 1
    print(f"{label}: {TURNS} turns, KV peak {kv_peak} tokens (capacity 400), RSS {rss_warm / 2**20:.0f} MB at turn "
          f"{WARM} -> {rss_end / 2**20:.0f} MB at the end ({growth:+.1%})")
    assert kv_peak <= 400
    assert growth <= 0.05, f"{label}: resident memory grew {growth:.1%} after turn {WARM}"


def test_a_long_dialogue_on_torch_holds_bounded_memory(tiny_llama_dir):
    _soak(torch_chat_model(load_checkpoint(tiny_llama_dir)), "torch")


def test_a_long_dialogue_on_onnxruntime_holds_bounded_memory(tiny_llama_dir, tmp_path_factory):
    from belle_edge.api import load
    from belle_edge.compile.pipeline import CompileConfig, compile_model

    out = str(tmp_path_factory.mktemp("soak") / "art")
    compile_model(CompileConfig(out=out, model=tiny_llama_dir), progress=False)
    _soak(load(out), "onnxruntime")
