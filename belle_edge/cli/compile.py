"""``compile``, and its stages run alone: ``quantize``, ``export``, ``build-engine``; ``inspect`` an artifact."""
from __future__ import annotations

import argparse
import json

from ..errors import InputError
from .common import MODEL_HELP
from .prune import add_prune_args, prune_request


def register(sub) -> None:
    comp = sub.add_parser("compile", help="compile a checkpoint into a deployable artifact (every stage in a row)")
    comp.add_argument("model", nargs="?", help=MODEL_HELP + ", or a quantized checkpoint")
    comp.add_argument("--out", help="artifact folder to write (required unless --dry-run)")
    _add_target_args(comp)
    comp.add_argument("--block-size", type=int, default=32, help="cpu int8/int4: quantization block size (default 32)")
    _add_weight_only_args(comp)
    comp.add_argument("--no-engine", action="store_true",
                      help="GPU targets: export only; build the engine later with `belle-edge build-engine`")
    add_prune_args(comp, prefix="prune-")
    comp.add_argument("--dry-run", action="store_true", help="print memory and bandwidth per precision and target "
                                                             "(config only: nothing is loaded or written)")
    comp.add_argument("--shape", help="with --dry-run: a paper plan instead of a model: llama-3.2-3b | "
                                      "belle-7b-pruned-3b | all (the Orin table unless --target names a GPU)")
    comp.set_defaults(handler=run_compile)

    quant = sub.add_parser("quantize", help="the quantize stage alone: a checkpoint -> a quantized checkpoint folder")
    quant.add_argument("model", nargs="?", help=MODEL_HELP)
    quant.add_argument("--out", required=True, help="quantized checkpoint folder to write (belle-edge export reads it)")
    quant.add_argument("--precision", required=True, help="int8 | int4")
    quant.add_argument("--block-size", type=int, default=32, help="cpu: quantization block size (default 32)")
    quant.add_argument("--target", default="cpu", help="cpu (MatMulNBits blocks) or a GPU target (symmetric "
                                                       "weight-only: INT4 group 128 / INT8 per channel)")
    _add_weight_only_args(quant)
    _add_source_args(quant)
    quant.set_defaults(handler=run_quantize)

    exp = sub.add_parser("export", help="the export stage alone: a checkpoint or quantized checkpoint -> an "
                                        "artifact without an engine (build it with belle-edge build-engine)")
    exp.add_argument("model", nargs="?", help=MODEL_HELP + ", or a quantized checkpoint (belle-edge quantize)")
    exp.add_argument("--out", required=True, help="artifact folder to write")
    _add_target_args(exp)
    exp.set_defaults(handler=run_export)

    beng = sub.add_parser("build-engine", help="build the TensorRT engine of a GPU artifact (e.g. on the Jetson)")
    beng.add_argument("artifact")
    beng.add_argument("--tensorrt", choices=("tensorrt", "tensorrt_rtx"), help="which TensorRT (default: the "
                                                                                 "target's first one installed)")
    beng.set_defaults(handler=run_build_engine)

    insp = sub.add_parser("inspect", help="print an artifact's manifest as a table")
    insp.add_argument("artifact")
    insp.add_argument("--verify", action="store_true", help="also check every file's sha256")
    insp.add_argument("--json", action="store_true", help="print the manifest itself")
    insp.set_defaults(handler=run_inspect)


def _add_weight_only_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant-method", default=None, help="GPU int4/int8: awq | rtn (default: awq for int4, rtn for "
                                                        "int8)")
    p.add_argument("--head", default="fp16", help="GPU int4/int8: the LM head (and a tied embedding) in fp16 "
                                                  "(default) or int8")
    p.add_argument("--calibration-tokens", type=int, default=512, help="GPU awq: calibration tokens (default 512)")
    p.add_argument("--int8-share", type=float, default=0.0, help="GPU int4: keep this share of the linear "
                   "parameters at int8, the tensors int4 hurts most on calibration text (default 0)")


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--chat-format", default="auto", help="auto | template | belle | belle-v2")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin pickle weights")
    p.add_argument("--no-progress", action="store_true")


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="cpu", help="device to compile for (default cpu; see belle_edge/targets.py)")
    p.add_argument("--precision", default=None, help="fp32 | fp16 | bf16 | int8 | int4 (default: fp32 for cpu, "
                                                     "fp16 for GPU targets, a quantized checkpoint's own)")
    p.add_argument("--attention", default="plugin", help="GPU targets: plugin (ours) | native (TensorRT's)")
    p.add_argument("--max-kv-tokens", type=int, default=4096, help="KV cache to budget and build for")
    p.add_argument("--max-batch", type=int, default=None, help="GPU engines: sequences per step in their profiles "
                   "(default per target: 2 Orin, 4 rtx3090, 16 a100/h100)")
    _add_source_args(p)


def _config(args, **overrides):
    from ..compile.pipeline import CompileConfig

    fields = dict(out=args.out, model=args.model, target=args.target, precision=args.precision, force=args.force,
                  chat_format=args.chat_format, allow_pickle=args.allow_pickle, attention=args.attention,
                  max_kv_tokens=args.max_kv_tokens, max_batch=args.max_batch)
    return CompileConfig(**{**fields, **overrides})


def run_compile(args) -> int:
    if args.dry_run:  # before the pipeline's import: the table needs no torch
        from .dry_run import run_dry_run

        return run_dry_run(args)
    if not args.out:
        raise InputError("compile: --out DIR is required (or --dry-run to print the memory table only)")
    if args.shape:
        raise InputError("--shape is a paper plan for --dry-run only; compile takes a checkpoint")
    from ..compile.pipeline import compile_model

    pruning = None if args.target_params is None and args.ratio is None else prune_request(args)
    config = _config(args, block_size=args.block_size, engine=not args.no_engine, prune=pruning,
                     quant_method=args.quant_method, head=args.head, calibration_tokens=args.calibration_tokens,
                     int8_share=args.int8_share)
    manifest = compile_model(config, progress=not args.no_progress)
    print(f"wrote {args.out}")
    print_manifest(manifest)
    return 0


def run_export(args) -> int:
    """compile without pruning or quantizing, and without an engine: the export stage between load and package."""
    from ..compile.pipeline import compile_model

    manifest = compile_model(_config(args, engine=False), progress=not args.no_progress)
    print(f"wrote {args.out}")
    print_manifest(manifest)
    if manifest.runtime.backend == "tensorrt":
        print(f"build its engine with: belle-edge build-engine {args.out}")
    return 0


def run_quantize(args) -> int:
    from ..compile.quantize import quantize_to_folder
    from ..core.load import load_checkpoint

    from ..compile.weight_only import WeightOnlyRequest
    from ..targets import get_target

    weight_only = None
    if get_target(args.target).gpu:
        weight_only = WeightOnlyRequest(args.precision, args.quant_method, args.head, args.calibration_tokens,
                                        int8_share=args.int8_share)
    ckpt = load_checkpoint(args.model, allow_pickle=args.allow_pickle, chat_format=args.chat_format)
    _, record = quantize_to_folder(ckpt, args.precision, args.out, block_size=args.block_size, force=args.force,
                                   weight_only=weight_only)
    how = (f"{record['method']}, group {record['group']}, head {record['head']}" if weight_only else
           f"block {record['block_size']}; {', '.join(f'{k} {v}' for k, v in record['sources'].items())}")
    print(f"wrote {args.out}: {record['tensors']} tensors at {record['precision']} ({how}), "
          f"{record['quantized_bytes'] / 2**20:.1f} MB; export it with: belle-edge export {args.out} --out ARTIFACT"
          + (f" --target {args.target}" if weight_only else ""))
    return 0


def run_build_engine(args) -> int:
    from ..compile.deferred_engine import build_artifact_engine
    from ..manifest import read_manifest

    record = build_artifact_engine(args.artifact, flavour=args.tensorrt)
    engine = read_manifest(args.artifact).runtime.engine
    print(f"built {args.artifact}/{engine.file} for sm_{engine.sm} with {engine.builder} {engine.builder_version} "
          f"in {record.seconds} s ({engine.bytes / 2**20:.0f} MB)")
    return 0


def run_inspect(args) -> int:
    from ..manifest import read_manifest

    manifest = read_manifest(args.artifact, verify_hashes=args.verify)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=1, ensure_ascii=False))
    else:
        print_manifest(manifest)
        if args.verify:
            print("all file hashes match the manifest")
    return 0


def print_manifest(m) -> None:
    """The manifest as three tables: what it is, its stages, its files (plain text where rich is not
    installed: a device with only belle_edge[onnx])."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        _print_plain(m)
        return
    console = Console()
    head = Table(show_header=False, box=None)
    for key, value in _summary(m):
        head.add_row(f"[bold]{key}[/bold]", str(value))
    console.print(head)
    stages = Table(title="stages")
    for col in ("stage", "seconds", "peak RSS MB", "details"):
        stages.add_column(col)
    for st in m.stages:
        stages.add_row(st.name, f"{st.seconds:.2f}", f"{st.peak_rss_mb:.0f}",
                       ", ".join(f"{k}={v}" for k, v in st.details.items()))
    console.print(stages)
    files = Table(title="files")
    for col in ("file", "MB", "sha256"):
        files.add_column(col)
    for name, rec in m.files.items():
        files.add_row(name, f"{rec.bytes / 2**20:.1f}", rec.sha256[:16])
    console.print(files)


def _print_plain(m) -> None:
    for key, value in _summary(m):
        print(f"{key:<20}{value}")
    print("stages:")
    for st in m.stages:
        print(f"  {st.name:<10}{st.seconds:>9.2f} s {st.peak_rss_mb:>8.0f} MB  "
              + ", ".join(f"{k}={v}" for k, v in st.details.items()))
    print("files:")
    for name, rec in m.files.items():
        print(f"  {name:<24}{rec.bytes / 2**20:>10.1f} MB  {rec.sha256[:16]}")


def _summary(m) -> list[tuple[str, str]]:
    cfg, rt, fmt = m.model, m.runtime, m.chat_format
    engine = "none" if rt.engine is None else (f"{rt.engine.file}: sm_{rt.engine.sm}, {rt.engine.builder} "
                                              f"{rt.engine.builder_version}, {rt.engine.attention} attention")
    if rt.engine is None and rt.engine_on_device:
        engine = "built on the device (belle-edge build-engine)"
    rows = [("source", f"{m.source.name} ({m.source.kind}: {m.source.path})"),
            ("model", f"{cfg.family}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads "
                      f"{cfg.num_heads}/{cfg.num_kv_heads}, vocab {cfg.vocab_size}"),
            ("target / precision", f"{m.target} / {m.precision}"),
            ("runtime", f"{rt.backend}, KV {rt.kv_dtype}, max positions {rt.max_positions}"),
            ("engine", engine) if m.runtime.backend == "tensorrt" else None,
            ("chat format", fmt.get("kind") + (f" ({fmt['variant']})" if "variant" in fmt else "")),
            ("built", f"belle_edge {m.belle_edge}, {m.created}"),
            ("tools", ", ".join(f"{k} {v}" for k, v in m.tools.items()))]
    for key, value in (("fidelity", _fidelity(m)), ("weights", _weights(m)), ("decode roofline", _roofline(m))):
        if value:
            rows.insert(3, (key, value))
    return [r for r in rows if r]


def _roofline(m) -> str | None:
    """The target's decode ceiling from the memory check: weights read once per token at peak bandwidth."""
    for st in m.stages:
        memory = st.details.get("memory") if isinstance(st.details, dict) else None
        if memory and memory.get("decode_roofline_tok_s"):
            read = memory.get("read_per_token_gb")
            per_token = f"{read} GB read per token" if read is not None else f"{memory['weights_gib']} GiB of weights"
            return f"{memory['decode_roofline_tok_s']:,.0f} tok/s at most on {m.target} ({per_token} at the " \
                   "target's peak bandwidth)"
    return None


def _weights(m) -> str | None:
    """How the weights are stored, from the quantize stage's record."""
    if not m.has_stage("quantize"):
        return None
    q = m.stage("quantize").details
    if q.get("layout") == "symmetric":
        group = f"group {q['group']}" if q["bits"] == 4 else "per channel"
        return f"int{q['bits']} weight-only linears ({q['method']}, symmetric, {group}), {q['head']} LM head"
    return f"int{q['bits']} blocks of {q['block_size']} (MatMulNBits), 8-bit LM head"


def _fidelity(m) -> str | None:
    """The fidelity stage in one line: pooled, then per held-out text."""
    if not m.has_stage("fidelity"):
        return None
    f = m.stage("fidelity").details
    if "skipped" in f:
        return f"not measured: {f['skipped']}"
    texts = ", ".join(f"{name.split('(')[0]} {t['kl_mean']:.3f}/{t['top1_agreement']:.1%}"
                      for name, t in f.get("texts", {}).items())
    return f"KL {f['kl_mean']:.4f}, top-1 {f['top1_agreement']:.1%} over {f['tokens']} held-out tokens vs the " \
           f"unquantized model ({texts})"
