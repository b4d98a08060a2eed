"""The training subpackage's real run, on this machine's CPU in bounded time:

1. LoRA SFT of the default model (SmolLM2-135M) on a small Chinese e-commerce customer-service set
   (``belle_edge/data/ecommerce_train.jsonl``), replies scored on the held-out set
   (``ecommerce_held_out.jsonl``) before and after: BLEU-4, ROUGE-L (character, jieba word), perplexity on
   reply tokens;
2. distillation of the 43%-pruned default model (``belle-edge prune --ratio 0.43``, the solver's mix) from
   the unpruned model: fidelity (KL, top-1, perplexity ratio) on held-out text before and after.

    .venv/bin/python benchmarks/training.py --pruned /work/pruned/0.43-mix --work /tmp/belle_train

Writes ``training.json`` and ``training.md`` (``--out``). The SFT settings are the seed recipe's
(``belle_edge/train/configs/sft.json``) except where a 135M model, 300 turns and a CPU budget need other
values; those overrides are listed in the output.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from belle_edge.evaluate.fidelity import eval_fidelity
from belle_edge.evaluate.replies import run_eval
from belle_edge.train.distill import DEFAULT_DISTILL_CONFIG, run_distill
from belle_edge.train.sft import run_merge, run_sft
from belle_edge.train.trainer import DEFAULT_SFT_CONFIG, TrainConfig

DATA = os.path.join(os.path.dirname(__file__), "..", "belle_edge", "data")
# The seed recipe (lr 3e-5, batch 16, 3 epochs, 200 warm-up steps) is for a 7B model and ~1M dialogues; on
# 133 dialogues it would take 2 optimizer steps per epoch, all inside the warm-up. A LoRA run this small
# needs a higher rate, smaller batches and a short warm-up.
SFT_OVERRIDES = {"learning_rate": 1e-3, "batch_size": 4, "epochs": 2, "warmup_steps": 3, "max_len": 1024,
                 "held_out": 0.0, "save_every": 10}
DISTILL_OVERRIDES = {"epochs": 2, "max_rows": 64, "learning_rate": 5e-4}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pruned", required=True, help="the 43%% pruned default model (belle-edge prune --out)")
    p.add_argument("--work", default="/tmp/belle_train", help="run folders")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--limit", type=int, help="held-out dialogues to generate for (default all)")
    p.add_argument("--skip-sft", action="store_true")
    p.add_argument("--skip-distill", action="store_true")
    args = p.parse_args()
    train_data, held = os.path.join(DATA, "ecommerce_train.jsonl"), os.path.join(DATA, "ecommerce_held_out.jsonl")
    os.makedirs(args.work, exist_ok=True)
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads"}
    if not args.skip_sft:
        t0 = time.perf_counter()
        before = run_eval(None, held, max_new_tokens=args.max_new_tokens, limit=args.limit)
        eval_s = time.perf_counter() - t0
        cfg = TrainConfig.load(DEFAULT_SFT_CONFIG, SFT_OVERRIDES)
        run = os.path.join(args.work, "sft")
        record = run_sft(None, train_data, run, cfg, resume=True)
        merged = run_merge(run, os.path.join(args.work, "sft-merged"), force=True)
        after = run_eval(merged, held, max_new_tokens=args.max_new_tokens, limit=args.limit)
        result["sft"] = {"overrides": SFT_OVERRIDES, "config": cfg.to_dict(), "parameters": record["parameters"],
                         "data": record["data"], "steps": record["steps"], "train_seconds": record["seconds"],
                         "eval_seconds": round(eval_s, 1), "loss_first": record["history"][0]["loss"],
                         "loss_last": record["history"][-1]["loss"], "before": before, "after": after}
    if not args.skip_distill:
        before = eval_fidelity(args.pruned)
        cfg = TrainConfig.load(DEFAULT_DISTILL_CONFIG, DISTILL_OVERRIDES)
        run = os.path.join(args.work, "distill")
        record = run_distill(args.pruned, None, run, cfg, resume=True)
        after = eval_fidelity(os.path.join(run, "model"))
        result["distill"] = {"student": os.path.abspath(args.pruned), "overrides": DISTILL_OVERRIDES,
                             "config": cfg.to_dict(), "steps": record["steps"], "rows": record["rows"],
                             "train_seconds": record["seconds"], "loss_first": record["history"][0]["loss"],
                             "loss_last": record["history"][-1]["loss"], "before": before, "after": after}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "training.json")
    old = json.load(open(path)) if os.path.isfile(path) else {}
    old.update(result)
    with open(path, "w") as f:
        json.dump(old, f, indent=1, ensure_ascii=False)
    md = to_markdown(old)
    with open(os.path.join(args.out, "training.md"), "w") as f:
        f.write(md)
    print(md)


def to_markdown(r: dict) -> str:
    lines = ["# Training subpackage: real run", "", f"Machine: {r['machine']}.", ""]
    if "sft" in r:
        s = r["sft"]
        lines += ["## LoRA SFT of the default model on the e-commerce set", "",
                  f"{s['data']['train']} dialogues, {s['data']['rows']} packed rows, {s['data']['target_tokens']:,} "
                  f"reply tokens; LoRA rank {s['config']['lora_rank']}: {s['parameters']['trainable']:,} of "
                  f"{s['parameters']['total']:,} parameters trainable ({s['parameters']['share']:.2%}); "
                  f"{s['steps']} steps in {s['train_seconds']:.0f} s; "
                  f"loss {s['loss_first']:.3f} -> {s['loss_last']:.3f}. "
                  f"Overrides of the seed recipe: {s['overrides']}.", "",
                  f"Held-out: {s['before']['dialogues']} dialogues, {s['before']['replies']['scored']} replies "
                  f"(greedy, <= {s['before']['decoding']['max_new_tokens']} new tokens, window "
                  f"{s['before']['decoding']['window']}).", "",
                  "| model | BLEU-4 | ROUGE-L char | ROUGE-L word (jieba) | reply perplexity |",
                  "|---|---|---|---|---|"]
        for name in ("before", "after"):
            e = s[name]
            lines.append(f"| {'base' if name == 'before' else 'LoRA merged'} | {e['replies']['bleu4']} | "
                         f"{e['replies']['rouge_l_char']} | {e['replies']['rouge_l_word']} | "
                         f"{e['assistant_perplexity']['perplexity']} |")
        lines += ["", f"BLEU signature: `{s['after']['replies']['bleu_signature']}`", "", "Samples after:", ""]
        for x in s["after"]["samples"]:
            lines.append(f"- user: {x['user']}  \n  reference: {x['reference']}  \n  reply: {x['reply']}")
        lines.append("")
    if "distill" in r:
        d = r["distill"]
        lines += ["## Distillation of the 43% pruned default model", "",
                  f"Full-parameter, {d['steps']} steps over {d['rows']} rows of calibration text in "
                  f"{d['train_seconds']:.0f} s; loss {d['loss_first']:.3f} -> {d['loss_last']:.3f}.", "",
                  "| text | KL before | KL after | top-1 before | top-1 after | ppl ratio before | ppl ratio after |",
                  "|---|---|---|---|---|---|---|"]
        for name, b in d["before"]["texts"].items():
            a = d["after"]["texts"][name]
            lines.append(f"| {name} | {b['kl_mean']:.3f} | {a['kl_mean']:.3f} | {b['top1_agreement']:.1%} | "
                         f"{a['top1_agreement']:.1%} | {b['ppl_ratio']:.2f} | {a['ppl_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
