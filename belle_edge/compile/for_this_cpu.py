"""A model compiled once for this CPU, at the precision that decodes fastest here — measured, not assumed.

What ``belle-edge demo`` chats on. Decode on a CPU is bound by the bytes of weights read per token, but
which weight-only kernel of ONNX Runtime turns fewer bytes into more tokens per second depends on the
processor (on an AMD EPYC the 8-bit kernels beat the 4-bit ones for SmolLM2; on an AVX-512/AMX Xeon they
need not). So each candidate precision is compiled (once: artifacts are cached), a fixed greedy reply is
timed on each, the candidates taking turns run by run, and the fastest is remembered for this processor, thread count and ONNX Runtime version in
``<cache>/artifacts/<model>-cpu.choice.json``; a different machine measures again, from the same artifacts.

fp32 is not a candidate: it reads four times the bytes of int8 per token (2.5 GB for Qwen2.5-0.5B) and
has never been the fastest here (benchmarks/results/bench-default).
"""
from __future__ import annotations

import json
import os
import statistics

from ..core.folders import write_json_atomic
from ..errors import BelleEdgeError
from ..machine import cpu_name, usable_cores
from ..paths import cache_or_temp_dir

CANDIDATES = ("int8", "int4")
PROMPT = "请详细介绍一下中国的茶文化，包括历史、种类和饮茶习惯。"  # long enough an answer for 48 tokens
NEW_TOKENS = 48
RUNS = 3


def artifact_for_this_cpu(model: str, *, precision: str | None = None, log=print) -> str:
    """The folder of ``model`` (a known model's name or a path) compiled for the cpu target: at
    ``precision``, or at the candidate that decodes fastest on this machine (compiling and measuring what is
    not cached yet)."""
    if precision is not None:
        return _compiled(model, precision, log)
    choice_path = os.path.join(_root(), f"{_slug(model)}-cpu.choice.json")
    here = _machine_key()
    choice = _read_choice(choice_path)
    if choice and choice.get("machine") == here:
        folder = _folder(model, choice["chosen"])
        if _usable(folder):
            log(f"{model}: {choice['chosen']} decodes fastest here ({_figures(choice)}; measured before, "
                f"{choice_path})")
            return folder
    folders = {p: _compiled(model, p, log) for p in CANDIDATES}
    log(f"timing a {NEW_TOKENS}-token greedy reply on the {' and '.join(CANDIDATES)} artifacts, in turn ...")
    measured = decode_tokens_per_second(folders)
    chosen = max(measured, key=measured.get)
    choice = {"model": model, "machine": here, "decode_tok_s": measured, "chosen": chosen,
              "prompt": PROMPT, "new_tokens": NEW_TOKENS, "runs": RUNS}
    write_json_atomic(choice_path, choice)
    log(f"{model}: {chosen} decodes fastest here ({_figures(choice)})")
    return _folder(model, chosen)


def decode_tokens_per_second(folders: dict[str, str]) -> dict[str, float]:
    """Median decode rate of a fixed greedy reply on each artifact, over :data:`RUNS` fresh sessions after one
    warm-up each. The artifacts take turns run by run, so the machine's noise (2-core VMs swing 2x) falls on
    all of them alike rather than on whichever happened to run during a busy minute."""
    from ..runtime.artifact import load_artifact

    models = {p: load_artifact(folder, backend="onnxruntime") for p, folder in folders.items()}
    rates = {p: [] for p in models}
    for run in range(RUNS + 1):
        for p, model in models.items():
            reply = model.session(max_new_tokens=NEW_TOKENS).send(PROMPT)
            if run:  # the first run pays for the arena's first growth
                rates[p].append(reply.stats.decode_tok_s)
    return {p: round(statistics.median(r), 2) for p, r in rates.items()}


def _compiled(model: str, precision: str, log) -> str:
    folder = _folder(model, precision)
    if _usable(folder):
        return folder
    from .pipeline import CompileConfig, compile_model

    log(f"compiling {model} for this CPU at {precision} (once; cached in {folder}) ...")
    compile_model(CompileConfig(out=folder, model=model, precision=precision, force=True), progress=True)
    return folder


def _usable(folder: str) -> bool:
    """A complete artifact this version reads, its graph traced with this version's mask rule (an older one is
    compiled again)."""
    from ..manifest import is_artifact, read_manifest
    from ..mask import RULE_VERSION

    if not is_artifact(folder):
        return False
    try:
        return read_manifest(folder).runtime.mask_rule == RULE_VERSION
    except BelleEdgeError:
        return False


def _root() -> str:
    return cache_or_temp_dir("artifacts")


def _slug(model: str) -> str:
    """A model's name in the cache: a known model by its name, a path by its folder name and a hash."""
    import hashlib

    from ..known_models import known_model

    if known_model(model) is not None:
        return model
    path = os.path.abspath(model)
    return f"{os.path.basename(path.rstrip(os.sep))}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def _folder(model: str, precision: str) -> str:
    return os.path.join(_root(), f"{_slug(model)}-cpu-{precision}")


def _machine_key() -> dict:
    import onnxruntime

    return {"cpu": cpu_name(), "threads": usable_cores(), "onnxruntime": onnxruntime.__version__}


def _read_choice(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            choice = json.load(f)
        return choice if isinstance(choice, dict) and choice.get("chosen") in CANDIDATES else None
    except (OSError, ValueError):
        return None


def _figures(choice: dict) -> str:
    return ", ".join(f"{p} {r} tok/s" for p, r in choice["decode_tok_s"].items())
