"""Structured pruning of a model (default: the default model, Qwen2.5-0.5B) to 43% of its parameters (the
7B -> 3B ratio) and to 70%, by width only, depth only and the solver's mix (``--ratios``, ``--modes``):
fidelity to the unpruned model on held-out text, size on disk and CPU decode speed, the unpruned model
measured in the same run.

    .venv/bin/python benchmarks/pruning.py [MODEL] --out benchmarks/results [--keep DIR] [--modes mix]

Writes ``pruning.json`` and ``pruning.md``. Decode speed: the canonical model on the torch backend's path
(fp32, KV cache), 32-token prompt then ``--decode`` greedy steps, best of ``--repeats``; models are timed
in turn within each repeat so the machine's noise hits them alike. ``--keep DIR`` keeps the pruned
checkpoints (``DIR/<ratio>-<mode>``) for the distillation hand-off.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from belle_edge.core.load import load_checkpoint
from belle_edge.default_model import DEFAULT
from belle_edge.core.fidelity import measure
from belle_edge.core.texts import calibration_description, held_out_texts
from belle_edge.known_models import MODELS
from belle_edge.machine import cpu_name
from belle_edge.mask import MaskConfig
from belle_edge.models.decoder import Decoder
from belle_edge.compile.prune.plan import count_params
from belle_edge.compile.prune.prune import PruneRequest, prune_checkpoint
from belle_edge.core.save import save_checkpoint

RATIOS = (0.43, 0.70)
MODES = ("width", "depth", "mix")


@torch.no_grad()
def decode_seconds_per_token(model: Decoder, steps: int, prompt: int = 32) -> float:
    caches = model.new_caches(prompt + steps + 1)
    ids = torch.arange(1, prompt + 1)[None] % model.cfg.vocab_size
    pos = np.arange(prompt)
    logits = model(ids, pos, np.zeros(prompt, np.int64), MaskConfig.off(), caches=caches, start=0,
                   key_positions=pos, key_turns=np.zeros(prompt, np.int64), last_only=True)
    token = int(logits[0, -1].argmax())
    t0 = time.perf_counter()
    for i in range(prompt, prompt + steps):
        keys = np.arange(i + 1)
        logits = model(torch.tensor([[token]]), np.array([i]), np.zeros(1, np.int64), MaskConfig.off(),
                       caches=caches, start=i, key_positions=keys, key_turns=np.zeros(i + 1, np.int64),
                       last_only=True)
        token = int(logits[0, -1].argmax())
    return (time.perf_counter() - t0) / steps


def _decoder(path: str) -> Decoder:
    ckpt = load_checkpoint(path)
    return Decoder.from_state_dict(ckpt.config, ckpt.state_dict)


def run(args) -> dict:
    teacher_ckpt = load_checkpoint(args.model)
    teacher = Decoder.from_state_dict(teacher_ckpt.config, teacher_ckpt.state_dict)
    before = count_params(teacher_ckpt.config)
    texts = held_out_texts()
    keep_root = args.keep or tempfile.mkdtemp(prefix="belle_prune_")
    rows, models = [], {"unpruned": teacher}
    for ratio in args.ratios:
        for mode in args.modes:
            name = f"{ratio:.2f}-{mode}"
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            result = prune_checkpoint(teacher_ckpt, PruneRequest(ratio=ratio, mode=mode, calibration_tokens=args.calibration_tokens))
            seconds = time.perf_counter() - t0
            student_ckpt = result.checkpoint
            student = Decoder.from_state_dict(student_ckpt.config, student_ckpt.state_dict)
            fid = measure(teacher, teacher_ckpt.tokenizer, student, student_ckpt.tokenizer, texts=texts,
                          tokens=args.tokens)
            record = {**result.record, "fidelity": fid, "teacher": {"path": args.model, "source": teacher_ckpt.source}}
            out = save_checkpoint(student_ckpt, os.path.join(keep_root, name), force=True, tokenizer_config=result.tokenizer_config,
                                  records={"pruning.json": record})
            size = os.path.getsize(os.path.join(out, "model.safetensors"))
            models[name] = out  # timed from disk below: a 0.5B teacher and four students do not fit in 24 GB
            rows.append({"name": name, "ratio": ratio, "mode": mode, "params": result.plan.params_after,
                         "target": result.plan.target, "deviation": round(result.plan.deviation, 4),
                         "shape": result.plan.to_dict()["shape_after"], "layers_kept": result.record["layers_kept"],
                         "bytes_fp32": size, "prune_seconds": round(seconds, 1), "fidelity": fid["texts"],
                         "path": out})
            del student, student_ckpt, result
    times = {k: [] for k in models}
    for _ in range(args.repeats):
        for k, m in models.items():
            student = m if isinstance(m, Decoder) else _decoder(m)
            times[k].append(decode_seconds_per_token(student, args.decode))
            del student
    base = min(times["unpruned"])
    for row in rows:
        best = min(times[row["name"]])
        row["decode_tok_s"] = round(1 / best, 1)
        row["decode_speedup"] = round(base / best, 2)
    title = MODELS[args.model].title if args.model in MODELS else os.path.basename(teacher_ckpt.source)
    return {"machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads",
            "model": f"{title}{' (default)' if args.model == DEFAULT else ''}, fp32", "params_before": before,
            "calibration": calibration_description(), "held_out": list(texts),
            "unpruned_decode_tok_s": round(1 / base, 1), "held_out_tokens_per_text": args.tokens, "rows": rows}


def _label(text_name: str) -> str:
    """"zh:peoples-daily-199801(second half)" -> "zh peoples-daily-199801": language and source."""
    lang, _, source = text_name.partition(":")
    return f"{lang} {source.split('(')[0].split('.')[0]}"


def to_markdown(r: dict) -> str:
    names = list(r["rows"][0]["fidelity"])
    lines = [f"# Structured pruning of {r['model']}", "",
             f"{r['params_before']:,} parameters before; machine: {r['machine']}; unpruned decode "
             f"{r['unpruned_decode_tok_s']} tok/s. Fidelity on held-out text ({r['held_out_tokens_per_text']} tokens "
             "per text, shared vocabulary): KL(teacher || student), top-1 agreement, perplexity ratio student / "
             "teacher. No recovery training (that is distillation's job).", "",
             f"Calibration: {r.get('calibration', 'default')}. Held out: {', '.join(r.get('held_out', names))}. "
             "A row below its target (vs target < -2%) is a plan whose vocabulary cut alone removes more than "
             "the budget asks: width and depth are then kept whole.", "",
             "| target | mode | params | vs target | layers | hidden | heads q/kv | MLP | vocab | fp32 MB | "
             + " | ".join(f"{_label(n)} KL | {_label(n)} top-1 | {_label(n)} ppl x" for n in names)
             + " | decode tok/s | speedup |",
             "|" + "---|" * (10 + 3 * len(names) + 2)]
    for row in r["rows"]:
        s = row["shape"]
        cells = [f"{row['ratio']:.0%}", row["mode"], f"{row['params'] / 1e6:.1f}M", f"{row['deviation']:+.1%}",
                 str(s["layers"]), str(s["hidden"]), f"{s['kv_heads'] * s['group']}/{s['kv_heads']}",
                 str(s["intermediate"]), f"{s['vocab']:,}", f"{row['bytes_fp32'] / 2**20:.0f}"]
        for n in names:
            f = row["fidelity"][n]
            cells += [f"{f['kl_mean']:.3f}", f"{f['top1_agreement']:.1%}", f"{f['ppl_ratio']:.2f}"]
        cells += [f"{row['decode_tok_s']}", f"{row['decode_speedup']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=DEFAULT, help=f"checkpoint or known model name (default {DEFAULT})")
    p.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=list(RATIOS))
    p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    p.add_argument("--calibration-tokens", type=int, default=PruneRequest.calibration_tokens)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--keep", help="keep the pruned checkpoints here")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    result = run(args)
    os.makedirs(args.out, exist_ok=True)
    stem = "pruning" if args.model == DEFAULT else f"pruning-{os.path.basename(args.model.rstrip('/'))}"
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    md = to_markdown(result)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
