"""``serve``: an OpenAI-compatible HTTP server and a chat page over the batched engine (belle_edge/serve)."""
from __future__ import annotations

import argparse
import os
import socket

from ..errors import InputError, MissingDependencyError
from .common import add_model_args, load_model

API_KEY_ENV = "BELLE_EDGE_API_KEY"


def register(sub) -> None:
    serve = sub.add_parser("serve", help="serve a model over HTTP: OpenAI's chat completions API and a chat page")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1/ (default: ${API_KEY_ENV}, "
                                         "else open)")
    serve.add_argument("--max-batch", type=int, default=4, help="KV slots = sequences decoded together (default 4)")
    serve.add_argument("--kv-tokens", type=int, help="KV tokens per slot (default: the model's default capacity)")
    serve.add_argument("--max-queue", type=int, default=16,
                       help="requests that may wait for a slot; one more is answered 429 (default 16)")
    serve.add_argument("--window", type=_window, default=3, help="context turns W of the turn window, or 'off' "
                                                                 "for plain causal attention (default 3)")
    serve.add_argument("--sinks", type=int, default=4, help="sink tokens S always visible (default 4)")
    serve.add_argument("--max-tokens-limit", type=int, default=2048,
                       help="the most tokens one reply may ask for; more is answered 400 (default 2048)")
    serve.set_defaults(handler=run_serve)


def _window(text: str) -> int | None:
    if text.strip().lower() == "off":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of turns or 'off', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 turn (or 'off'), got {value}")
    return value


def _require_serve_extra():
    import importlib

    try:
        importlib.import_module("fastapi")
        uvicorn = importlib.import_module("uvicorn")
    except ImportError as e:
        raise MissingDependencyError(f"belle-edge serve needs fastapi and uvicorn ({e.name} is missing): "
                                     "pip install 'belle_edge[serve]'") from None
    return uvicorn


def run_serve(args) -> int:
    uvicorn = _require_serve_extra()  # before the slow load
    from ..runtime.engine import BatchEngine, EngineConfig
    from ..serve.app import create_app

    config = EngineConfig(max_batch=args.max_batch, kv_tokens=args.kv_tokens, max_queue=args.max_queue,
                          window=args.window, sinks=args.sinks)  # a bad setting fails before the load, too
    if args.max_tokens_limit < 1:
        raise InputError(f"--max-tokens-limit: expected a whole number >= 1, got {args.max_tokens_limit}")
    sock = _listen(args.host, args.port)  # and a port in use
    try:
        model = load_model(args)
        engine = BatchEngine(model, config)
        api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
        app = create_app(engine, model_name=model.name, api_key=api_key, max_tokens_limit=args.max_tokens_limit)
        host = f"[{args.host}]" if ":" in args.host else args.host
        base = f"http://{host}:{sock.getsockname()[1]}"
        print(f"serving {model.name} at {base}/ (OpenAI API at {base}/v1{', API key required' if api_key else ''}); "
              "Ctrl-C stops", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=15))
        try:  # the app closes the engine on shutdown, after the open requests (15 s at most)
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down: the normal end
            pass
        finally:
            engine.close(timeout=1.0)  # a no-op after the app's; covers a server that failed to start
    finally:
        sock.close()
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound now so that a taken port is one line before a long load (port 0: any free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:  # OverflowError: a port past 65535
        sock.close()
        reason = getattr(e, "strerror", None) or e
        raise InputError(f"cannot listen on {host}:{port} ({reason}); pick another --port or --host") from None
    return sock
