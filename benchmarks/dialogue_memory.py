"""What the turn window forgets, and what pinned notes keep: the dialogue-memory probes
(belle_edge/evaluate/memory.py) on the default model, every setting, in one run.

    .venv/bin/python benchmarks/dialogue_memory.py --out benchmarks/results

By default the model is the default model's artifact for this CPU (the one ``belle-edge demo`` compiles and
measures; ONNX Runtime), ``--model`` takes any other. Writes ``dialogue_memory.json`` (every probe's reply),
``dialogue_memory.md`` (the table) and ``dialogue_memory.png`` (accuracy against distance, one line per
setting). The settings run dialogue by dialogue in turn (each dialogue under every setting before the next),
so the machine's noise falls on all of them alike in the times.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

from belle_edge.evaluate.memory import (DEFAULT_SETTINGS, FAR, format_table, goal, parse_setting, plot, read_probes,
                                        run_memory, summarise)
from belle_edge.machine import cpu_name


def _model(path: str | None):
    import belle_edge

    if path is None:
        from belle_edge.compile.for_this_cpu import artifact_for_this_cpu
        from belle_edge.default_model import DEFAULT

        path = artifact_for_this_cpu(DEFAULT, log=print)
    return belle_edge.load(path)


def markdown(result: dict) -> str:
    lines = [f"# Dialogue memory: {result['model']} ({result['backend']}), {result['probes']} probes in "
             f"{result['dialogues']} dialogues", "",
             f"Machine: {result['machine']}. Greedy, at most {result['max_new_tokens']} new tokens per answer (cut "
             f"once it holds the fact), S = {result['sinks']} sinks; {result['seconds']:.0f} s in all.", "",
             "A probe is right when the reply to the question holds the fact (normalised). `d > 3`: the probes "
             f"past a window of 3 turns (d > {FAR}). KV held: tokens in the cache when the question arrives.", "",
             format_table(result), ""]
    for g in result["goal"]:
        lines.append(f"- goal, {g['setting']}: far accuracy {g['far_accuracy_vs_off']:.0%} of the window off's "
                     f"(needs >= 90%), KV held {g['kv_vs_window']:.0%} of W3's (needs <= 110%): "
                     f"**{'met' if g['met'] else 'not met'}**")
    kinds = sorted({k for s in result["summary"].values() for k in s["accuracy_far_by_kind"]})
    lines += ["", "Accuracy at d > 3 by kind of fact:", "",
              "| setting | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, s in result["summary"].items():
        cells = [s["accuracy_far_by_kind"].get(k) for k in kinds]
        lines.append(f"| {name} | " + " | ".join("—" if c is None else f"{100 * c:.0f}%" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="any model belle-edge loads (default: the default model's artifact for this CPU)")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS))
    p.add_argument("--limit", type=int, help="first N dialogues only")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    settings = [parse_setting(s) for s in args.settings.split(",")]
    dialogues = read_probes()[:args.limit]
    model = _model(args.model)
    t0 = time.time()
    rows = []
    for i, dialogue in enumerate(dialogues, 1):  # every setting per dialogue, so noise falls on all alike
        part = run_memory(model, settings, [dialogue], max_new_tokens=args.max_new_tokens, progress=False)
        rows += part["rows"]
        right = {s.name: sum(r["right"] for r in part["rows"] if r["setting"] == s.name) for s in settings}
        print(f"{i:2d}/{len(dialogues)} {dialogue['id']:<16} " + " ".join(f"{k} {v}" for k, v in right.items()),
              flush=True)
    result = {**part, "rows": rows, "probes": sum(len(d["asks"]) for d in dialogues), "dialogues": len(dialogues),
              "summary": summarise(rows, [s.name for s in settings]), "seconds": round(time.time() - t0, 1),
              "machine": f"{platform.node()}, {cpu_name()}, {os.cpu_count()} cores ({platform.machine()}), "
                         f"Python {platform.python_version()}"}
    result["goal"] = goal(result["summary"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dialogue_memory.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
    with open(os.path.join(args.out, "dialogue_memory.md"), "w", encoding="utf-8") as f:
        f.write(markdown(result))
    plot(result, os.path.join(args.out, "dialogue_memory.png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
