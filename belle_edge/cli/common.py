"""Pieces several commands share: the model and session flags, reading text files, parameter counts."""
from __future__ import annotations

import argparse
import sys

from ..errors import InputError

MODEL_HELP = "HF checkpoint directory, GGUF file or known model name (default: qwen2.5-0.5b)"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--chat-format", default="auto", help="auto | template | belle | belle-v2 (default: auto)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin pickle weights (unpickling runs code)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (torch backend)")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] (torch backend)")
    p.add_argument("--weight-only", choices=("int4", "int8"),
                   help="torch backend: linears as 4/8-bit codes through the weight-only GEMM kernels (CUDA)")
    p.add_argument("--max-positions", type=int, help="override the model's position limit")
    p.add_argument("--backend", default="auto",
                   help="artifacts: auto | tensorrt | onnxruntime (auto: the engine where it can run, else ONNX)")
    p.add_argument("--threads", type=int, help="CPU threads (artifacts on ONNX Runtime)")


def add_session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", help="system prompt (turn 0, always visible)")
    p.add_argument("--window", type=int, default=3, help="context turns W of the turn window (default 3)")
    p.add_argument("--no-window", action="store_true", help="plain causal attention: the original model")
    p.add_argument("--sinks", type=int, default=4, help="sink tokens S always visible (default 4)")
    p.add_argument("--auto-notes", action="store_true",
                   help="pin the order numbers, phone numbers, addresses and e-mails of your messages as notes that "
                        "outlive the window (/pin KEY VALUE for the rest)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-kv-tokens", type=int, help="KV-cache slots to allocate (default min(positions, 4096))")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)


def read_texts(paths: list[str] | None, flag: str) -> tuple[str, ...] | None:
    """The UTF-8 files named by a repeatable flag; each must hold text."""
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


def parameter_count(text: str) -> int:
    """58000000, 58M, 3B, 1.5b ... as a whole number (an argparse type)."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}
    t = text.strip().lower().replace(",", "").replace("_", "")
    try:
        return int(float(t[:-1]) * scale[t[-1]]) if t and t[-1] in scale else int(float(t))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected a parameter count like 58000000, 58M or 3B, got {text!r}") from None


def info(message: str) -> None:
    """Progress and notes: stderr, so stdout stays the command's result."""
    print(message, file=sys.stderr, flush=True)


def load_model(args):
    """The model the command names (add_model_args), with a line before and after: loads take seconds."""
    import time

    from ..api import load

    t0 = time.perf_counter()
    info(f"loading {args.model or 'the default model'} ...")
    model = load(args.model, dtype=args.dtype, device=args.device, chat_format=args.chat_format,
                 allow_pickle=args.allow_pickle, max_positions=args.max_positions, threads=args.threads,
                 backend=args.backend, weight_only=args.weight_only)
    info(f"loaded {model.name} in {time.perf_counter() - t0:.1f} s (backend {model.backend_name}, "
         f"format {model.chat_format.name})")
    return model
