"""Serving figures of the batched engine (belle_edge/runtime/engine.py), same run, same machine.

1. **Concurrency**: 1, 2, 4 and 8 clients, each sending ``--requests`` new conversations one after
   another (greedy, ``--max-tokens`` each) to one engine whose pool holds as many sequences as the most
   clients; the levels run in turn, ``--rounds`` times (this machine's speed drifts); per level:
   aggregate completion tokens/s over the level's wall time, p50/p95 time to first token, mean sequences
   per decode step. Ratios are against 1 client measured in the same run.
2. **Multi-turn reuse**: a conversation of ~``--history-tokens`` tokens (three long exchanges), then its
   next turn. With reuse, the engine still holds the conversation from the turn before and prefills only
   the new message; without, a fresh engine prefills the whole history. Time to first token of that
   same request, both ways, and whether the replies are equal.
3. **Memory** (ONNX Runtime): peak RSS of one dialogue on a ChatSession against the engine's pool.

Runs the engine in-process (no HTTP: the server's own cost on 2 cores would blur what batching does), on
the torch backend (the default model's checkpoint) and on ONNX Runtime (the artifact ``belle-edge demo``
compiles for this CPU, or ``--artifact``). ``python -m benchmarks.serving --out benchmarks/results``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time

from belle_edge.machine import cpu_name

QUESTIONS = ["请介绍一下中国的茶文化。", "我的快递三天了还没到，怎么办？", "推荐几本适合初学者的编程书。",
             "怎样才能睡得更好？", "给我讲一个关于月亮的小故事。", "周末去杭州玩，有什么建议？",
             "如何向孩子解释为什么天空是蓝色的？", "帮我写一段生日祝福。"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint for the torch variant (default: the default model)")
    p.add_argument("--artifact", default=None, help="artifact for the onnxruntime variant (default: the one "
                                                    "`belle-edge demo` compiles for this CPU)")
    p.add_argument("--variants", default="onnxruntime,torch")
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--requests", type=int, default=2, help="conversations per client per level and round")
    p.add_argument("--rounds", type=int, default=2, help="every level this many times, interleaved")
    p.add_argument("--max-tokens", type=int, default=64, help="reply length asked (a short chat answer)")
    p.add_argument("--history-tokens", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--out", default="bench-results")
    return p


def _percentile(values, q):
    values = sorted(values)
    if not values:
        return None
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _level(engine, clients, *, requests, max_tokens):
    """One concurrency level: (generations, wall seconds, decode steps, sequences they carried)."""
    gens, lock = [], threading.Lock()
    steps0, rows0 = engine.pool_steps()

    def client(c):
        for r in range(requests):
            q = QUESTIONS[(c * requests + r) % len(QUESTIONS)]
            gen = engine.submit([{"role": "user", "content": q}], max_tokens=max_tokens)
            "".join(gen)
            with lock:
                gens.append(gen)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    steps, rows = engine.pool_steps()
    return gens, wall, steps - steps0, rows - rows0


def concurrency(model, levels, *, requests, max_tokens, rounds):
    """Each level ``rounds`` times, the levels interleaved round by round (this machine's speed drifts)."""
    from belle_edge.runtime.engine import BatchEngine, EngineConfig

    runs = {c: [] for c in levels}
    with BatchEngine(model, EngineConfig(max_batch=max(levels), kv_tokens=1024, max_queue=64)) as engine:
        "".join(engine.submit([{"role": "user", "content": "你好"}], max_tokens=4))  # warm-up
        for _ in range(rounds):
            for clients in levels:
                runs[clients].append(_level(engine, clients, requests=requests, max_tokens=max_tokens))
    rows = []
    for clients in levels:
        gens = [g for run in runs[clients] for g in run[0]]
        wall = sum(run[1] for run in runs[clients])
        steps, carried = sum(run[2] for run in runs[clients]), sum(run[3] for run in runs[clients])
        tokens = sum(g.completion_tokens for g in gens)
        ttft = [g.ttft_s * 1e3 for g in gens if g.ttft_s is not None]
        rows.append({"clients": clients, "requests": len(gens), "completion_tokens": tokens,
                     "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 2),
                     "ttft_p50_ms": round(_percentile(ttft, 0.5), 1), "ttft_p95_ms": round(_percentile(ttft, 0.95), 1),
                     "occupancy": round(carried / steps, 2) if steps else 0.0})
        print(f"  {clients} clients: {rows[-1]['tok_s']} tok/s, TTFT p50 {rows[-1]['ttft_p50_ms']} ms "
              f"p95 {rows[-1]['ttft_p95_ms']} ms, {rows[-1]['occupancy']} sequences per step", flush=True)
    base = rows[0]["tok_s"]
    for row in rows:
        row["vs_1_client"] = round(row["tok_s"] / base, 2) if base else None
    return rows


def _history(model, target_tokens):
    """Three exchanges of held-out Chinese text, about ``target_tokens`` tokens in all."""
    from belle_edge.core.texts import chinese_held_out

    text = chinese_held_out()
    ids = model.tokenizer.encode(text).ids
    per = max(target_tokens // 3 - 20, 10)
    chunks = [model.tokenizer.decode(ids[i * per:(i + 1) * per]) for i in range(3)]
    users = ["请读一下这段材料。", "接着读下一段。", "还有最后一段。"]
    return [(u, c) for u, c in zip(users, chunks)]


def reuse(model, *, history_tokens, max_tokens, repeats=3):
    from belle_edge.runtime.engine import BatchEngine, EngineConfig

    history = _history(model, history_tokens)
    first = [m for u, r in history for m in ({"role": "user", "content": u}, {"role": "assistant", "content": r})]
    config = EngineConfig(max_batch=1, kv_tokens=2048, window=None)
    warm, cold, same = [], [], True
    for _ in range(repeats):
        with BatchEngine(model, config) as engine:
            gen = engine.submit(first + [{"role": "user", "content": "总结一下。"}], max_tokens=max_tokens)
            reply = "".join(gen)
            held = gen.prompt_tokens
            request = first + [{"role": "user", "content": "总结一下。"}, {"role": "assistant", "content": reply},
                               {"role": "user", "content": "再说得简短一些。"}]
            hit = engine.submit(request, max_tokens=max_tokens)
            text_hit = "".join(hit)
            assert hit.reused, "the second turn did not reuse the conversation's cache"
            warm.append(hit.ttft_s * 1e3)
        with BatchEngine(model, config) as engine:
            miss = engine.submit(request, max_tokens=max_tokens)
            text_miss = "".join(miss)
            cold.append(miss.ttft_s * 1e3)
        same = same and text_hit == text_miss
    row = {"history_tokens": held, "ttft_reuse_ms": round(statistics.median(warm), 1),
           "ttft_no_reuse_ms": round(statistics.median(cold), 1), "replies_equal": same}
    row["speedup"] = round(row["ttft_no_reuse_ms"] / row["ttft_reuse_ms"], 2)
    print(f"  second turn over {held} tokens: TTFT {row['ttft_reuse_ms']} ms with reuse, "
          f"{row['ttft_no_reuse_ms']} ms without ({row['speedup']}x), replies equal: {same}", flush=True)
    return row


MEMORY_SCRIPT = """
import resource, sys
import belle_edge
from belle_edge.runtime.engine import BatchEngine, EngineConfig
model = belle_edge.load(sys.argv[1], backend="onnxruntime")
turns = ["你好，我想查询订单。", "订单号是 20261126001。", "什么时候到？", "可以改地址吗？", "谢谢！"]
if sys.argv[2] == "session":
    session = model.session(max_new_tokens=32, max_kv_tokens=4096)
    for t in turns:
        session.send(t)
else:
    with BatchEngine(model, EngineConfig(max_batch=1, kv_tokens=4096)) as engine:
        history = []
        for t in turns:
            gen = engine.submit(history + [{"role": "user", "content": t}], max_tokens=32)
            history += [{"role": "user", "content": t}, {"role": "assistant", "content": "".join(gen)}]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def memory(folder) -> dict:
    """Peak RSS (MB) of a 5-turn dialogue with 4,096 KV tokens of room: one ChatSession on the single-session
    ONNX Runtime backend (two full-capacity cache buffers, ping-pong) against the engine's pool of one slot
    (one full-capacity buffer + staging for what the step holds); each in its own process."""
    import subprocess
    import sys

    row = {}
    for kind in ("session", "engine"):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, folder, kind], capture_output=True, text=True,
                             check=True).stdout
        row[f"{kind}_peak_rss_mb"] = int(out.strip().splitlines()[-1])
    print(f"  peak RSS, 5 turns, 4096 KV tokens: ChatSession {row['session_peak_rss_mb']} MB, engine (1 slot) "
          f"{row['engine_peak_rss_mb']} MB", flush=True)
    return row


def _artifact(args) -> str:
    if args.artifact is not None:
        return args.artifact
    from belle_edge.compile.for_this_cpu import artifact_for_this_cpu
    from belle_edge.default_model import DEFAULT

    return artifact_for_this_cpu(DEFAULT)


def _load(variant, args):
    from belle_edge import load

    if variant == "torch":
        return load(args.model)
    return load(_artifact(args), threads=args.threads, backend="onnxruntime")


def render(doc) -> str:
    lines = [f"# Batched serving — {doc['machine']}", "",
             f"{doc['date']}; {doc['requests']} conversations per client per level, {doc['max_tokens']} tokens "
             "each, greedy; engine in-process; same run for every row.", ""]
    for v in doc["variants"]:
        lines += [f"## {v['variant']} — {v['model']}", "",
                  "| clients | tok/s (aggregate) | × 1 client | TTFT p50 ms | TTFT p95 ms | sequences per step |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['clients']} | {r['tok_s']} | {r['vs_1_client']} | {r['ttft_p50_ms']} | {r['ttft_p95_ms']} | "
                  f"{r['occupancy']} |" for r in v["concurrency"]]
        r = v["reuse"]
        lines += ["", f"Second turn over a {r['history_tokens']}-token conversation: first token in "
                      f"{r['ttft_reuse_ms']} ms with reuse, {r['ttft_no_reuse_ms']} ms without: **{r['speedup']}×** "
                      f"(replies equal: {r['replies_equal']}).", ""]
        if v.get("memory"):
            m = v["memory"]
            lines += [f"Peak RSS of a 5-turn dialogue with room for 4,096 KV tokens, each in its own process: "
                      f"one ChatSession (the single-session backend's two full-capacity cache buffers) "
                      f"{m['session_peak_rss_mb']} MB; the engine with a pool of one slot {m['engine_peak_rss_mb']} MB.",
                      ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    doc = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d"), "requests": args.requests * args.rounds, "max_tokens": args.max_tokens,
           "variants": []}
    for variant in args.variants.split(","):
        model = _load(variant, args)
        print(f"{variant}: {model.name}", flush=True)
        doc["variants"].append({"variant": variant, "model": model.name,
                                "concurrency": concurrency(model, levels, requests=args.requests,
                                                           max_tokens=args.max_tokens, rounds=args.rounds),
                                "reuse": reuse(model, history_tokens=args.history_tokens, max_tokens=args.max_tokens),
                                "memory": memory(_artifact(args)) if variant == "onnxruntime" else None})
        del model
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "serving.json"), "w") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
    with open(os.path.join(args.out, "serving.md"), "w") as f:
        f.write(render(doc) + "\n")
    print(render(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
