"""``serve``: an OpenAI-compatible HTTP server and a chat page over the batched engine (belle_edge/serve)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from ..errors import InputError, MissingDependencyError
from .common import add_model_args, load_model

API_KEY_ENV = "BELLE_EDGE_API_KEY"
# the server's limits per request (serve/app.py's defaults; kept here so that --help needs no fastapi)
LIMITS = dict(max_request_bytes=1_000_000, max_tokens_limit=2048, max_messages=256, max_prompt_chars=100_000)


def register(sub) -> None:
    serve = sub.add_parser("serve", help="serve a model over HTTP: OpenAI's chat completions API and a chat page")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                            "only; 0.0.0.0 opens it to the network)")
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
    limits = serve.add_argument_group("limits per request (more is refused with one line naming the limit)")
    limits.add_argument("--max-tokens-limit", type=int, default=LIMITS["max_tokens_limit"],
                        help=f"the most tokens one reply may ask for; more is answered 400 "
                             f"(default {LIMITS['max_tokens_limit']})")
    limits.add_argument("--max-request-bytes", type=int, default=LIMITS["max_request_bytes"],
                        help=f"the largest request body; more is answered 413 before it is read "
                             f"(default {LIMITS['max_request_bytes']})")
    limits.add_argument("--max-messages", type=int, default=LIMITS["max_messages"],
                        help=f"the most messages in one request; more is answered 400 "
                             f"(default {LIMITS['max_messages']})")
    limits.add_argument("--max-prompt-chars", type=int, default=LIMITS["max_prompt_chars"],
                        help=f"the most characters of content in one request's messages together; more is "
                             f"answered 400 (default {LIMITS['max_prompt_chars']})")
    limits.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                        help="the most connections served at once; more are answered 503 at once, before their "
                             f"bodies are read (default {MAX_CONNECTIONS})")
    serve.set_defaults(handler=run_serve)


MAX_CONNECTIONS = 256  # uvicorn sets no bound: each open connection may be reading a body of --max-request-bytes


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
    for name in (*LIMITS, "max_connections"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}: expected a whole number >= 1, got {getattr(args, name)}")
    sock = _listen(args.host, args.port)  # and a port in use
    try:
        model = load_model(args)
        engine = BatchEngine(model, config)
        api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
        app = create_app(engine, model_name=model.name, api_key=api_key,
                         **{name: getattr(args, name) for name in LIMITS})
        host = f"[{args.host}]" if ":" in args.host else args.host
        base = f"http://{host}:{sock.getsockname()[1]}"
        if not api_key and not _loopback(args.host):
            print(f"warning: listening on {args.host} without an API key: anyone who can reach port "
                  f"{sock.getsockname()[1]} can use this server (--api-key or ${API_KEY_ENV})", file=sys.stderr)
        print(f"serving {model.name} at {base}/ (OpenAI API at {base}/v1{', API key required' if api_key else ''}); "
              "Ctrl-C stops", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=15,
                                                limit_concurrency=args.max_connections))
        try:  # the app closes the engine on shutdown, after the open requests (15 s at most)
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down: the normal end
            pass
        finally:
            engine.close(timeout=1.0)  # a no-op after the app's; covers a server that failed to start
    finally:
        sock.close()
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may be anything
        return False


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
