"""``prune`` (the prune stage alone) and ``eval-fidelity`` (how closely a pruned model follows its teacher)."""
from __future__ import annotations

import argparse
import json
import os

from ..default_model import DEFAULT
from ..errors import InputError
from .common import MODEL_HELP, parameter_count, read_texts


def register(sub) -> None:
    prune = sub.add_parser("prune", help="structured pruning to a parameter budget (vocabulary, width, depth)")
    prune.add_argument("model", nargs="?", help=MODEL_HELP)
    add_prune_args(prune)
    prune.add_argument("--out", help="checkpoint folder to write (Hugging Face layout + pruning.json)")
    prune.add_argument("--force", action="store_true", help="replace an existing --out")
    prune.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    prune.add_argument("--allow-pickle", action="store_true", help="allow .bin pickle weights")
    prune.set_defaults(handler=run_prune)

    fid = sub.add_parser("eval-fidelity", help="KL, top-1 agreement and perplexity ratio of a student to its teacher")
    fid.add_argument("student", help="checkpoint to measure (e.g. the output of belle-edge prune)")
    fid.add_argument("--teacher", help="reference checkpoint (default: the one named in the student's pruning.json; "
                                       "or a known model's name, e.g. qwen2.5-0.5b)")
    fid.add_argument("--tokens", type=int, default=1024, help="held-out tokens per text (default 1024)")
    fid.add_argument("--text", action="append", help="a UTF-8 text file to evaluate on (repeatable; default: "
                                                      "held-out English pydoc topics and a Chinese fixture)")
    fid.add_argument("--json", action="store_true")
    fid.set_defaults(handler=run_eval_fidelity)


def add_prune_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The pruning flags; ``compile`` takes them as --prune-*."""
    p.add_argument(f"--{prefix}target-params", dest="target_params", type=parameter_count,
                   help="parameter budget, e.g. 58M or 3B")
    p.add_argument(f"--{prefix}ratio", dest="ratio", type=float,
                   help="parameter budget as a fraction of the model's, e.g. 0.43")
    p.add_argument(f"--{prefix}mode", dest="mode", default="mix",
                   help="mix (solver: vocabulary + depth + width; default) | width | depth")
    p.add_argument(f"--{prefix}calibration", dest="calibration", action="append", metavar="FILE",
                   help="UTF-8 text to rank heads, channels and layers on (repeatable; default: English pydoc "
                        "topics + a Chinese fixture, disjoint from eval-fidelity's held-out text)")
    p.add_argument(f"--{prefix}calibration-tokens", dest="calibration_tokens", type=int, default=4096,
                   help="calibration tokens (default 4096)")
    p.add_argument(f"--{prefix}vocab-corpus", dest="vocab_corpus", action="append", metavar="FILE",
                   help="mix: keep the tokens this UTF-8 text uses (repeatable; default: the calibration text)")


def prune_request(args, *, dry_run: bool = False):
    from ..compile.prune.prune import PruneRequest

    calibration = read_texts(args.calibration, "--calibration")
    return PruneRequest(target_params=args.target_params, ratio=args.ratio, mode=args.mode, calibration=calibration,
                        calibration_name=", ".join(args.calibration) if calibration else None,
                        calibration_tokens=args.calibration_tokens,
                        vocab_corpus=read_texts(args.vocab_corpus, "--vocab-corpus"), dry_run=dry_run)


def run_prune(args) -> int:
    from ..compile.prune.stage import prune_to_folder
    from ..core.load import load_checkpoint
    from ..evaluate.fidelity import format_table

    if not args.dry_run and not args.out:
        raise InputError("prune: --out DIR is required (or --dry-run to print the plan only)")
    if args.out and os.path.exists(args.out) and not args.force:
        raise InputError(f"{args.out}: already exists; pass --force to replace it")
    request = prune_request(args, dry_run=args.dry_run)
    ckpt = load_checkpoint(args.model, allow_pickle=args.allow_pickle)
    if args.out and os.path.realpath(args.out) == os.path.realpath(ckpt.source):
        raise InputError(f"{args.out}: is the model being pruned; --out must be another folder")
    result, record = prune_to_folder(ckpt, request, args.out, teacher=DEFAULT if args.model is None else ckpt.source,
                                     force=args.force, log=print)  # the plan is the result: stdout
    if args.dry_run:
        return 0
    print(format_table(record["fidelity"]))
    print(f"wrote {args.out} ({result.plan.params_after:,} parameters); recover quality with distillation from the "
          f"teacher: {args.model or 'the default model'}")
    return 0


def run_eval_fidelity(args) -> int:
    from ..evaluate.fidelity import eval_fidelity, format_table

    texts = None
    if args.text:
        texts = dict(zip(args.text, read_texts(args.text, "--text")))
    if args.tokens < 2:
        raise InputError(f"--tokens: expected at least 2, got {args.tokens}")
    result = eval_fidelity(args.student, args.teacher, tokens=args.tokens, texts=texts)
    print(json.dumps(result, indent=1, ensure_ascii=False) if args.json else format_table(result))
    return 0
