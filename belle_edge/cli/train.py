"""The training side: ``data clean``, ``train sft|merge|distill`` and ``eval`` (reply quality)."""
from __future__ import annotations

import argparse
import json
import os

from ..errors import InputError
from ..evaluate.memory import DEFAULT_SETTINGS as MEMORY_SETTINGS
from .common import info


def register(sub) -> None:
    data = sub.add_parser("data", help="training data tools").add_subparsers(dest="data_command", required=True)
    clean = data.add_parser("clean", help="normalise, de-duplicate, filter and mask PII in BELLE dialogue data")
    clean.add_argument("input", help="BELLE data: JSON lines of conversations or instruction/input/output")
    clean.add_argument("--out", required=True, help="cleaned JSON lines (a report goes to OUT.report.json)")
    clean.add_argument("--model", help="count lengths in this model's tokens (default: qwen2.5-0.5b)")
    clean.add_argument("--min-tokens", type=int, default=2, help="shortest message side kept (default 2)")
    clean.add_argument("--max-tokens", type=int, default=2048, help="longest dialogue kept (default 2048)")
    clean.add_argument("--languages", default="zh,en", help="languages kept (default zh,en)")
    clean.add_argument("--near-duplicate-threshold", type=float, default=0.85, help="MinHash Jaccard (default 0.85)")
    clean.add_argument("--keep-pii", action="store_true", help="do not mask phone, ID-card and e-mail numbers")
    clean.set_defaults(handler=run_data_clean)

    trn = sub.add_parser("train", help="LoRA fine-tuning, distillation, adapter merging")
    trn.set_defaults(handler=run_train)
    tsub = trn.add_subparsers(dest="train_command", required=True)
    sft = tsub.add_parser("sft", help="LoRA fine-tuning on BELLE dialogues (loss on replies, turn-window mask)")
    sft.add_argument("model", nargs="?", help="base checkpoint (default: qwen2.5-0.5b)")
    sft.add_argument("--data", required=True, help="BELLE dialogues (JSON lines)")
    add_train_args(sft, "sft.json")
    merge = tsub.add_parser("merge", help="fold a LoRA run's adapter into a checkpoint compile takes")
    merge.add_argument("run", help="the folder of a `train sft` run")
    merge.add_argument("--out", required=True, help="checkpoint folder to write")
    merge.add_argument("--base", help="base checkpoint (default: the one the run recorded)")
    merge.add_argument("--force", action="store_true", help="replace an existing --out")
    dist = tsub.add_parser("distill", help="recover a pruned model from its teacher (logit KL)")
    dist.add_argument("student", help="the pruned checkpoint (belle-edge prune --out)")
    dist.add_argument("--teacher", help="default: the one named in the student's pruning.json")
    dist.add_argument("--data", action="append", help="text files or BELLE .jsonl (repeatable; default: the "
                                                     "calibration text)")
    add_train_args(dist, "distill.json")

    ev = sub.add_parser("eval", help="reply quality on held-out dialogues: BLEU-4, ROUGE-L, perplexity; with "
                                     "--memory, what the turn window forgets and pinned notes keep")
    ev.add_argument("model", nargs="?", help="checkpoint, or with --memory any model belle-edge loads "
                                             "(default: qwen2.5-0.5b)")
    ev.add_argument("--data", help="held-out BELLE dialogues (JSON lines); required without --memory")
    ev.add_argument("--memory", action="store_true",
                    help="the dialogue-memory probes: a fact stated, asked for d = 1..10 turns later, per setting")
    ev.add_argument("--settings", default=",".join(MEMORY_SETTINGS),
                    help="with --memory: comma-separated settings: off, W<n>, W<n>+rules, W<n>+app "
                         f"(default {','.join(MEMORY_SETTINGS)})")
    ev.add_argument("--probes", help="with --memory: your own probe set (JSON lines, as belle_edge/data/"
                                     "memory_probes.jsonl)")
    ev.add_argument("--plot", help="with --memory: write the accuracy-by-distance plot here (PNG)")
    ev.add_argument("--teacher", help="also the fidelity figures against this model")
    ev.add_argument("--max-new-tokens", type=int, help="per reply (default 64; 32 with --memory, plenty to say a "
                                                       "fact back)")
    ev.add_argument("--limit", type=int, help="first N dialogues only")
    ev.add_argument("--window", type=int, default=3, help="turn window W (default 3; the runtime's)")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(handler=run_eval_command)


def _run_memory(args) -> int:
    from ..api import load
    from ..default_model import DEFAULT
    from ..evaluate.memory import format_table, goal, parse_setting, plot, read_probes, run_memory

    settings = [parse_setting(s) for s in args.settings.split(",") if s.strip()]
    if not settings:
        raise InputError("--settings: name at least one setting, e.g. off,W3,W3+rules")
    dialogues = read_probes(args.probes)[:args.limit]  # a bad probe file fails before the slow load
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        raise InputError(f"--plot {args.plot}: its folder does not exist")
    model = load(args.model or DEFAULT)
    result = run_memory(model, settings, dialogues, max_new_tokens=args.max_new_tokens,
                        progress=not args.no_progress)
    result["goal"] = goal(result["summary"])
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=1, ensure_ascii=False))
        return 0
    print(f"{result['model']} ({result['backend']}): {result['probes']} probes in {result['dialogues']} dialogues")
    print(format_table(result))
    for g in result["goal"]:
        print(f"goal {g['setting']}: far accuracy {g['far_accuracy_vs_off']:.0%} of the window off's (>= 90%), "
              f"KV {g['kv_vs_window']:.0%} of W=3's (<= 110%): {'met' if g['met'] else 'not met'}")
    return 0


def add_train_args(p: argparse.ArgumentParser, default_config: str) -> None:
    p.add_argument("--out", required=True, help="run folder (checkpoints, adapter or model, training.json)")
    p.add_argument("--config", help=f"JSON training config (default: belle_edge/train/configs/{default_config})")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int, help="packed rows per optimizer step (gradient accumulation)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--lora-rank", type=int, help="0 = full-parameter (distill)")
    p.add_argument("--max-len", type=int, help="tokens per packed row")
    p.add_argument("--held-out", type=float, help="share of dialogues kept out of training (sft)")
    p.add_argument("--save-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--lm-weight", type=float, help="distill: weight of the language-model loss")
    p.add_argument("--max-rows", type=int, help="train on a seeded sample of at most N packed rows")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(default_config=default_config)


def run_data_clean(args) -> int:
    from ..core.load import load_tokenizer
    from ..train.clean import CleanConfig, clean_file

    languages = tuple(x.strip() for x in args.languages.split(",") if x.strip())
    config = CleanConfig(min_tokens=args.min_tokens, max_tokens=args.max_tokens, languages=languages,
                         near_duplicate_threshold=args.near_duplicate_threshold, mask_pii=not args.keep_pii)
    tokenizer = load_tokenizer(args.model)
    report = clean_file(args.input, args.out, config, tokenizer=tokenizer)
    print(f"kept {report['output']} of {report['input']} dialogues -> {args.out} (report: {args.out}.report.json)")
    for rule, counts in report["rules"].items():
        shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()
                          if isinstance(v, int) and not isinstance(v, bool) and v)
        shown += "".join(f", {kind} {n} masked" for kind, n in counts.get("masked", {}).items() if n)
        if shown:
            print(f"  {rule:<18}{shown}")
    return 0


def _train_config(args):
    import importlib.resources

    from ..train.trainer import TrainConfig

    path = args.config or str(importlib.resources.files("belle_edge").joinpath("train", "configs",
                                                                               args.default_config))
    overrides = {k: getattr(args, k, None) for k in ("learning_rate", "epochs", "batch_size", "warmup_steps",
                                                    "lora_rank", "max_len", "held_out", "save_every", "seed",
                                                    "lm_weight", "max_rows")}
    return TrainConfig.load(path, overrides)


def run_train(args) -> int:
    if args.train_command == "merge":
        from ..train.sft import run_merge

        out = run_merge(args.run, args.out, base=args.base, force=args.force)
        print(f"wrote {out}: the base model with the adapter folded in; compile it with belle-edge compile {out}")
        return 0
    config = _train_config(args)
    if args.train_command == "sft":
        from ..train.sft import run_sft

        record = run_sft(args.model, args.data, args.out, config, resume=args.resume, progress=not args.no_progress,
                         log=info)
        print(f"trained {record['steps']} steps, final loss {record['history'][-1]['loss']:.4f}; adapter in "
              f"{args.out}/adapter; merge with: belle-edge train merge {args.out} --out MODEL_DIR")
        return 0
    from ..train.distill import run_distill

    record = run_distill(args.student, args.teacher, args.out, config, data=args.data, resume=args.resume,
                         progress=not args.no_progress, log=info)
    print(f"distilled {record['steps']} steps, final loss {record['history'][-1]['loss']:.4f}; model in "
          f"{args.out}/model; measure with: belle-edge eval-fidelity {args.out}/model")
    return 0


def run_eval_command(args) -> int:
    from ..evaluate.generation import format_metrics
    from ..evaluate.replies import run_eval

    if args.max_new_tokens is None:
        args.max_new_tokens = 32 if args.memory else 64
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens: expected >= 1, got {args.max_new_tokens}")
    if args.memory:
        return _run_memory(args)
    if args.data is None:
        raise InputError("eval: --data FILE (held-out dialogues), or --memory for the dialogue-memory probes")
    result = run_eval(args.model, args.data, teacher=args.teacher, max_new_tokens=args.max_new_tokens,
                      limit=args.limit, window=args.window, progress=not args.no_progress)
    if args.json:
        print(json.dumps(result, indent=1, ensure_ascii=False))
        return 0
    print(format_metrics(result["replies"]))
    ppl = result["assistant_perplexity"]
    print(f"perplexity on reference reply tokens: {ppl['perplexity']} per token ({ppl['reply_tokens']} tokens), "
          f"{ppl['char_perplexity']} per character ({ppl['reply_chars']} characters)")
    if "fidelity" in result:
        from ..evaluate.fidelity import format_table

        print(format_table(result["fidelity"]))
    return 0
