"""The fused turn-window attention on a CUDA GPU, against the obvious alternatives, in one run.

    python benchmarks/attention_gpu.py --out benchmarks/results        # on a machine with CUDA

1. prefill kernel vs torch SDPA given the materialised turn-window mask: 12 turns x 256 tokens, W=3, S=4,
   32 heads, head dim 128, fp16 (goal: W=3 >= 2x SDPA+mask and >= 1.2x FlexAttention);
2. decode kernel vs SDPA at 8k cached tokens (goal: W=3 >= 1.5x SDPA+mask);
3. end to end, batch 1 (and batch 4 through the batched engine's pool), fp16, a 3B-shaped LLaMA (Llama-3.2-3B's shape) with random weights made on the GPU:
   decode tokens/s of our torch backend (kernels + CUDA graphs) against transformers' generate on the same
   weights (goal >= 2x), and as a share of the memory roofline (weight bytes per token / measured copy
   bandwidth; goal >= 70%);
4. the dialogue effect: decode tokens/s at turn 20 of a long dialogue, W=3 (with eviction) against W off.

Every kernel case runs, on the same inputs and timed the same way, with the same work (write the new K/V
into the cache, attend over it):

- ours: ``belle::dynamic_mask_attention`` (belle_edge/ops/attention.py);
- SDPA+mask: torch SDPA given the boolean mask materialised by :func:`belle_edge.mask.visible`;
- FlexAttention: ``torch.compile``d ``flex_attention`` with a ``mask_mod`` that gathers the position/turn
  tables and asks :func:`belle_edge.mask.visible` (:func:`flex_mask_mod`); its block mask is built once per
  turn layout, outside the timing. If it fails on this GPU the row says why and the run goes on
  (``--skip-flex`` leaves it out);
- the ceiling: plain SDPA with no turn window at all, i.e. the fastest dense kernel torch picks for these
  shapes. ``is_causal=True`` when the queries are all the keys (prefill from slot 0); with one query (decode)
  no mask, which is causal for the last slot; otherwise (queries the last T < keys) no mask over the same
  keys, which is more work than causal, so there it is a loose ceiling. Its output is not the turn-window
  answer and is not compared.

Timings: per call, the median over repeats of the mean of 50 back-to-back calls between one pair of CUDA
events, after a warm-up (one call per event pair would mostly time the host's launch cost). All variants
run in the same process.
Writes attention_gpu.json and attention_gpu.md to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from belle_edge.mask import WINDOW_OFF, MaskConfig, retained, visible
from belle_edge.targets import target_for_device

try:  # run as a script (python benchmarks/attention_gpu.py) or imported as benchmarks.attention_gpu
    from weight_only_gpu import gemv_rows, prefill_row, weight_bytes_per_token, weight_only_e2e
    from weight_only_gpu import render as render_weight_only
except ImportError:
    from benchmarks.weight_only_gpu import gemv_rows, prefill_row, weight_bytes_per_token, weight_only_e2e
    from benchmarks.weight_only_gpu import render as render_weight_only


def cuda_time(fn, repeats: int = 20, warmup: int = 3, inner: int = 50) -> float:
    """Milliseconds per fn() call on the GPU: the median over `repeats` of the mean of `inner` back-to-back
    calls between one pair of CUDA events, after `warmup` calls. (Back to back, the host queues launches
    while the GPU works, so its fixed cost per call is hidden wherever the GPU work is longer.)"""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def _tables(turn_lengths, device):
    pos = np.arange(sum(turn_lengths))
    turn = np.repeat(np.arange(len(turn_lengths)), turn_lengths)
    return pos, turn


def _op_args(pos, turn, start, mask, cap, device):
    row = lambda a: torch.as_tensor(a, device=device)[None]  # noqa: E731
    return dict(start=torch.tensor([start], dtype=torch.int32, device=device), q_pos=row(pos[start:]),
                q_turn=row(turn[start:]), k_pos=row(pos), k_turn=row(turn),
                window=torch.tensor([WINDOW_OFF if mask.window is None else mask.window], device=device),
                sinks=torch.tensor([mask.sinks], device=device), alibi_slopes=None, rope_inv_freq=None,
                max_keys=cap)


def flex_mask_mod(q_pos, q_turn, k_pos, k_turn, start: int, mask: MaskConfig):
    """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` for the turn-window mask: :func:`visible` on the
    tables' values at the query's slot ``start + q_idx`` and the key's slot ``kv_idx``.

    Tables are 1-D integer tensors on the attention's device. The queries are the last T slots: pass the
    full tables (every key's slot) for both and ``start`` = slots before the queries, or the queries' own
    rows as q_pos/q_turn and ``start=0``."""

    def mask_mod(b, h, q_idx, kv_idx):
        qi = q_idx + start
        return visible(q_pos[qi], q_turn[qi], k_pos[kv_idx], k_turn[kv_idx], mask)

    return mask_mod


_flex_compiled = None


def compiled_flex_attention():
    """``torch.compile(flex_attention)``, made once per process (as PyTorch documents it for speed); shapes
    are specialised (``dynamic=False``), each case compiles its own kernel."""
    global _flex_compiled
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def flex_peer(q, k_new, v_new, k_cache, v_cache, pos, turn, start: int, mask: MaskConfig, scale: float,
              compile: bool = True):
    """FlexAttention doing the others' work: write k_new/v_new into the cache at [start, start + T), attend
    q (B, H, T, D) over the cache's first len(pos) slots with the turn-window mask. pos/turn: every key
    slot's position and turn (numpy or torch). The block mask is built here, once; returns (fn, block_mask),
    fn() -> (B, H, T, D). ``compile=False`` runs eager flex_attention (unfused; for tests on the CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = q.device
    n, t = len(pos), q.shape[2]
    p, tu = torch.as_tensor(pos, device=dev), torch.as_tensor(turn, device=dev)
    block_mask = create_block_mask(flex_mask_mod(p, tu, p, tu, start, mask), None, None, t, n, device=dev)
    attend = compiled_flex_attention() if compile else flex_attention
    gqa = k_cache.shape[1] != q.shape[1]
    keys, values = k_cache[:, :, :n], v_cache[:, :, :n]

    def run():
        k_cache[:, :, start:start + t] = k_new
        v_cache[:, :, start:start + t] = v_new
        return attend(q, keys, values, block_mask=block_mask, scale=scale, enable_gqa=gqa)

    return run, block_mask


def attention_case(name, turn_lengths, new_tokens, mask, heads=32, head_dim=128, dtype=torch.float16,
                   flex=True):
    """Our op against SDPA with the materialised mask, FlexAttention with the same mask and plain SDPA
    without it (the ceiling), same inputs; returns a result row."""
    from belle_edge.ops.attention import dynamic_mask_attention

    dev = "cuda"
    pos, turn = _tables([0] + list(turn_lengths), dev)
    n = len(pos)
    start = n - new_tokens
    q = torch.randn(1, heads, new_tokens, head_dim, device=dev, dtype=dtype)
    k = torch.randn(1, heads, new_tokens, head_dim, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    kc = torch.randn(1, heads, n, head_dim, device=dev, dtype=dtype)
    vc = torch.randn_like(kc)
    args = _op_args(pos, turn, start, mask, n, dev)
    scale = head_dim ** -0.5
    ours = lambda: dynamic_mask_attention(q, k, v, kc, vc, **args, scale=scale)  # noqa: E731
    allowed = visible(torch.as_tensor(pos[start:], device=dev)[:, None], torch.as_tensor(turn[start:], device=dev)[:, None],
                      torch.as_tensor(pos, device=dev)[None], torch.as_tensor(turn, device=dev)[None], mask)

    def sdpa():  # the same work done the plain way: write the cache, attend with the materialised mask
        kc[:, :, start:] = k
        vc[:, :, start:] = v
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=allowed[None, None], scale=scale)

    causal = new_tokens == n  # is_causal is top-left aligned: right only when the queries are all the keys
    ceiling_kind = "SDPA is_causal" if causal else "SDPA no mask" + (" (= causal)" if new_tokens == 1 else "")

    def ceiling():  # the same work without the turn window: the fastest plain kernel for these shapes
        kc[:, :, start:] = k
        vc[:, :, start:] = v
        return F.scaled_dot_product_attention(q, kc, vc, is_causal=causal, scale=scale)

    ref = sdpa().transpose(1, 2).reshape(1, new_tokens, -1)
    err = (ours().float() - ref.float()).abs().max().item()
    t_ours, t_sdpa, t_ceiling = cuda_time(ours), cuda_time(sdpa), cuda_time(ceiling)
    visible_share = allowed.float().mean().item()
    row = {"case": name, "new_tokens": new_tokens, "keys": n, "window": mask.window, "ours_ms": round(t_ours, 4),
           "sdpa_masked_ms": round(t_sdpa, 4), "speedup": round(t_sdpa / t_ours, 2),
           "visible_share": round(visible_share, 3), "max_abs_err": err,
           "ceiling": ceiling_kind, "ceiling_ms": round(t_ceiling, 4), "ceiling_vs_ours": round(t_ceiling / t_ours, 2),
           "flex_ms": None, "speedup_vs_flex": None, "flex_max_abs_err": None, "flex_error": None}
    if not flex:
        row["flex_error"] = "skipped (--skip-flex)"
        return row
    try:  # a peer failing (compile error, unsupported shape) is a finding, not the end of the run
        run, _ = flex_peer(q, k, v, kc, vc, pos, turn, start, mask, scale)
        out = run()
        torch.cuda.synchronize()
        row["flex_max_abs_err"] = (out.transpose(1, 2).reshape(1, new_tokens, -1).float() - ref.float()).abs().max().item()
        t_flex = cuda_time(run)
        row.update(flex_ms=round(t_flex, 4), speedup_vs_flex=round(t_flex / t_ours, 2))
    except Exception as e:
        row["flex_error"] = f"{type(e).__name__}: {e}".strip()[:600]
        print(f"FlexAttention failed in {name!r}: {row['flex_error']}")
    return row


def memory_bandwidth_gb_s(size_mb: int = 2048) -> float:
    x = torch.empty(size_mb * 2**20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_time(lambda: y.copy_(x), repeats=10)
    return 2 * x.numel() / (ms / 1e3) / 1e9


def make_3b(dtype=torch.float16):
    """A Llama-3.2-3B-shaped model with random weights on the GPU: (transformers model, our Decoder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from belle_edge.models import llama
    from belle_edge.models.decoder import Decoder

    hf = LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                     num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                     rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(hf).to(dtype).eval()
    cfg = llama.config_from_hf(hf.to_dict(), where="3b")
    sd = llama.state_dict_from_hf(dict(model.state_dict()), cfg, where="3b")
    decoder = Decoder.from_state_dict(cfg, sd, dtype=dtype, device="cuda")  # shares the tensors
    return model, decoder




def ours_decode(decoder, prompt, new_tokens, capacity=4096):
    from belle_edge.runtime.backends.torch_backend import TorchBackend

    backend = TorchBackend(decoder, capacity, fused=True, cuda_graphs=True)
    mask = MaskConfig.off()
    pos = np.arange(len(prompt))
    turns = np.ones(len(prompt), dtype=np.int64)
    logits = backend.forward(prompt, pos, turns, mask=mask)
    token, times = int(logits.argmax()), []
    for i in range(new_tokens):
        p = backend.n
        t0 = time.perf_counter()
        logits = backend.forward(np.array([token]), np.array([p]), np.array([1]), mask=mask)
        times.append(time.perf_counter() - t0)
        token = int(logits.argmax())
    return 1.0 / statistics.median(times[2:])  # after the capture


def batched_decode(decoder, prompt_len: int = 64, steps: int = 24, batches=(1, 4), capacity: int = 1024) -> dict:
    """The batched engine's pool (runtime/backends/torch_pool.py; on CUDA its decode steps go through our
    kernels): aggregate decode tokens/s with 1 and 4 sequences decoding together, same pool, same run."""
    from belle_edge.runtime.backends.torch_pool import TorchPool

    pool = TorchPool(decoder, max(batches), capacity)
    mask = MaskConfig(window=3, sinks=4)
    rng = np.random.default_rng(1)
    for slot in range(max(batches)):
        ids = rng.integers(0, decoder.cfg.vocab_size, prompt_len)
        pool.forward_rows([(slot, ids, np.arange(prompt_len), np.ones(prompt_len, dtype=np.int64))], mask=mask)
    out = {"fused": pool.fused}
    for b in batches:
        times = []
        for _ in range(steps):
            rows = [(s, np.array([7]), np.array([pool.n(s)]), np.array([1])) for s in range(b)]
            t0 = time.perf_counter()
            pool.forward_rows(rows, mask=mask)  # returns host logits: the step has finished
            times.append(time.perf_counter() - t0)
        out[f"batch{b}_tok_s"] = round(b / statistics.median(times[2:]), 1)
    out["ratio"] = round(out[f"batch{batches[-1]}_tok_s"] / out[f"batch{batches[0]}_tok_s"], 2)
    return out


def profile_decode(decoder, prompt, steps: int = 8, top: int = 12) -> list[dict]:
    """Where a fused decode step's GPU time goes: the top kernels by total time over a few eager steps."""
    from torch.profiler import ProfilerActivity, profile

    from belle_edge.runtime.backends.torch_backend import TorchBackend

    backend = TorchBackend(decoder, 1024, fused=True, cuda_graphs=False)
    mask = MaskConfig.off()
    pos = np.arange(len(prompt))
    turns = np.ones(len(prompt), dtype=np.int64)
    backend.forward(prompt, pos, turns, mask=mask)

    def step():
        backend.forward(np.array([1]), np.array([backend.n]), np.array([1]), mask=mask)

    step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:top]:
        rows.append({"kernel": e.key[:90], "calls_per_step": e.count / steps,
                     "us_per_step": round(e.device_time_total / steps, 1)})
    return rows


def transformers_decode(model, prompt, new_tokens):
    ids = torch.as_tensor(prompt, device="cuda")[None]
    kwargs = dict(do_sample=False, pad_token_id=0)

    def run(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(4)
    first = statistics.median(run(1) for _ in range(3))
    full = statistics.median(run(new_tokens) for _ in range(2))
    return (new_tokens - 1) / (full - first)


def dialogue_turn20(decoder, turns=20, user=192, reply=64, window=3, capacity=6144):
    """Decode tokens/s in the last turn, after `turns` turns of `user` prompt + `reply` decode tokens."""
    from belle_edge.runtime.backends.torch_backend import TorchBackend

    mask = MaskConfig(window=window, sinks=4) if window is not None else MaskConfig.off()
    backend = TorchBackend(decoder, capacity, fused=True, cuda_graphs=True)
    rng = np.random.default_rng(0)
    p, rate = 0, 0.0
    for turn in range(1, turns + 1):
        if mask.enabled and backend.n:  # the session's eviction: what no later query can see
            backend.keep(np.flatnonzero(retained(backend.keys.positions, backend.keys.turns, turn, mask)))
        ids = rng.integers(0, decoder.cfg.vocab_size, user)
        p += user
        logits = backend.forward(ids, np.arange(p - user, p), np.full(user, turn), mask=mask)
        token, times = int(logits.argmax()), []
        for _ in range(reply):
            t0 = time.perf_counter()
            logits = backend.forward(np.array([token]), np.array([p]), np.array([turn]), mask=mask)
            times.append(time.perf_counter() - t0)
            token, p = int(logits.argmax()), p + 1
        rate = 1.0 / statistics.median(times[2:])
    return {"window": window, "turn": turns, "kv_tokens": backend.n, "decode_tok_s": round(rate, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--skip-e2e", action="store_true", help="kernel figures only (no 3B model)")
    ap.add_argument("--skip-flex", action="store_true", help="leave the FlexAttention peer out (no torch.compile)")
    ap.add_argument("--skip-weight-only", action="store_true", help="leave the INT4/INT8 GEMV and decode figures out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_gpu: no CUDA GPU on this machine")
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": []}
    w3 = MaskConfig(window=3, sinks=4)
    flex = not args.skip_flex
    result["kernels"].append(attention_case("prefill 12 turns x 256, W=3", [256] * 12, 3072, w3, flex=flex))
    result["kernels"].append(attention_case("prefill 12 turns x 256, W off", [256] * 12, 3072, MaskConfig.off(),
                                            flex=flex))
    result["kernels"].append(attention_case("decode, 8k cached, W off", [256] * 32, 1, MaskConfig.off(), flex=flex))
    result["kernels"].append(attention_case("decode, 8k cached (not evicted), W=3", [256] * 32, 1, w3, flex=flex))
    for row in result["kernels"]:
        print(json.dumps(row))
    save(result, args.out)
    bw = memory_bandwidth_gb_s()
    result["copy_bandwidth_gb_s"] = round(bw, 1)
    if not args.skip_weight_only:
        result["gemv"] = gemv_rows(cuda_time, bw)
        for row in result["gemv"]:
            print(json.dumps(row))
        result["prefill_gemm"] = prefill_row(cuda_time)
        print(json.dumps(result["prefill_gemm"]))
        save(result, args.out)
    if not args.skip_e2e:
        model, decoder = make_3b()
        decoder.fuse_projections()  # as torch_chat_model does on CUDA: q/k/v and gate/up as one GEMV each
        prompt = np.random.default_rng(0).integers(0, decoder.cfg.vocab_size, 64)
        wbytes = weight_bytes_per_token(decoder)
        ours = ours_decode(decoder, prompt, 128)
        theirs = transformers_decode(model, prompt, 128)
        roof = bw * 1e9 / wbytes
        target = target_for_device(torch.cuda.get_device_name())  # the spec sheet's peak, from targets.py
        spec_roof = target.roofline_tok_s(wbytes) if target else None
        result["e2e"] = {"model": "Llama-3.2-3B shape, random fp16 weights", "params": sum(
            p.numel() for p in decoder.parameters()), "weight_bytes_per_token": wbytes, "copy_bandwidth_gb_s": round(bw, 1),
            "ours_decode_tok_s": round(ours, 1), "transformers_decode_tok_s": round(theirs, 1),
            "speedup": round(ours / theirs, 2), "roofline_tok_s": round(roof, 1),
            "roofline_share": round(ours / roof, 3),
            "target": target.name if target else None, "target_bandwidth_gb_s": target.bandwidth_gbs if target else None,
            "target_roofline_tok_s": round(spec_roof, 1) if spec_roof else None,
            "target_roofline_share": round(ours / spec_roof, 3) if spec_roof else None}
        print(json.dumps(result["e2e"]))
        save(result, args.out)
        try:
            result["decode_profile"] = profile_decode(decoder, prompt)
            total = sum(r["us_per_step"] for r in result["decode_profile"])
            print(f"decode step profile (top kernels, {total:.0f} us/step of GPU time among them):")
            for r in result["decode_profile"]:
                print(f"  {r['us_per_step']:8.1f} us  x{r['calls_per_step']:.0f}  {r['kernel']}")
        except Exception as e:  # the profiler is an aid, not a figure the run depends on
            print(f"decode profile skipped: {type(e).__name__}: {e}")
        del model
        result["batched"] = batched_decode(decoder)
        print(json.dumps(result["batched"]))
        result["dialogue"] = [dialogue_turn20(decoder, window=w) for w in (3, None)]
        for row in result["dialogue"]:
            print(json.dumps(row))
        if not args.skip_weight_only:
            result["weight_only_e2e"] = weight_only_e2e(decoder, prompt, ours_decode, bw, ours)
            for row in result["weight_only_e2e"]:
                print(json.dumps(row))
    save(result, args.out)
    print(render(result))


def save(result: dict, out: str) -> None:
    """Write what has been measured so far (called after each part: a run stopped by a time limit keeps
    the parts it finished)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "attention_gpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "attention_gpu.md"), "w") as f:
        f.write(render(result))


def _ms(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _x(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _err(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def render(r: dict) -> str:
    lines = [f"# Fused turn-window attention on {r['device']} (torch {r['torch']})", "",
             "Per call, same work (cache write + attention) for every column. Speedups are ours against each; "
             "the ceiling is plain SDPA without the turn window (causal, or no mask; see the module docstring), "
             "and ceiling/ours above 1x means ours beats it.", "",
             "| case | keys | visible | ours ms | SDPA+mask ms | vs SDPA+mask | FlexAttention ms | vs Flex "
             "| ceiling | ceiling ms | ceiling/ours | max abs err | Flex max abs err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for k in r["kernels"]:
        flex_ms = _ms(k.get("flex_ms"))
        why = k.get("flex_error")
        if k.get("flex_ms") is None and why:
            if why.startswith("skipped"):
                flex_ms = "skipped"
            else:
                notes.append(f"[{len(notes) + 1}] FlexAttention failed in {k['case']}: " + " ".join(why.split()))
                flex_ms = f"failed [{len(notes)}]"
        lines.append(f"| {k['case']} | {k['keys']} | {k['visible_share']:.0%} | {k['ours_ms']:.3f} | "
                     f"{k['sdpa_masked_ms']:.3f} | {k['speedup']:.2f}x | {flex_ms} | {_x(k.get('speedup_vs_flex'))} | "
                     f"{k.get('ceiling', '-')} | {_ms(k.get('ceiling_ms'))} | {_x(k.get('ceiling_vs_ours'))} | "
                     f"{k['max_abs_err']:.1e} | {_err(k.get('flex_max_abs_err'))} |")
    if notes:
        lines += [""] + notes
    if "e2e" in r:
        e = r["e2e"]
        lines += ["", f"End to end ({e['model']}, {e['params'] / 1e9:.2f}B params, batch 1): ours "
                  f"{e['ours_decode_tok_s']} tok/s, transformers generate {e['transformers_decode_tok_s']} tok/s "
                  f"({e['speedup']}x); roofline {e['roofline_tok_s']} tok/s at {e['copy_bandwidth_gb_s']} GB/s copy "
                  f"bandwidth -> {e['roofline_share']:.0%} of it" + (
                      f"; {e['target_roofline_share']:.0%} of the {e['target']} spec roofline "
                      f"({e['target_roofline_tok_s']} tok/s at {e['target_bandwidth_gb_s']} GB/s)."
                      if e.get("target_roofline_tok_s") else ".")]
    if "batched" in r:
        b = r["batched"]
        lines.append(f"- the engine's pool ({'kernels' if b['fused'] else 'reference attention'}): batch 1 "
                     f"{b['batch1_tok_s']} tok/s, batch 4 {b['batch4_tok_s']} tok/s aggregate ({b['ratio']}x)")
    for d in r.get("dialogue", []):
        lines.append(f"- turn {d['turn']}, W={d['window']}: {d['decode_tok_s']} decode tok/s with {d['kv_tokens']} KV tokens")
    lines += render_weight_only(r)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
