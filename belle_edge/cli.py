"""``belle-edge``: the command line. Thin: parses, calls the library, prints.

A user's mistake ends in one line on stderr (``belle-edge: error: ...``) and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from . import __version__
from .errors import BelleEdgeError, InputError, MissingDependencyError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DEMO_SCRIPT = os.path.join(os.path.dirname(__file__), "data", "demo_dialogue.txt")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="HF checkpoint directory or GGUF file (default: the bundled SmolLM2)")
    p.add_argument("--chat-format", default="auto", help="auto | template | belle | belle-v2 (default: auto)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin pickle weights (unpickling runs code)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (torch backend)")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] (torch backend)")
    p.add_argument("--max-positions", type=int, help="override the model's position limit")
    p.add_argument("--backend", default="auto",
                   help="artifacts: auto | tensorrt | onnxruntime (auto: the engine where it can run, else ONNX)")


def _add_session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", help="system prompt (turn 0, always visible)")
    p.add_argument("--window", type=int, default=3, help="context turns W of the turn window (default 3)")
    p.add_argument("--no-window", action="store_true", help="plain causal attention: the original model")
    p.add_argument("--sinks", type=int, default=4, help="sink tokens S always visible (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-kv-tokens", type=int, help="KV-cache slots to allocate (default min(positions, 4096))")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="belle-edge", description="Edge deployment SDK for BELLE-family chat LLMs.")
    parser.add_argument("--version", action="version", version=f"belle-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat with a model in the terminal, or run a scripted dialogue")
    _add_model_args(chat)
    _add_session_args(chat)
    chat.add_argument("--script", help="file with one user message per line ('#' lines and blank lines skipped)")
    chat.add_argument("--json", action="store_true", help="with --script: print one JSON document")
    chat.add_argument("--restore", help="continue a session saved with /save")

    chat.add_argument("--threads", type=int, help="CPU threads (artifacts on ONNX Runtime)")

    comp = sub.add_parser("compile", help="compile a checkpoint into a deployable artifact")
    comp.add_argument("model", nargs="?", help="HF checkpoint directory or GGUF file (default: the bundled SmolLM2)")
    comp.add_argument("--out", required=True, help="artifact folder to write")
    comp.add_argument("--target", default="cpu", help="device to compile for (default cpu)")
    comp.add_argument("--precision", default=None,
                      help="fp32 | fp16 | bf16 | int8 | int4 (default: fp32 for cpu, fp16 for GPU targets)")
    comp.add_argument("--block-size", type=int, default=32, help="quantization block size (default 32)")
    comp.add_argument("--attention", default="plugin", help="GPU targets: plugin (ours) | native (TensorRT's)")
    comp.add_argument("--max-kv-tokens", type=int, default=4096, help="KV cache to budget and build for")
    comp.add_argument("--no-engine", action="store_true",
                      help="GPU targets: export only; build the engine later with `belle-edge build-engine`")

    beng = sub.add_parser("build-engine", help="build the TensorRT engine of a GPU artifact (e.g. on the Jetson)")
    beng.add_argument("artifact")
    beng.add_argument("--tensorrt", choices=("tensorrt", "tensorrt_rtx"), help="which TensorRT (default: any)")
    comp.add_argument("--force", action="store_true", help="replace an existing --out")
    comp.add_argument("--chat-format", default="auto", help="auto | template | belle | belle-v2")
    comp.add_argument("--allow-pickle", action="store_true", help="allow .bin pickle weights")
    comp.add_argument("--no-progress", action="store_true")
    _add_prune_args(comp, prefix="prune-")

    insp = sub.add_parser("inspect", help="print an artifact's manifest as a table")
    insp.add_argument("artifact")
    insp.add_argument("--verify", action="store_true", help="also check every file's sha256")
    insp.add_argument("--json", action="store_true", help="print the manifest itself")

    bench = sub.add_parser("bench", help="latency against transformers and llama.cpp, same run")
    try:
        from benchmarks.latency import build_parser as bench_parser  # the benchmark lives in benchmarks/
    except ImportError:  # an install without the benchmarks package: every other command still works
        bench.set_defaults(bench_missing=True)
    else:
        bench_parser(bench)

    demo = sub.add_parser("demo", help="scripted Chinese/English dialogue with the default model, per-turn stats")
    _add_model_args(demo)
    _add_session_args(demo)
    demo.add_argument("--json", action="store_true")
    # a 135M model loops without a little repetition penalty; short replies keep the demo brisk
    demo.set_defaults(max_new_tokens=80, repetition_penalty=1.1)

    prune = sub.add_parser("prune", help="structured pruning to a parameter budget (vocabulary, width, depth)")
    prune.add_argument("model", nargs="?", help="HF checkpoint directory or GGUF file (default: the bundled SmolLM2)")
    _add_prune_args(prune)
    prune.add_argument("--out", help="checkpoint folder to write (Hugging Face layout + pruning.json)")
    prune.add_argument("--force", action="store_true", help="replace an existing --out")
    prune.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    prune.add_argument("--allow-pickle", action="store_true", help="allow .bin pickle weights")

    data = sub.add_parser("data", help="training data tools").add_subparsers(dest="data_command", required=True)
    clean = data.add_parser("clean", help="normalise, de-duplicate, filter and mask PII in BELLE dialogue data")
    clean.add_argument("input", help="BELLE data: JSON lines of conversations or instruction/input/output")
    clean.add_argument("--out", required=True, help="cleaned JSON lines (a report goes to OUT.report.json)")
    clean.add_argument("--model", help="count lengths in this model's tokens (default: the bundled model)")
    clean.add_argument("--min-tokens", type=int, default=2, help="shortest message side kept (default 2)")
    clean.add_argument("--max-tokens", type=int, default=2048, help="longest dialogue kept (default 2048)")
    clean.add_argument("--languages", default="zh,en", help="languages kept (default zh,en)")
    clean.add_argument("--near-duplicate-threshold", type=float, default=0.85, help="MinHash Jaccard (default 0.85)")
    clean.add_argument("--keep-pii", action="store_true", help="do not mask phone, ID-card and e-mail numbers")

    trn = sub.add_parser("train", help="LoRA fine-tuning, distillation, adapter merging")
    tsub = trn.add_subparsers(dest="train_command", required=True)
    sft = tsub.add_parser("sft", help="LoRA fine-tuning on BELLE dialogues (loss on replies, turn-window mask)")
    sft.add_argument("model", nargs="?", help="base checkpoint (default: the bundled SmolLM2)")
    sft.add_argument("--data", required=True, help="BELLE dialogues (JSON lines)")
    _add_train_args(sft, "sft.json")
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
    _add_train_args(dist, "distill.json")

    ev = sub.add_parser("eval", help="reply quality on held-out dialogues: BLEU-4, ROUGE-L, perplexity")
    ev.add_argument("model", nargs="?", help="checkpoint (default: the bundled SmolLM2)")
    ev.add_argument("--data", required=True, help="held-out BELLE dialogues (JSON lines)")
    ev.add_argument("--teacher", help="also the fidelity figures against this model")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--limit", type=int, help="first N dialogues only")
    ev.add_argument("--window", type=int, default=3, help="turn window W (default 3; the runtime's)")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--no-progress", action="store_true")

    fid = sub.add_parser("eval-fidelity", help="KL, top-1 agreement and perplexity ratio of a student to its teacher")
    fid.add_argument("student", help="checkpoint to measure (e.g. the output of belle-edge prune)")
    fid.add_argument("--teacher", help="reference checkpoint (default: the one named in the student's pruning.json; "
                                       "'default' = the bundled model)")
    fid.add_argument("--tokens", type=int, default=1024, help="held-out tokens per text (default 1024)")
    fid.add_argument("--text", action="append", help="a UTF-8 text file to evaluate on (repeatable; default: "
                                                      "held-out English pydoc topics and a Chinese fixture)")
    fid.add_argument("--json", action="store_true")
    return parser


def _add_prune_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The pruning flags; ``compile`` takes them as --prune-*."""
    p.add_argument(f"--{prefix}target-params", dest="target_params", type=_count,
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


def _add_train_args(p: argparse.ArgumentParser, default_config: str) -> None:
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


def _count(text: str) -> int:
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}
    t = text.strip().lower().replace(",", "").replace("_", "")
    try:
        return int(float(t[:-1]) * scale[t[-1]]) if t and t[-1] in scale else int(float(t))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected a parameter count like 58000000, 58M or 3B, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compile":
            return _compile(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "build-engine":
            from .compile.pipeline import build_artifact_engine

            record = build_artifact_engine(args.artifact, flavour=args.tensorrt)
            print(f"built {args.artifact}/{record['engine']} for sm_{record['sm']} with {record['tensorrt']} "
                  f"{record['tensorrt_version']} in {record['seconds']} s ({record['bytes'] / 2**20:.0f} MB)")
            return 0
        if args.command == "bench":
            if getattr(args, "bench_missing", False):
                raise MissingDependencyError("the benchmarks package is not installed with belle_edge here; "
                                             "install from a checkout: pip install -e '.[bench]'")
            from benchmarks.latency import run as run_bench

            return run_bench(args)
        if args.command == "prune":
            return _prune(args)
        if args.command == "eval-fidelity":
            return _eval_fidelity(args)
        if args.command == "data":
            return _data_clean(args)
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "demo":
            args.script, args.restore, args.threads = DEMO_SCRIPT, None, None
        return _chat(args)
    except BelleEdgeError as e:
        print(f"belle-edge: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


# ------------------------------------------------------------------------------------------- compile
def _compile(args) -> int:
    from .compile.pipeline import CompileConfig, compile_model

    config = CompileConfig(out=args.out, model=args.model, target=args.target, precision=args.precision,
                           force=args.force, chat_format=args.chat_format, allow_pickle=args.allow_pickle,
                           block_size=args.block_size, attention=args.attention, max_kv_tokens=args.max_kv_tokens,
                           engine=not args.no_engine,
                           prune=None if args.target_params is None and args.ratio is None else prune_request(args))
    manifest = compile_model(config, progress=not args.no_progress)
    print(f"wrote {args.out}")
    _print_manifest(manifest)
    return 0


def _read_texts(paths: list[str] | None, flag: str) -> tuple[str, ...] | None:
    if not paths:
        return None
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or e
            raise InputError(f"{flag} {path}: cannot read as UTF-8 text ({reason})") from None
        if not texts[-1].strip():
            raise InputError(f"{flag} {path}: the file is empty")
    return tuple(texts)


def prune_request(args, *, dry_run: bool = False):
    from .compile.prune.prune import PruneRequest

    calibration = _read_texts(args.calibration, "--calibration")
    return PruneRequest(target_params=args.target_params, ratio=args.ratio, mode=args.mode, calibration=calibration,
                        calibration_name=", ".join(args.calibration) if calibration else PruneRequest.calibration_name,
                        calibration_tokens=args.calibration_tokens,
                        vocab_corpus=_read_texts(args.vocab_corpus, "--vocab-corpus"), dry_run=dry_run)


def _prune(args) -> int:
    from .core.load import load_checkpoint
    from .compile.prune.prune import prune_checkpoint
    from .core.save import save_checkpoint

    if not args.dry_run and not args.out:
        raise InputError("prune: --out DIR is required (or --dry-run to print the plan only)")
    if args.out and os.path.exists(args.out) and not args.force:
        raise InputError(f"{args.out}: already exists; pass --force to replace it")
    request = prune_request(args, dry_run=args.dry_run)
    ckpt = load_checkpoint(args.model, allow_pickle=args.allow_pickle)
    if args.out and os.path.realpath(args.out) == os.path.realpath(ckpt.source):
        raise InputError(f"{args.out}: is the model being pruned; --out must be another folder")
    result = prune_checkpoint(ckpt, request)
    if args.dry_run:
        return 0
    from .core.fidelity import measure
    from .core.texts import held_out_texts
    from .models.decoder import Decoder

    _info("measuring fidelity to the unpruned model on held-out text ...")
    teacher = Decoder.from_state_dict(ckpt.config, ckpt.state_dict, where=ckpt.source)
    student = Decoder.from_state_dict(result.checkpoint.config, result.checkpoint.state_dict)
    fidelity = measure(teacher, ckpt.tokenizer, student, result.checkpoint.tokenizer, texts=held_out_texts())
    record = {**result.record, "fidelity": fidelity,
              "teacher": {"path": "default" if args.model is None else ckpt.source, "source": ckpt.source,
                          "fingerprint": ckpt.fingerprint}}
    out = save_checkpoint(result.checkpoint, args.out, records={"pruning.json": record},
                          force=args.force, tokenizer_config=result.tokenizer_config)
    from .evaluate.fidelity import format_table

    print(format_table({"texts": fidelity["texts"], "shared_vocab": fidelity["shared_vocab"],
                        "teacher_vocab": fidelity["teacher_vocab"]}))
    print(f"wrote {out} ({result.plan.params_after:,} parameters); recover quality with distillation from the "
          f"teacher: {args.model or 'the default model'}")
    return 0


def _data_clean(args) -> int:
    from .core.load import load_tokenizer
    from .train.clean import CleanConfig, clean_file

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

    from .train.trainer import TrainConfig

    path = args.config or str(importlib.resources.files("belle_edge").joinpath("train", "configs",
                                                                               args.default_config))
    overrides = {k: getattr(args, k, None) for k in ("learning_rate", "epochs", "batch_size", "warmup_steps",
                                                    "lora_rank", "max_len", "held_out", "save_every", "seed",
                                                    "lm_weight", "max_rows")}
    return TrainConfig.load(path, overrides)


def _train(args) -> int:
    if args.train_command == "merge":
        from .train.sft import run_merge

        out = run_merge(args.run, args.out, base=args.base, force=args.force)
        print(f"wrote {out}: the base model with the adapter folded in; compile it with belle-edge compile {out}")
        return 0
    config = _train_config(args)
    if args.train_command == "sft":
        from .train.sft import run_sft

        record = run_sft(args.model, args.data, args.out, config, resume=args.resume, progress=not args.no_progress,
                         log=_info)
        print(f"trained {record['steps']} steps, final loss {record['history'][-1]['loss']:.4f}; adapter in "
              f"{args.out}/adapter; merge with: belle-edge train merge {args.out} --out MODEL_DIR")
        return 0
    from .train.distill import run_distill

    record = run_distill(args.student, args.teacher, args.out, config, data=args.data, resume=args.resume,
                         progress=not args.no_progress, log=_info)
    print(f"distilled {record['steps']} steps, final loss {record['history'][-1]['loss']:.4f}; model in "
          f"{args.out}/model; measure with: belle-edge eval-fidelity {args.out}/model")
    return 0


def _eval(args) -> int:
    from .evaluate.generation import format_metrics
    from .evaluate.replies import run_eval

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens: expected >= 1, got {args.max_new_tokens}")
    result = run_eval(args.model, args.data, teacher=args.teacher, max_new_tokens=args.max_new_tokens,
                      limit=args.limit, window=args.window, progress=not args.no_progress)
    if args.json:
        print(json.dumps(result, indent=1, ensure_ascii=False))
        return 0
    print(format_metrics(result["replies"]))
    ppl = result["assistant_perplexity"]
    print(f"perplexity on reference reply tokens: {ppl['perplexity']} ({ppl['reply_tokens']} tokens)")
    if "fidelity" in result:
        from .evaluate.fidelity import format_table

        print(format_table(result["fidelity"]))
    return 0


def _eval_fidelity(args) -> int:
    from .evaluate.fidelity import eval_fidelity, format_table

    texts = None
    if args.text:
        texts = dict(zip(args.text, _read_texts(args.text, "--text")))
    if args.tokens < 2:
        raise InputError(f"--tokens: expected at least 2, got {args.tokens}")
    result = eval_fidelity(args.student, args.teacher, tokens=args.tokens, texts=texts)
    print(json.dumps(result, indent=1, ensure_ascii=False) if args.json else format_table(result))
    return 0


def _inspect(args) -> int:
    from .manifest import read_manifest

    manifest = read_manifest(args.artifact, verify_hashes=args.verify)
    if args.json:
        print(json.dumps(manifest, indent=1, ensure_ascii=False))
    else:
        _print_manifest(manifest)
        if args.verify:
            print("all file hashes match the manifest")
    return 0


def _print_manifest(m: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cfg = m["model"]
    head = Table(show_header=False, box=None)
    for key, value in (("source", f"{m['source']['name']} ({m['source']['kind']}: {m['source']['path']})"),
                       ("model", f"{cfg['family']}: {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
                                 f"heads {cfg['num_heads']}/{cfg['num_kv_heads']}, vocab {cfg['vocab_size']}"),
                       ("target / precision", f"{m['target']} / {m['precision']}"),
                       ("runtime", f"{m['runtime']['backend']}, KV {m['runtime']['kv_dtype']}, "
                                   f"max positions {m['runtime']['max_positions']}"),
                       ("chat format", m["chat_format"].get("kind") + (f" ({m['chat_format']['variant']})"
                                                                      if "variant" in m["chat_format"] else "")),
                       ("built", f"belle_edge {m['belle_edge']}, {m['created']}"),
                       ("tools", ", ".join(f"{k} {v}" for k, v in m["tools"].items()))):
        head.add_row(f"[bold]{key}[/bold]", str(value))
    console.print(head)
    stages = Table(title="stages")
    for col in ("stage", "seconds", "peak RSS MB", "details"):
        stages.add_column(col)
    for st in m["stages"]:
        details = {k: v for k, v in st.items() if k not in ("name", "seconds", "peak_rss_mb")}
        stages.add_row(st["name"], f"{st['seconds']:.2f}", f"{st['peak_rss_mb']:.0f}",
                       ", ".join(f"{k}={v}" for k, v in details.items()))
    console.print(stages)
    files = Table(title="files")
    for col in ("file", "MB", "sha256"):
        files.add_column(col)
    for name, rec in m["files"].items():
        files.add_row(name, f"{rec['bytes'] / 2**20:.1f}", rec["sha256"][:16])
    console.print(files)


# ------------------------------------------------------------------------------------------- chat
def _open_session(args):
    from .api import load
    from .runtime.sampler import SamplingConfig

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)
    script = _read_script(args.script) if args.script else None  # a bad script fails before the slow load
    t0 = time.perf_counter()
    _info(f"loading {args.model or 'the default model'} ...")
    model = load(args.model, dtype=args.dtype, device=args.device, chat_format=args.chat_format,
                 allow_pickle=args.allow_pickle, max_positions=args.max_positions, threads=args.threads,
                 backend=args.backend)
    _info(f"loaded {model.name} in {time.perf_counter() - t0:.1f} s (backend {model.backend_name}, "
          f"format {model.chat_format.name})")
    if args.restore:
        return model, model.restore(args.restore), script
    session = model.session(system=args.system, window=None if args.no_window else args.window, sinks=args.sinks,
                            sampling=sampling, max_new_tokens=args.max_new_tokens, max_kv_tokens=args.max_kv_tokens)
    return model, session, script


def _chat(args) -> int:
    if args.json and not args.script:
        raise InputError("--json needs --script (an interactive chat prints text)")
    model, session, script = _open_session(args)
    if script is not None:
        return _run_script(model, session, script, as_json=args.json)
    return _interactive(session)


def _read_script(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the dialogue script ({e})") from None
    messages = [line for line in lines if line and not line.startswith("#")]
    if not messages:
        raise InputError(f"{path}: the dialogue script has no messages")
    return messages


def _stats_line(s) -> str:
    return (f"[turn {s.turn} | ttft {s.ttft_ms:.0f} ms | prefill {s.prompt_tokens} tok | decode {s.new_tokens} tok "
            f"at {s.decode_tok_s:.1f} tok/s | kv {s.kv_tokens} tok | evicted {s.evicted_tokens}"
            f"{' | context shift' if s.context_shift else ''} | {s.finish_reason}]")


def _run_script(model, session, messages: list[str], *, as_json: bool) -> int:
    turns = []
    for message in messages:
        if not as_json:
            print(f"you> {message}")
            print("bot> ", end="", flush=True)
        pieces = []
        for piece in session.stream(message):
            pieces.append(piece)
            if not as_json:
                print(piece, end="", flush=True)
        stats = session.last_stats
        turns.append({"user": message, "reply": "".join(pieces), **dataclasses.asdict(stats)})
        if not as_json:
            print(f"\n    {_stats_line(stats)}")
    if as_json:
        doc = {"model": model.name, "backend": model.backend_name, "window": session.mask.window,
               "sinks": session.mask.sinks, "turns": turns}
        print(json.dumps(doc, ensure_ascii=False, indent=2))
    else:
        _print_summary(session)
    return 0


def _print_summary(session) -> None:
    stats = session.stats
    if not stats:
        print("no turns yet")
        return
    ttft = sorted(s.ttft_ms for s in stats)
    rates = sorted(s.decode_tok_s for s in stats if s.decode_tok_s > 0)
    print(f"{len(stats)} turns | median ttft {ttft[len(ttft) // 2]:.0f} ms | median decode "
          f"{rates[len(rates) // 2] if rates else 0:.1f} tok/s | kv held {session.kv_tokens} tok | window "
          f"{session.mask.window if session.mask.enabled else 'off'}")


HELP = "commands: /reset  /stats  /save [FILE]  /exit   (Ctrl-C stops a reply, Ctrl-D or /exit quits)"


def _interactive(session) -> int:
    print(HELP)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if _command(session, line):
                return 0
            continue
        print("bot> ", end="", flush=True)
        try:
            for piece in session.stream(line):
                print(piece, end="", flush=True)
            print(f"\n    {_stats_line(session.last_stats)}")
        except KeyboardInterrupt:
            # Ctrl-C may land in our print, outside the reply's generator: settle the turn now, so /stats,
            # /save and the next message all see it
            session.stop_reply()
            print("\n    [interrupted: the reply so far stays in the dialogue]")
        except BelleEdgeError as e:
            print(f"\nbelle-edge: error: {e}", file=sys.stderr)


def _command(session, line: str) -> bool:
    """Run a /command; True means quit."""
    name, _, arg = line.partition(" ")
    if name in ("/exit", "/quit"):
        return True
    if name == "/reset":
        session.reset()
        print("    [dialogue reset]")
    elif name == "/stats":
        for s in session.stats:
            print(f"    {_stats_line(s)}")
        _print_summary(session)
        segments = ", ".join(f"{'system' if t == 0 else f'turn {t}'}: {n}" for t, n in session.ledger.turn_counts().items())
        print(f"    kv cache by turn: {segments or 'empty'}")
    elif name == "/save":
        path = arg.strip() or "session.npz"
        try:
            session.save(path)
            print(f"    [saved to {path}; continue with: belle-edge chat ... --restore {path}]")
        except OSError as e:
            print(f"belle-edge: error: {path}: cannot save ({e.strerror})", file=sys.stderr)
    else:
        print(f"    unknown command {name}; {HELP}")
    return False


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
