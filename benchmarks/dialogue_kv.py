"""KV tokens held, time to first token and decode speed per turn over a long scripted dialogue,
turn window (W=3, S=4) against the mask off, default model on the torch backend (CPU).

    .venv/bin/python benchmarks/dialogue_kv.py --turns 50 --out benchmarks/results

Writes ``dialogue_kv.json`` and ``dialogue_kv.md``. The two sessions run turn by turn interleaved, so the
machine's noise hits both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import belle_edge

MESSAGES = [
    "你好！我想查询一下我的订单。", "Hello! Can you help me track my order?", "订单号是 20261126001。",
    "When will it arrive?", "可以帮我改一下收货地址吗？", "What is your return policy?",
    "这件衣服有别的颜色吗？", "Please recommend a gift for my mother.", "谢谢，你真有耐心！",
    "Summarize our conversation in one sentence.",
]


def run(turns: int, max_new_tokens: int, window: int, sinks: int, model_path: str | None) -> dict:
    model = belle_edge.load(model_path)
    capacity = min(model.max_positions, 8192)
    sessions = {
        "window": model.session(window=window, sinks=sinks, max_new_tokens=max_new_tokens, max_kv_tokens=capacity),
        "off": model.session(window=None, max_new_tokens=max_new_tokens, max_kv_tokens=capacity),
    }
    rows = []
    for i in range(turns):
        message = MESSAGES[i % len(MESSAGES)]
        row = {"turn": i + 1, "user": message}
        for name, session in sessions.items():
            try:
                stats = session.send(message).stats
                row[name] = {"kv_tokens": stats.kv_tokens, "ttft_ms": round(stats.ttft_ms, 1),
                             "decode_tok_s": round(stats.decode_tok_s, 2), "prompt_tokens": stats.prompt_tokens,
                             "new_tokens": stats.new_tokens, "evicted": stats.evicted_tokens}
            except belle_edge.BelleEdgeError as e:  # the mask-off session may run out of room: say so
                row[name] = {"error": str(e)}
        rows.append(row)
        print(f"turn {i + 1:3d}: kv window {row['window'].get('kv_tokens', '-'):>5}  "
              f"off {row['off'].get('kv_tokens', '-'):>5}", flush=True)
    return {"model": model.name, "window": window, "sinks": sinks, "max_new_tokens": max_new_tokens, "rows": rows}


def summarize(result: dict) -> dict:
    out = {}
    for name in ("window", "off"):
        ok = [r[name] for r in result["rows"] if "kv_tokens" in r[name]]
        out[name] = {
            "median_ttft_ms": statistics.median(r["ttft_ms"] for r in ok),
            "median_decode_tok_s": statistics.median(r["decode_tok_s"] for r in ok if r["decode_tok_s"] > 0),
            "max_kv_tokens": max(r["kv_tokens"] for r in ok),
            "final_kv_tokens": ok[-1]["kv_tokens"],
            "turns_completed": len(ok),
        }
    return out


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [f"# Dialogue KV benchmark: {result['model']}, {len(result['rows'])} turns, "
             f"W={result['window']} S={result['sinks']} vs mask off, max {result['max_new_tokens']} new tokens",
             "", f"Machine: {result['machine']}", "",
             "| | median TTFT ms | median decode tok/s | max KV tokens | KV tokens after last turn |",
             "|---|---|---|---|---|"]
    for name in ("window", "off"):
        v = s[name]
        lines.append(f"| {name} | {v['median_ttft_ms']:.0f} | {v['median_decode_tok_s']:.1f} | "
                     f"{v['max_kv_tokens']} | {v['final_kv_tokens']} |")
    lines += ["", "| turn | KV window | KV off | TTFT window ms | TTFT off ms |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        w, o = r["window"], r["off"]
        lines.append(f"| {r['turn']} | {w.get('kv_tokens', 'error')} | {o.get('kv_tokens', 'error')} | "
                     f"{w.get('ttft_ms', '-')} | {o.get('ttft_ms', '-')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--turns", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    t0 = time.time()
    result = run(args.turns, args.max_new_tokens, args.window, args.sinks, args.model)
    result["machine"] = f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, {platform.python_version()}"
    result["summary"] = summarize(result)
    result["seconds"] = round(time.time() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dialogue_kv.json"), "w") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
    with open(os.path.join(args.out, "dialogue_kv.md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result).split("| turn |")[0])


if __name__ == "__main__":
    main()
