"""The GPU benchmark's FlexAttention peer (benchmarks/attention_gpu.py), checked on the CPU: its mask_mod asks
belle_edge.mask.visible about gathered table values, so eager flex_attention with the block mask built from it
must match SDPA given the boolean mask from `visible`, for prefill (queries the last T slots, start > 0) and
decode (T = 1), with the window on (W=1, 2 sinks) and off, on tables with gaps left by eviction, and with GQA."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from belle_edge.mask import MaskConfig, retained, visible
from benchmarks.attention_gpu import flex_mask_mod, flex_peer, render  # must import without CUDA

flex_mod = pytest.importorskip("torch.nn.attention.flex_attention",
                               reason="torch.nn.attention.flex_attention is not in this torch")


def _flex_runs_on_cpu() -> str:
    """'' when eager flex_attention with a block mask works on the CPU in this torch, else why not."""
    try:
        bm = flex_mod.create_block_mask(lambda b, h, q, k: k <= q, None, None, 4, 4, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = torch.randn(1, 1, 4, 16)
            flex_mod.flex_attention(x, x, x, block_mask=bm)
    except Exception as e:  # noqa: BLE001 - any failure means the peer cannot be checked here
        return f"eager flex_attention does not run on the CPU in torch {torch.__version__}: {type(e).__name__}: {e}"
    return ""


_WHY_NOT = _flex_runs_on_cpu()
pytestmark = pytest.mark.skipif(bool(_WHY_NOT), reason=_WHY_NOT)


def _dialogue(seed: int, mask: MaskConfig, evict: bool):
    """Tables (positions, turns) of a dialogue: a system turn 0, then turns 1..7 of random length; the last
    turn is the current one. With `evict`, the earlier keys the current turn can no longer see are gone (as the
    session evicts them), so positions have gaps and slot != position."""
    rng = np.random.default_rng(seed)
    lengths = [6] + list(rng.integers(12, 20, size=7))
    pos = np.arange(sum(lengths))
    turn = np.repeat(np.arange(len(lengths)), lengths)
    current = len(lengths) - 1
    if evict:
        keep = np.asarray(retained(pos, turn, current, mask)) | (turn == current)
        pos, turn = pos[keep], turn[keep]
    return pos, turn, int((turn == current).sum())


@pytest.mark.parametrize("mask", [MaskConfig(window=1, sinks=2), MaskConfig.off()], ids=["W1S2", "Woff"])
@pytest.mark.parametrize("kind", ["prefill", "decode"])
@pytest.mark.parametrize("evict,kv_heads", [(False, 2), (True, 1)], ids=["full-mha", "evicted-gqa"])
def test_flex_peer_matches_sdpa_with_the_visible_mask(mask, kind, evict, kv_heads):
    pos, turn, last_turn = _dialogue(seed=3 + evict, mask=mask, evict=evict)
    n = len(pos)
    t = last_turn if kind == "prefill" else 1
    start = n - t
    assert start > 0 and (evict or 64 <= n <= 130)
    if mask.enabled and evict:
        assert (np.diff(pos) > 1).any(), "eviction should leave gaps in the positions"

    heads, d = 2, 16
    torch.manual_seed(0)
    q = torch.randn(1, heads, t, d)
    k_new, v_new = torch.randn(1, kv_heads, t, d), torch.randn(1, kv_heads, t, d)
    k_cache, v_cache = torch.randn(1, kv_heads, n, d), torch.randn(1, kv_heads, n, d)
    scale = d ** -0.5

    tp, tt = torch.as_tensor(pos), torch.as_tensor(turn)
    allowed = visible(tp[start:, None], tt[start:, None], tp[None], tt[None], mask)  # (T, n)
    assert allowed.any(-1).all()  # every query sees at least itself
    if mask.enabled and not evict:
        assert not allowed.all()  # the window does hide something

    # the mask_mod alone, materialised by flex's own helper, is exactly `visible`
    dense = flex_mod.create_mask(flex_mask_mod(tp, tt, tp, tt, start, mask), 1, 1, t, n, device="cpu")
    assert torch.equal(dense[0, 0], allowed)

    run, block_mask = flex_peer(q, k_new, v_new, k_cache, v_cache, pos, turn, start, mask, scale, compile=False)
    assert block_mask.shape[-2:] == (t, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": on purpose here
        out = run()
    assert out.shape == (1, heads, t, d)
    assert torch.equal(k_cache[:, :, start:], k_new) and torch.equal(v_cache[:, :, start:], v_new)

    group = heads // kv_heads
    keys, values = k_cache.repeat_interleave(group, 1), v_cache.repeat_interleave(group, 1)
    ref = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[None, None], scale=scale)
    assert (out - ref).abs().max().item() < 1e-5


def test_render_shows_flex_and_ceiling_columns_and_failures():
    base = {"keys": 3072, "visible_share": 0.25, "ours_ms": 0.5, "sdpa_masked_ms": 1.0, "speedup": 2.0,
            "max_abs_err": 4e-4}
    rows = [
        dict(base, case="ok", ceiling="SDPA is_causal", ceiling_ms=0.4, ceiling_vs_ours=0.8, flex_ms=0.7,
             speedup_vs_flex=1.4, flex_max_abs_err=5e-4, flex_error=None),
        dict(base, case="broken", ceiling="SDPA no mask (= causal)", ceiling_ms=0.1, ceiling_vs_ours=0.2,
             flex_ms=None, speedup_vs_flex=None, flex_max_abs_err=None,
             flex_error="BackendCompilerFailed: triton | out of\nshared memory"),
        dict(base, case="skipped", ceiling="SDPA is_causal", ceiling_ms=0.4, ceiling_vs_ours=0.8, flex_ms=None,
             speedup_vs_flex=None, flex_max_abs_err=None, flex_error="skipped (--skip-flex)"),
        dict(base, case="old row"),  # a result file from before the peers were added still renders
    ]
    text = render({"device": "GPU", "torch": "x", "kernels": rows})
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert "FlexAttention ms" in table[0] and "ceiling ms" in table[0]
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "| 0.700 | 1.40x | SDPA is_causal | 0.400 | 0.80x |" in text
    assert "failed [1]" in text and "skipped" in text
    assert "[1] FlexAttention failed in broken: BackendCompilerFailed: triton | out of shared memory" in text
