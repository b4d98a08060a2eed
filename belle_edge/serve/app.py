"""The HTTP server: OpenAI's chat completions API and a chat page over a :class:`~belle_edge.runtime.engine.BatchEngine`.

==============================  =====================================================================
route                           answer
==============================  =====================================================================
POST /v1/chat/completions       ``chat.completion``, or with ``stream: true`` server-sent events of
                                ``chat.completion.chunk`` (role, content deltas, finish_reason, the usage
                                chunk if ``stream_options.include_usage``) ending in ``data: [DONE]``
GET  /v1/models[/{id}]          our one model, in OpenAI's list format
GET  /health                    ``{"status": "ok"}``; 503 while shutting down
GET  /metrics                   Prometheus text (serve/metrics.py)
GET  /                          the chat page (serve/page.html)
==============================  =====================================================================

A request's life::

    auth (401) -> body <= max_request_bytes (413) -> fields (400, request.py: at most max_messages messages,
      max_prompt_chars characters, max_tokens_limit tokens) -> engine.submit (400, 429, 503)
      -> generation.start() in a worker thread: waits for a KV slot, reuses or prefills the history (400)
      -> the reply, iterated in worker threads (one ``next`` each) -> JSON, or one event per piece

Every refusal is OpenAI's error object, so client libraries raise their usual exceptions; no user's mistake
ends in a 500. The engine's blocking calls never run on the event loop. When the client goes away (also
while the request waits for a slot) its generation is cancelled at once, which frees its KV slot.

Guards: the API key is compared in constant time (``hmac.compare_digest`` of SHA-256 digests, so not even its
length shows in the timing). A body is refused by its Content-Length before a byte of it is read, or as soon
as a chunked one passes the limit, with ``Connection: close`` so that the rest is not drained (neither uvicorn
nor starlette bounds a body). No request names a file: nothing here opens one but the page, at start.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from importlib import resources

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import BelleEdgeError, ContextFullError, EngineClosedError, InputError, QueueFullError
from ..runtime.sampler import SamplingConfig
from .metrics import ServerMetrics
from .request import ApiError, ChatRequest, bad_request, parse_chat_request

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}  # engine -> OpenAI
CLIENT_GONE = 499  # the status counted for a request whose client left before the reply was complete
log = logging.getLogger("belle_edge.serve")


DEFAULT_LIMITS = dict(max_request_bytes=1_000_000, max_tokens_limit=2048, max_messages=256, max_prompt_chars=100_000)


def create_app(engine, *, model_name: str, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_LIMITS["max_request_bytes"],
               max_tokens_limit: int = DEFAULT_LIMITS["max_tokens_limit"],
               max_messages: int = DEFAULT_LIMITS["max_messages"],
               max_prompt_chars: int = DEFAULT_LIMITS["max_prompt_chars"], shutdown_timeout: float = 10.0) -> FastAPI:
    """The app over ``engine`` (which it closes on shutdown, letting running replies finish for up to
    ``shutdown_timeout`` seconds). ``api_key``: None serves anyone; else ``Authorization: Bearer <key>``
    is required on /v1/ (the page, /health and /metrics stay open). The limits are per request: body bytes,
    tokens of the reply, messages, characters of content in all messages."""
    limits = dict(max_request_bytes=max_request_bytes, max_tokens_limit=max_tokens_limit, max_messages=max_messages,
                  max_prompt_chars=max_prompt_chars)
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name}: expected a whole number >= 1, got {value!r}")
    server = _Server(engine, model_name=model_name, api_key=api_key, **limits)
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            server.closing = True
            await anyio.to_thread.run_sync(engine.close, shutdown_timeout)

    app = FastAPI(title="belle_edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    _add_routes(app, server, page)
    return app


def _add_routes(app: FastAPI, server: "_Server", page: str) -> None:
    engine, model_name = server.engine, server.model_name

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            response = await server.chat(request)
        except ApiError as e:
            response = _error_response(e)
        except _ClientGone:
            response = Response(status_code=CLIENT_GONE)  # nobody reads it
        if not isinstance(response, _EventStream):  # a stream counts itself when it ends
            server.metrics.count_request(response.status_code)
        return response

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        try:
            server.authorize(request)
        except ApiError as e:
            return _error_response(e)
        return JSONResponse({"object": "list", "data": [server.model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str, request: Request) -> Response:
        try:
            server.authorize(request)
            if model_id != model_name:
                raise ApiError(404, f"the model {model_id!r} does not exist here; this server has {model_name!r}",
                               param="model", code="model_not_found")
        except ApiError as e:
            return _error_response(e)
        return JSONResponse(server.model_card())

    @app.get("/health")
    async def health() -> Response:
        if server.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(server.metrics.render(engine.metrics()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def chat_page() -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


class _ClientGone(Exception):
    """The client disconnected while its request was being served."""


class _Server:
    def __init__(self, engine, *, model_name: str, api_key: str | None, max_request_bytes: int,
                 max_tokens_limit: int, max_messages: int, max_prompt_chars: int):
        self.engine, self.model_name = engine, model_name
        self._key = _digest(api_key.encode("utf-8")) if api_key else None
        self.max_request_bytes, self.max_tokens_limit, self.max_messages, self.max_prompt_chars = \
            max_request_bytes, max_tokens_limit, max_messages, max_prompt_chars
        self.metrics = ServerMetrics()
        self.created = int(time.time())
        self.closing = False
        self._limiters: tuple | None = None

    def limiters(self) -> tuple:
        """Worker threads for (requests waiting for a slot, requests holding one), apart: were they one pool
        (starlette's 40), enough waiting requests would take every thread and the running ones, which need a
        thread to take a step and free their slot, would never get one. Made in the event loop, on first use."""
        if self._limiters is None:
            config = self.engine.config
            self._limiters = (anyio.CapacityLimiter(config.max_batch + config.max_queue + 1),
                              anyio.CapacityLimiter(config.max_batch + 1))
        return self._limiters

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "belle_edge"}

    def authorize(self, request: Request) -> None:
        if self._key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # headers arrive decoded as latin-1: back to their bytes, which a UTF-8 key is compared with; as digests,
        # of one length whatever was sent, in constant time
        given = _digest(token.strip().encode("latin-1"))
        if not hmac.compare_digest(given, self._key) or scheme.lower() != "bearer":
            raise ApiError(401, "missing or incorrect API key: send the header Authorization: Bearer <key>",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------ POST /v1/chat/completions
    async def chat(self, request: Request) -> Response:
        self.authorize(request)
        if self.closing:
            raise _engine_error(EngineClosedError("the server is shutting down"))
        body = await _read_body(request, self.max_request_bytes)
        req = parse_chat_request(body, max_tokens_limit=self.max_tokens_limit, max_messages=self.max_messages,
                                 max_prompt_chars=self.max_prompt_chars, model_name=self.model_name)
        try:
            sampling = SamplingConfig(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
            gen = self.engine.submit(list(req.messages), sampling=sampling, max_tokens=req.max_tokens, stop=req.stop,
                                     notes=req.notes)
        except BelleEdgeError as e:
            raise _engine_error(e) from None
        waiting, running = self.limiters()
        handed_over = False
        try:
            await _until_disconnect(request, gen, gen.start, waiting)  # waits for a slot, prefills
            if req.stream:
                handed_over = True  # the stream settles it
                return _EventStream(self, gen, req)
            await _until_disconnect(request, gen, lambda: "".join(gen), running)
        except BelleEdgeError as e:
            raise _engine_error(e) from None
        finally:
            if not handed_over:
                await _settle(gen)
        if gen.finish_reason == "cancelled":  # by the engine: it is closing (a request still waiting, too)
            raise _engine_error(EngineClosedError("the server is shutting down; the reply was cut short"))
        self.metrics.observe(gen)
        return JSONResponse({
            "id": _completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text}, "logprobs": None,
                         "finish_reason": _finish_reason(gen)}],
            "usage": _usage(gen),
        })


class _EventStream(StreamingResponse):
    """A reply as server-sent events. It cancels the generation the moment the client disconnects (the
    server's receive says so), and frees it however the stream ends."""

    media_type = "text/event-stream"

    def __init__(self, server: _Server, gen, req: ChatRequest):
        self.server, self.gen, self.req = server, gen, req
        self.pieces = iter(gen)  # held here: _settle closes it in a worker, not the collector anywhere
        self.client_gone = self.complete = False
        super().__init__(self._events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def listen_for_disconnect(self, receive) -> None:
        await super().listen_for_disconnect(receive)
        self._gone()

    def _gone(self) -> None:
        if not self.complete:
            self.client_gone = True
            self.gen.cancel()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except BaseException:
            self._gone()  # ASGI servers of spec 2.4 tell of a disconnect by failing a send
            raise
        finally:
            with anyio.CancelScope(shield=True):  # also when the stream was cancelled
                await self.body_iterator.aclose()  # now, not when it is collected
                await _settle(self.gen, self.pieces)  # here, not in _events: a stream may end before it starts
            self.server.metrics.observe(self.gen)
            self.server.metrics.count_request(200 if self.complete else CLIENT_GONE)

    async def _events(self):
        gen, req = self.gen, self.req
        completion_id, created = _completion_id(), int(time.time())

        def event(choices: list, usage=None) -> bytes:
            chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                     "model": self.server.model_name, "system_fingerprint": None, "choices": choices}
            if req.include_usage:
                chunk["usage"] = usage
            return _sse(chunk)

        def delta(d: dict, finish_reason=None) -> list:
            return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}]

        try:
            yield event(delta({"role": "assistant"}))
            pieces, running = self.pieces, self.server.limiters()[1]
            while (piece := await anyio.to_thread.run_sync(next, pieces, None, limiter=running)) is not None:
                yield event(delta({"content": piece}))  # one worker thread per step, not one per reply
            if self.client_gone:
                return
            if gen.finish_reason == "cancelled":  # by the engine: it is closing (a request still waiting, too)
                yield _sse(_engine_error(EngineClosedError("the server is shutting down; the reply was cut "
                                                           "short")).body())
            else:
                yield event(delta({}, _finish_reason(gen)))
                if req.include_usage:
                    yield event([], _usage(gen))
            self.complete = True
            yield b"data: [DONE]\n\n"
        except BelleEdgeError as e:  # headers are sent: the error becomes the last event
            self.complete = True
            yield _sse(_engine_error(e).body())
        except Exception:
            log.exception("a streamed reply failed")
            self.complete = True
            yield _sse(ApiError(500, "internal server error", type="server_error").body())


async def _until_disconnect(request: Request, gen, fn, limiter: anyio.CapacityLimiter):
    """Run the blocking ``fn`` in a worker thread; should the client disconnect meanwhile, cancel ``gen``
    at once (ending ``fn``) and raise _ClientGone."""
    gone = False

    async def watch():
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        gen.cancel()

    error = None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(watch)
        try:
            await anyio.to_thread.run_sync(fn, limiter=limiter)
        except Exception as e:  # raised below, outside the task group (which would wrap it)
            error = e
        tasks.cancel_scope.cancel()
    if gone:
        raise _ClientGone()
    if error is not None:
        raise error


async def _settle(gen, pieces=None) -> None:
    """Let go of ``gen`` (frees its slot if it did not finish; the engine may take a step's time), also
    when the task is being cancelled. ``pieces``: a half-read iterator of it, closed first, here and now: a
    dropped stream's frames sit in reference cycles (exception tracebacks), so left to the garbage collector
    it would be closed at some allocation in any thread — the event loop's, where it would wait for a step."""
    def close():
        if pieces is not None:
            pieces.close()
        gen.close()

    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(close)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes: refused (413) by its Content-Length before any of it is read, or as
    soon as it passes the limit. ``Connection: close``: the server does not read the rest of it to keep the
    connection."""
    def too_large(got: str) -> ApiError:
        return ApiError(413, f"the request body is {got} bytes, over this server's limit of {limit} bytes",
                        code="request_too_large", headers={"Connection": "close"})

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(declared)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"at least {size}")
        chunks.append(chunk)
    return b"".join(chunks)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _engine_error(e: BelleEdgeError) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineClosedError):
        return ApiError(503, str(e), type="server_error", code="shutting_down")
    if isinstance(e, ContextFullError):
        return bad_request(str(e), "messages", code="context_length_exceeded")
    if isinstance(e, InputError):
        return bad_request(str(e), "messages" if str(e).startswith("message") else None)
    log.error("the engine failed: %s", e)  # a file's or a device's fault, not the client's
    return ApiError(500, str(e), type="server_error")


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = f"unknown request URL: {request.method} {request.url.path}" if exc.status_code == 404 else exc.detail
    return _error_response(ApiError(exc.status_code, str(message), headers=exc.headers))


async def _server_error(request: Request, exc: Exception) -> Response:
    return _error_response(ApiError(500, "internal server error", type="server_error"))  # traceback: the log


def _finish_reason(gen) -> str:
    return FINISH_REASONS.get(gen.finish_reason, "stop")


def _usage(gen) -> dict:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": gen.cached_tokens}}


def _completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"
