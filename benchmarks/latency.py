"""``belle-edge bench``: latency of belle_edge against the tools users would otherwise use, same machine,
same model, same token ids, variants interleaved run by run (these machines are noisy), medians with ranges.

Variants (``--backends``): ``ort-fp32``, ``ort-int8``, ``ort-int4`` (belle_edge artifacts on ONNX
Runtime), ``torch-fp32`` (belle_edge's torch backend), ``transformers-fp32`` (``generate``),
``llamacpp-f32`` and ``llamacpp-q4`` (llama-cpp-python on the GGUF file; the default model's own Q4_K_M
file, and an F32 GGUF written from it). A peer that is not installed or has no weights is skipped with the
reason, never faked.

Figures per variant: time to first token, prefill tokens/s, decode tokens/s, peak RSS of its own process,
weight bytes read per token (all weights but an untied input embedding, of which a step reads one row),
and the roofline share: decode tok/s x those bytes / measured memory bandwidth (a large ``numpy`` copy,
bytes read + written per second).
``--turns N`` adds a dialogue of N turns and reports each turn.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from belle_edge.machine import cpu_name

ALL_BACKENDS = ("ort-fp32", "ort-int8", "ort-int4", "torch-fp32", "transformers-fp32", "llamacpp-f32", "llamacpp-q4")
OPTIONAL_BACKENDS = ("ort-fp16",)
USER_TURNS = [
    "你好！我想查询一下我的订单。", "Hello! Can you help me track my order?", "订单号是 20261126001。",
    "When will it arrive?", "可以帮我改一下收货地址吗？", "What is your return policy?",
    "这件衣服有别的颜色吗？", "Please recommend a gift for my mother.", "谢谢，你真有耐心！",
    "Summarize our conversation in one sentence.",
]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="belle-edge bench", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="HF checkpoint directory, GGUF file or known model name (default: qwen2.5-0.5b)")
    p.add_argument("--backends", default=",".join(ALL_BACKENDS),
                   help=f"comma-separated, from {', '.join(ALL_BACKENDS + OPTIONAL_BACKENDS)}")
    p.add_argument("--gguf", help="GGUF file for the llama.cpp peers (default: the model itself if it is one)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per variant, after one warm-up")
    p.add_argument("--prompt-tokens", type=int, default=60)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--turns", type=int, default=0, help="also run a dialogue of N turns, per-turn figures")
    p.add_argument("--turn-new-tokens", type=int, default=32, help="reply length in the dialogue")
    p.add_argument("--out", default="bench-results", help="folder for bench.md and bench.png")
    p.add_argument("--json", action="store_true", help="print the JSON document on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args) -> int:
    from belle_edge.errors import InputError

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(ALL_BACKENDS + OPTIONAL_BACKENDS))
    if unknown:
        raise InputError(f"--backends: unknown {', '.join(unknown)}; known: "
                         f"{', '.join(ALL_BACKENDS + OPTIONAL_BACKENDS)}")
    if args.runs < 1 or args.new_tokens < 2 or args.prompt_tokens < 8:
        raise InputError("--runs >= 1, --new-tokens >= 2 and --prompt-tokens >= 8 are required")
    prep = _prepare(args, backends)
    machine = _machine(args.threads)
    workers, skipped = _start_workers(prep["specs"], prep["skipped"])
    try:
        singles = _interleave(workers, {"op": "single", "prompt_ids": prep["prompt_ids"],
                                        "new_tokens": args.new_tokens}, args.runs, skipped=skipped)
        dialogues = {}
        if args.turns:
            dialogues = _interleave(workers, {"op": "dialogue", "turns": _turns(args.turns),
                                              "new_tokens": args.turn_new_tokens}, 1, skipped=skipped, warmup=False)
        singles = {name: runs for name, runs in singles.items() if name in workers}  # those still alive
        rss = {name: w["peak_rss_mb"] for name, w in workers.items()}
    finally:
        for w in workers.values():
            w["proc"].kill()
    result = _summarize(args, prep, machine, singles, dialogues, rss, skipped)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(markdown(result))
    _plot(result, os.path.join(args.out, "bench.png"))
    if args.json:
        print(json.dumps(result, indent=1, ensure_ascii=False))
    else:
        print(markdown(result))
        print(f"(written to {args.out}/bench.md, bench.json, bench.png)")
    return 0


# ------------------------------------------------------------------------------------------- preparation
def _prepare(args, backends) -> dict:
    from belle_edge.core.gguf import gguf_cache_dir
    from belle_edge.core.load import load_checkpoint
    from belle_edge.compile.pipeline import CompileConfig, compile_model
    from belle_edge.manifest import is_artifact
    from belle_edge.paths import cache_or_temp_dir

    ckpt = load_checkpoint(args.model)
    cache = cache_or_temp_dir("bench")  # BELLE_EDGE_CACHE=off: a temporary folder
    tokenizer_path = os.path.join(cache, f"{ckpt.fingerprint}-tokenizer.json")
    ckpt.tokenizer.save(tokenizer_path)
    prompt_ids = _prompt_ids(ckpt, args.prompt_tokens)
    gguf = args.gguf or (ckpt.source if ckpt.kind == "gguf" else None)
    hf_dir = gguf_cache_dir(ckpt.source) if ckpt.kind == "gguf" else ckpt.source
    specs, skipped = {}, []
    common = {"threads": args.threads, "tokenizer": tokenizer_path, "chat_format": ckpt.chat_format.to_dict()}
    for name in backends:
        kind, precision = name.rsplit("-", 1)
        if kind == "ort":
            artifact = os.path.join(cache, f"{ckpt.fingerprint}-{precision}")
            if not is_artifact(artifact):
                print(f"bench: compiling the {precision} artifact once ({artifact})", file=sys.stderr)
                compile_model(CompileConfig(out=artifact, model=args.model, precision=precision, force=True))
            specs[name] = {**common, "kind": "belle-ort", "artifact": artifact,
                           "weight_bytes": _artifact_weight_bytes(artifact)}
        elif kind == "torch":
            specs[name] = {**common, "kind": "belle-torch", "checkpoint": args.model,
                           "weight_bytes": _param_bytes(ckpt)}
        elif kind == "transformers":
            if not hf_dir or not os.path.isdir(hf_dir):
                skipped.append({"backend": name, "reason": "no Hugging Face directory for this model"})
                continue
            specs[name] = {**common, "kind": "transformers", "hf_dir": hf_dir, "weight_bytes": _param_bytes(ckpt)}
        elif kind == "llamacpp":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                skipped.append({"backend": name, "reason": "llama-cpp-python is not installed "
                                                           "(pip install 'belle_edge[bench-llamacpp]')"})
                continue
            if not gguf:
                skipped.append({"backend": name, "reason": "no GGUF file for this model (pass --gguf)"})
                continue
            path = gguf if precision == "q4" else _f32_gguf(gguf, cache)
            specs[name] = {**common, "kind": "llama.cpp", "gguf": path, "weight_bytes": _gguf_weight_bytes(path)}
    return {"ckpt_name": ckpt.source, "prompt_ids": prompt_ids, "specs": specs, "skipped": skipped}


def _prompt_ids(ckpt, n: int) -> list[int]:
    """A chat prompt of about n tokens: the format's own text around English prose cut to fit."""
    from belle_edge.core.texts import english_held_out

    fmt, tok = ckpt.chat_format, ckpt.tokenizer
    overhead = len(tok.encode(fmt.system_text(None) + fmt.first_turn_text(None, "x"), add_special_tokens=False).ids)
    body = tok.decode(tok.encode(english_held_out()).ids[:max(1, n - overhead)])
    return tok.encode(fmt.system_text(None) + fmt.first_turn_text(None, body),
                      add_special_tokens=fmt.add_special_tokens_first).ids


def _turns(n: int) -> list[str]:
    return [USER_TURNS[i % len(USER_TURNS)] for i in range(n)]


# Bytes read per decoded token: every weight once, except an untied input embedding, of which a step reads
# one row (Qwen2.5-0.5B's is 136M of its 630M parameters). A tied one is read whole by the LM head.

def _artifact_weight_bytes(artifact: str) -> int:
    """model.onnx.data less the initializers only the input embedding's lookup reads."""
    import onnx

    model = onnx.load(os.path.join(artifact, "model.onnx"), load_external_data=False)
    nodes, initializers = list(model.graph.node), {t.name for t in model.graph.initializer}
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}
    chain = {i for i, n in enumerate(nodes) if n.op_type in ("Gather", "GatherBlockQuantized") and "input_ids" in n.input}
    frontier, reached = [x for i in chain for x in nodes[i].input if x != "input_ids"], set()
    while frontier:  # back from the lookup through what prepares its table (a Reshape of the codes, ...)
        x = frontier.pop()
        if x in initializers:
            reached.add(x)
        elif x in producer and producer[x] not in chain:
            chain.add(producer[x])
            frontier += list(nodes[producer[x]].input)
    used_elsewhere = {x for i, n in enumerate(nodes) if i not in chain for x in n.input}
    only_lookup = reached - used_elsewhere
    skipped = sum(int(e.value) for t in model.graph.initializer if t.name in only_lookup
                  for e in t.external_data if e.key == "length")
    return os.path.getsize(os.path.join(artifact, "model.onnx.data")) - skipped


def _param_bytes(ckpt) -> int:
    untied_embed = "embed.weight" if not ckpt.config.tie_embeddings else None
    return sum(v.numel() * 4 for k, v in ckpt.state_dict.items() if not k.endswith("slopes") and k != untied_embed)


def _gguf_weight_bytes(path: str) -> int:
    """The file's size less its token embedding when the file has a separate output matrix."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    untied = "output.weight" in tensors and "token_embd.weight" in tensors
    return os.path.getsize(path) - (int(tensors["token_embd.weight"].n_bytes) if untied else 0)


def _f32_gguf(source: str, cache: str) -> str:
    """The same weights as an F32 GGUF for llama.cpp: every tensor dequantized, metadata copied."""
    import gguf

    st = os.stat(source)
    out = os.path.join(cache, f"{os.path.basename(source)}-{st.st_size}-{st.st_mtime_ns}.f32.gguf")
    if os.path.isfile(out):
        return out
    print("bench: writing an F32 GGUF for llama.cpp once", file=sys.stderr)
    reader = gguf.GGUFReader(source)
    arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(out + ".tmp", arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype("float32")
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(out + ".tmp", out)
    return out


def _machine(threads: int) -> dict:
    """Machine facts and its memory bandwidth: ``threads`` threads each copying its share of 512 MiB
    (numpy releases the GIL), best of 5, bytes read + written per second."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    src = np.ones(128 * 2**20, dtype=np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    slices = [slice(p[0], p[-1] + 1) for p in parts]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            t = time.perf_counter()
            list(pool.map(lambda sl: np.copyto(dst[sl], src[sl]), slices))
            best = min(best, time.perf_counter() - t)
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "platform": platform.platform(), "mem_bw_gbs": round(2 * src.nbytes / best / 1e9, 1)}


# ------------------------------------------------------------------------------------------- workers
WORKER = [sys.executable, "-m", "benchmarks.peers"]


def _start_workers(specs: dict, skipped: list) -> tuple[dict, list]:
    """One process per variant (``spec["worker"]``: its command, default benchmarks/peers.py), started
    together so they load in parallel; a variant that cannot load is skipped with the reason."""
    workers = {}
    for name, spec in specs.items():
        proc = subprocess.Popen(spec.get("worker", WORKER), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])})
        workers[name] = {"proc": proc, "spec": spec}
        _send(workers[name], spec)
    ready = {}
    for name, w in workers.items():
        reply = _receive(w)
        if reply is not None and reply.get("ready"):
            w["peak_rss_mb"] = reply["peak_rss_mb"]
            ready[name] = w
            continue
        reason = reply.get("reason", "failed to load") if reply else f"{_death(w['proc'])} while loading"
        w["proc"].kill()
        skipped.append({"backend": name, "reason": reason})
    return ready, skipped


def _interleave(workers: dict, request: dict, runs: int, *, skipped: list, warmup: bool = True) -> dict:
    """``runs`` rounds of ``request`` to every worker in turn. A worker that dies (a peer's native code can
    segfault) is dropped and reported in ``skipped`` with how it died; the others carry on."""
    results = {name: [] for name in workers}
    for r in range(runs + (1 if warmup else 0)):
        for name, w in list(workers.items()):
            _send(w, request)
            reply = _receive(w)
            if reply is None:
                skipped.append({"backend": name, "reason": _death(w["proc"])})
                del workers[name], results[name]
                continue
            w["peak_rss_mb"] = reply["peak_rss_mb"]
            if r > 0 or not warmup:
                results[name].append(reply["result"])
    return results


def _send(worker: dict, message: dict) -> None:
    try:
        worker["proc"].stdin.write(json.dumps(message) + "\n")
        worker["proc"].stdin.flush()
    except (BrokenPipeError, OSError):
        pass  # it died: _receive sees the end of its output


def _receive(worker: dict) -> dict | None:
    """The worker's next JSON line, or None when it has died (no more output)."""
    line = worker["proc"].stdout.readline()
    return json.loads(line) if line else None


def _death(proc) -> str:
    """How a worker process ended, in words: "the worker died of SIGSEGV" / "... exited with status 1"."""
    import signal

    try:
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return "the worker stopped answering"
    if code < 0:
        try:
            return f"the worker died of {signal.Signals(-code).name}"
        except ValueError:
            return f"the worker died of signal {-code}"
    return f"the worker exited with status {code}"


# ------------------------------------------------------------------------------------------- reporting
def _summarize(args, prep, machine, singles, dialogues, rss, skipped) -> dict:
    rows = []
    for name, runs in singles.items():
        spec = prep["specs"][name]
        kind, precision = name.rsplit("-", 1)
        med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
        rng = lambda key: [round(min(r[key] for r in runs), 2), round(max(r[key] for r in runs), 2)]  # noqa: E731
        decode = med("decode_tok_s")
        gbs = decode * spec["weight_bytes"] / 1e9
        rows.append({"backend": {"ort": "belle_edge-onnxruntime", "torch": "belle_edge-torch",
                                 "transformers": "transformers", "llamacpp": "llama.cpp"}[kind],
                     "variant": name, "precision": precision, "ttft_ms": round(med("ttft_ms"), 1),
                     "ttft_ms_range": rng("ttft_ms"), "prefill_tok_s": round(med("prefill_tok_s"), 1),
                     "decode_tok_s": round(decode, 2), "decode_tok_s_range": rng("decode_tok_s"),
                     "peak_rss_mb": round(rss[name], 1), "weight_mb": round(spec["weight_bytes"] / 2**20, 1),
                     "achieved_gbs": round(gbs, 2), "roofline_pct": round(100 * gbs / machine["mem_bw_gbs"], 1),
                     "runs": len(runs)})
    by = {r["variant"]: r for r in rows}
    for r in rows:  # same-run ratios against the peers
        for peer in ("transformers-fp32", "llamacpp-f32", "llamacpp-q4"):
            if peer in by and peer != r["variant"]:
                r[f"decode_x_{peer}"] = round(r["decode_tok_s"] / by[peer]["decode_tok_s"], 2)
                r[f"ttft_x_{peer}"] = round(r["ttft_ms"] / by[peer]["ttft_ms"], 2)
    turns = [{"variant": name, "turn": i + 1, **{k: round(v, 2) for k, v in t.items()}}
             for name, runs in dialogues.items() for i, t in enumerate(runs[0])]
    return {"machine": machine, "model": prep["ckpt_name"],
            "settings": {"prompt_tokens": len(prep["prompt_ids"]), "new_tokens": args.new_tokens,
                         "runs": args.runs, "threads": args.threads, "turns": args.turns,
                         "turn_new_tokens": args.turn_new_tokens, "greedy": True, "eos_ignored": True},
            "rows": rows, "turns": turns, "skipped": skipped}


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"# belle-edge bench: {os.path.basename(result['model'])}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, memory copy {m['mem_bw_gbs']} GB/s; "
             f"prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens, greedy, median of {s['runs']} "
             "runs [min-max], variants interleaved.", "",
             "| variant | TTFT ms | prefill tok/s | decode tok/s | x transformers | x llama.cpp F32 | x llama.cpp Q4 "
             "| peak RSS MB | weights MB | roofline % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        x = lambda peer: str(r.get(f"decode_x_{peer}", "-"))  # noqa: E731
        lines.append(f"| {r['variant']} | {r['ttft_ms']:.0f} [{r['ttft_ms_range'][0]:.0f}-{r['ttft_ms_range'][1]:.0f}]"
                     f" | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} [{r['decode_tok_s_range'][0]:.1f}-"
                     f"{r['decode_tok_s_range'][1]:.1f}] | {x('transformers-fp32')} | {x('llamacpp-f32')} | "
                     f"{x('llamacpp-q4')} | {r['peak_rss_mb']:.0f} | {r['weight_mb']:.0f} | {r['roofline_pct']} |")
    if result["turns"]:
        variants = sorted({t["variant"] for t in result["turns"]})
        lines += ["", f"Dialogue: {s['turns']} turns, {s['turn_new_tokens']} new tokens per reply; TTFT ms per turn "
                      "(prompt tokens handed to the tool: belle_edge sends only the new turn, the peers the whole "
                      "conversation; llama.cpp then reuses its cached prefix, transformers recomputes it)", "",
                  "| turn | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
        for turn in range(1, s["turns"] + 1):
            cells = []
            for v in variants:
                t = next(t for t in result["turns"] if t["variant"] == v and t["turn"] == turn)
                cells.append(f"{t['ttft_ms']:.0f} ({t['prompt_tokens']:.0f})")
            lines.append(f"| {turn} | " + " | ".join(cells) + " |")
    for sk in result["skipped"]:
        lines.append(f"\nSkipped {sk['backend']}: {sk['reason']}")
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = result["rows"]
    ncols = 3 if result["turns"] else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4))
    names = [r["variant"] for r in rows]
    for ax, key, label in ((axes[0], "decode_tok_s", "decode tokens/s"), (axes[1], "ttft_ms", "time to first token, ms")):
        # medians and ranges are rounded separately: clip so a rounding step never makes an error bar negative
        ax.barh(names, [r[key] for r in rows], xerr=[[max(0.0, r[key] - r[key + "_range"][0]) for r in rows],
                                                      [max(0.0, r[key + "_range"][1] - r[key]) for r in rows]])
        ax.set_xlabel(label)
    if result["turns"]:
        for v in sorted({t["variant"] for t in result["turns"]}):
            pts = [t for t in result["turns"] if t["variant"] == v]
            axes[2].plot([t["turn"] for t in pts], [t["ttft_ms"] for t in pts], marker="o", label=v)
        axes[2].set_xlabel("turn")
        axes[2].set_ylabel("TTFT ms")
        axes[2].legend(fontsize=7)
    fig.suptitle(f"belle-edge bench ({result['machine']['cpu']}, {result['machine']['threads']} threads)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
