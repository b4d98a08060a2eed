"""The base models side by side on the e-commerce held-out set, before any fine-tuning: what a user gets
from each out of the box in a Chinese customer-service dialogue.

    .venv/bin/python benchmarks/base_models.py [MODEL ...] --out benchmarks/results

Each model answers every held-out turn greedily through the chat session itself (``belle-edge eval``:
earlier turns with their reference replies as context, turn window 3), scored by BLEU-4 (sacrebleu,
Chinese tokenisation), ROUGE-L F1 by character and by jieba word, perplexity on the reference reply
tokens. Writes ``base_models.json`` and ``base_models.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from belle_edge.evaluate.replies import run_eval
from belle_edge.known_models import MODELS
from belle_edge.machine import cpu_name

DATA = os.path.join(os.path.dirname(__file__), "..", "belle_edge", "data", "ecommerce_held_out.jsonl")


def run(args) -> dict:
    rows = []
    for name in args.models:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        result = run_eval(name, DATA, max_new_tokens=args.max_new_tokens, limit=args.limit, progress=True)
        rows.append({"model": name, "title": MODELS[name].title if name in MODELS else name,
                     "seconds": round(time.perf_counter() - t0, 1), **result})
    return {"machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads",
            "data": os.path.relpath(DATA, os.path.dirname(os.path.dirname(__file__))),
            "max_new_tokens": args.max_new_tokens, "rows": rows}


def to_markdown(r: dict) -> str:
    first = r["rows"][0]
    lines = ["# Base models on the e-commerce held-out set (no fine-tuning)", "",
             f"Machine: {r['machine']}. Data: `{r['data']}`, {first['dialogues']} dialogues; greedy replies of at "
             f"most {r['max_new_tokens']} tokens through the chat session (turn window 3, earlier turns with "
             "their reference replies as context). BLEU signature: "
             f"`{first['replies'].get('bleu_signature', '')}`.", "",
             "Reply perplexity is on the reference replies' tokens, in each model's own tokens (not comparable "
             "across tokenizers), and per character of those replies (comparable).", "",
             "| model | replies | BLEU-4 | ROUGE-L char | ROUGE-L word (jieba) | reply tokens | perplexity per token | "
             "perplexity per character | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        m, p = row["replies"], row["assistant_perplexity"]
        lines.append(f"| {row['title']} | {m['scored']} | {m['bleu4']:.2f} | {m['rouge_l_char']:.2f} | "
                     f"{m['rouge_l_word']:.2f} | {p['reply_tokens']:,} | {p['perplexity']:.3f} | {p['char_perplexity']:.2f} | "
                     f"{row['seconds']} |")
    for row in r["rows"]:
        lines += ["", f"Samples, {row['title']}:", ""]
        for s in row["samples"]:
            lines += [f"- user: {s['user']}  ", f"  reference: {s['reference']}  ", f"  reply: {s['reply']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["qwen2.5-0.5b", "smollm2-135m"])
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--limit", type=int, help="first N dialogues only")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    result = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "base_models.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    md = to_markdown(result)
    with open(os.path.join(args.out, "base_models.md"), "w", encoding="utf-8") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
