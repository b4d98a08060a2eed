"""Weight-only quantization for the GPU targets, measured: fidelity (RTN vs AWQ, int4/int8, per held-out text)
and the TensorRT-RTX engine sizes against fp16, for one model.

    .venv/bin/python benchmarks/weight_only.py [MODEL] [--variants int4-rtn,int4-awq,int8-rtn,...] \
        [--no-engine] --out benchmarks/results

Each variant is a real ``compile --target rtx3090 --precision P --quant-method M``: calibration, the
portable fp16 ONNX with DequantizeLinear -> MatMul, its fidelity stage (onnxruntime runs the ONNX,
teacher-forced against the unquantized model in fp32 on the held-out halves of core/texts.py), and the
engine built ahead of time by TensorRT-RTX for SM86. fp16 is compiled too, for the engine size and for the
fidelity of fp16 alone (measured the same way). Writes ``weight_only.json`` and ``weight_only.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from belle_edge.compile.fidelity import measure_fidelity
from belle_edge.compile.pipeline import CompileConfig, compile_model
from belle_edge.core.load import load_checkpoint
from belle_edge.default_model import DEFAULT
from belle_edge.machine import cpu_name

VARIANTS = ("fp16", "int4-rtn", "int4-awq", "int4-awq+int8:0.25", "int8-rtn", "int8-awq")


def run_variant(model: str, variant: str, folder: str, *, engine: bool, tokens: int) -> dict:
    spec, _, share = variant.partition("+int8:")  # "int4-awq+int8:0.25": a quarter of the linears at int8
    precision, _, method = spec.partition("-")
    t0 = time.perf_counter()
    m = compile_model(CompileConfig(out=os.path.join(folder, variant.replace(":", "_")), model=model,
                                    target="rtx3090", precision=precision, quant_method=method or None,
                                    engine=engine, fidelity_tokens=tokens, force=True,
                                    int8_share=float(share or 0)), progress=False)
    folder = os.path.join(folder, variant.replace(":", "_"))
    row = {"variant": variant, "precision": precision, "method": method or None,
           "compile_seconds": round(time.perf_counter() - t0, 1),
           "stage_seconds": {s.name: s.seconds for s in m.stages},
           "onnx_data_bytes": os.path.getsize(os.path.join(folder, "model.onnx.data"))}
    if m.has_stage("fidelity"):
        row["fidelity"] = m.stage("fidelity").details
    else:  # fp16: the same measure, taken here
        row["fidelity"] = measure_fidelity(load_checkpoint(model), os.path.join(folder, "model.onnx"), tokens=tokens)
    if m.has_stage("quantize"):
        q = m.stage("quantize").details
        row["quantize"] = {k: q[k] for k in ("quantized_bytes", "seconds", "head") if k in q}
        if "int8_share" in q:
            row["quantize"]["int8_share"] = q["int8_share"]["got"]
        if "awq" in q:
            row["quantize"]["awq_scaled_groups"] = f"{q['awq']['scaled']}/{q['awq']['scaling_groups']}"
            row["quantize"]["groups_clipped"] = q["awq"]["clip"]["groups_clipped"]
    if engine:
        build = m.stage("build").details
        row["engine_bytes"] = m.runtime.engine.bytes
        row["weight_only_layers"] = build.get("weight_only_layers")
    return row


def to_markdown(r: dict) -> str:
    rows = r["rows"]
    texts = list(rows[0]["fidelity"]["texts"])
    fp16 = next((x for x in rows if x["variant"] == "fp16"), None)
    lines = [f"# Weight-only quantization for the GPU targets: {r['model']}", "",
             f"Machine: {r['machine']}. Each row is `belle-edge compile --target rtx3090 --precision P "
             "--quant-method M`; fidelity is onnxruntime running the artifact's portable fp16 ONNX "
             f"(DequantizeLinear -> MatMul), teacher-forced against the unquantized model in fp32 on "
             f"{rows[0]['fidelity']['tokens']} held-out tokens split over the texts (never the calibration "
             "half). KL is mean KL(reference || artifact) per token; top-1 is next-token agreement.", "",
             "| variant | " + " | ".join(f"{t} KL / top-1" for t in texts) + " | all KL | all top-1 |",
             "|---|" + "---|" * (len(texts) + 2)]
    for x in rows:
        f = x["fidelity"]
        cells = [f"{f['texts'][t]['kl_mean']:.4f} / {f['texts'][t]['top1_agreement']:.1%}" for t in texts]
        lines.append(f"| {x['variant']} | " + " | ".join(cells) + f" | {f['kl_mean']:.4f} | {f['top1_agreement']:.1%} |")
    if any("engine_bytes" in x for x in rows):
        lines += ["", "TensorRT-RTX engines (SM86, one profile: 1..512 new tokens, 0..4096 past; built here "
                      "without a GPU) and the ONNX weights file:", "",
                  "| variant | engine MB | vs fp16 | ONNX data MB | DequantizeLinear layers (parsed) | compile s |",
                  "|---|---|---|---|---|---|"]
        for x in rows:
            ratio = f"{x['engine_bytes'] / fp16['engine_bytes']:.2f}x" if fp16 and "engine_bytes" in fp16 else "-"
            lines.append(f"| {x['variant']} | {x.get('engine_bytes', 0) / 1e6:.1f} | {ratio} | "
                         f"{x['onnx_data_bytes'] / 1e6:.1f} | {x.get('weight_only_layers') or '-'} | "
                         f"{x['compile_seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=DEFAULT)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tokens", type=int, default=768, help="held-out tokens in all (default 768)")
    p.add_argument("--no-engine", action="store_true")
    p.add_argument("--work", default=None, help="folder for the artifacts (default: a temporary one)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="weight_only_")
    rows = []
    for variant in args.variants.split(","):
        print(f"== {variant}", flush=True)
        rows.append(run_variant(args.model, variant, work, engine=not args.no_engine, tokens=args.tokens))
        print(json.dumps(rows[-1], ensure_ascii=False)[:600], flush=True)
    result = {"model": args.model, "machine": f"{cpu_name()}, {os.cpu_count()} cores", "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "weight_only.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    with open(os.path.join(args.out, "weight_only.md"), "w", encoding="utf-8") as f:
        f.write(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
