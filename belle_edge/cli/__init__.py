"""``belle-edge``: the command line. Thin: parses, calls the library, prints.

One module per family of commands — chat.py (chat, demo), compile.py (compile and its stages run alone:
quantize, export, build-engine; inspect), prune.py (prune, eval-fidelity), train.py (data clean, train,
eval), setup.py (fetch-model) — each adding its parsers with the function that runs them. A user's mistake ends in one line on
stderr (``belle-edge: error: ...``) and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import BelleEdgeError, MissingDependencyError
from . import chat, compile, prune, serve, setup, train

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="belle-edge", description="Edge deployment SDK for BELLE-family chat LLMs.")
    parser.add_argument("--version", action="version", version=f"belle-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    chat.register(sub)
    compile.register(sub)
    prune.register(sub)
    train.register(sub)
    setup.register(sub)
    serve.register(sub)
    _register_bench(sub)
    return parser


def _register_bench(sub) -> None:
    bench = sub.add_parser("bench", help="latency against transformers and llama.cpp, same run")
    try:
        from benchmarks.latency import build_parser as bench_parser, run  # the benchmark lives in benchmarks/
    except ImportError:  # an install without the benchmarks package: every other command still works
        bench.set_defaults(handler=_bench_missing)
    else:
        bench_parser(bench)
        bench.set_defaults(handler=run)


def _bench_missing(args) -> int:
    raise MissingDependencyError("the benchmarks package is not installed with belle_edge here; install from a "
                                 "checkout: pip install -e '.[bench]'")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except BelleEdgeError as e:
        print(f"belle-edge: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
