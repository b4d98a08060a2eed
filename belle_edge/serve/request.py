"""The body of ``POST /v1/chat/completions``, checked field by field, and the errors the server answers with.

Every refusal is an :class:`ApiError`: an HTTP status and OpenAI's error object, whose ``param`` names the
field (``messages[2].role``), so a client library raises its usual exception (``openai.BadRequestError``).

Fields read (anything else is ignored, as most clients send a few extras):

======================  =====================================  ===========================================
field                   accepted                               default
======================  =====================================  ===========================================
model                   a name, never a file path (below)      —
messages                1..max_messages {role, content},       required
                        at most max_prompt_chars characters
                        of content in all
stream                  bool                                   false
stream_options          {include_usage: bool}                  include_usage false
temperature             number in [0, 2]                       1 (as OpenAI's API; 0 is greedy)
top_p                   number in (0, 1]                       1
max_tokens              whole number in [1, max_tokens_limit]  max_tokens_limit
 (max_completion_tokens the same, its newer name)
stop                    a string or a list of at most 4        none
seed                    whole number                           none
n                       1                                      1
notes                   {key: value} strings, at most 16:      the conversation's as the server holds them
                        the pinned notes (belle_edge's own     (none for a new one); a change enters with
                        field; ``extra_body`` in openai's      this request's turn
                        client)
======================  =====================================  ===========================================

No field names a file: ``model`` is only compared with the served model's name (the answer names ours,
whatever was asked), and a name that reads as a path or a URL (``..``, a leading ``/`` or ``~``, a
backslash, ``://``, a control character) is refused with 400 unless it is exactly our model's name. Text
that is not Unicode (a lone surrogate, which JSON's ``\\ud800`` escapes can carry) and JSON nested past
Python's recursion limit are refused with 400, never a 500.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import BelleEdgeError

ROLES = ("system", "user", "assistant")
MAX_STOP = 4
MAX_SEED = 2**63 - 1
MAX_MODEL_NAME = 256  # characters


class ApiError(BelleEdgeError):
    """A refused request: the HTTP status and the fields of OpenAI's ``{"error": {...}}`` object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict, ...]  # each {"role": ..., "content": str}
    stream: bool = False
    include_usage: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    notes: dict | None = None


def parse_chat_request(raw: bytes, *, max_tokens_limit: int, max_messages: int, max_prompt_chars: int = 100_000,
                       model_name: str | None = None) -> ChatRequest:
    """The request body (bytes) -> a ChatRequest; ApiError(400) naming the field otherwise. ``model_name``:
    the served model's, the one path-like name accepted."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise bad_request(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    except RecursionError:  # [[[[... deeper than the interpreter's stack
        raise bad_request("the request body is JSON nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_kind(body)}")
    _model(body.get("model"), model_name)
    _unsupported(body)

    messages = _messages(body.get("messages"), max_messages, max_prompt_chars)
    stream = _optional(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request(f"stream_options: expected an object, got {_kind(options)}", "stream_options")
    include_usage = _optional(options or {}, "include_usage", bool, False, prefix="stream_options.")

    temperature = _number(body, "temperature", 1.0, low=0.0, high=2.0)
    top_p = _number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True)
    n = _integer(body, "n", 1, low=1)
    if n != 1:
        raise bad_request(f"n: only 1 choice per request is supported, got {n}", "n")
    max_tokens = _max_tokens(body, max_tokens_limit)
    seed = _integer(body, "seed", None, low=-MAX_SEED, high=MAX_SEED)
    return ChatRequest(messages=messages, stream=stream, include_usage=include_usage, temperature=temperature,
                       top_p=top_p, max_tokens=max_tokens, stop=_stop(body.get("stop")),
                       seed=None if seed is None else seed % 2**63,  # numpy seeds are >= 0
                       notes=_notes(body.get("notes")))


def _kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _model(model, served: str | None) -> None:
    """``model`` is a name to compare, never a file to open: one that reads as a path is refused."""
    if model is None:
        return
    if not isinstance(model, str):
        raise bad_request(f"model: expected a string, got {_kind(model)}", "model")
    if model == served:
        return
    if len(model) > MAX_MODEL_NAME:
        raise bad_request(f"model: at most {MAX_MODEL_NAME} characters, got {len(model)}", "model",
                          code="invalid_model")
    if (".." in model or "\\" in model or "://" in model or model.startswith(("/", "~"))
            or any(ord(c) < 32 or ord(c) == 127 for c in model)):
        also = f"; this server serves {served!r}" if served else ""
        raise bad_request(f"model: expected a model name, not a file path, got {model!r}{also}", "model",
                          code="invalid_model")


def _text(text: str, where: str) -> str:
    """``text``, checked to be Unicode that UTF-8 can carry (JSON's escapes can make lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{where}: not valid Unicode (a lone surrogate {text[e.start]!r} at character "
                          f"{e.start})", where) from None
    return text


def _unsupported(body: dict) -> None:
    """Fields that would change the answer's meaning if ignored."""
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad_request(f"{name}: tool and function calls are not supported by this server", name)
    if body.get("logprobs"):
        raise bad_request("logprobs: not supported by this server", "logprobs")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad_request("response_format: only {\"type\": \"text\"} is supported", "response_format")


def _messages(messages, max_messages: int, max_prompt_chars: int) -> tuple[dict, ...]:
    if messages is None:
        raise bad_request("messages: required (a list of {role, content})", "messages")
    if not isinstance(messages, list):
        raise bad_request(f"messages: expected an array, got {_kind(messages)}", "messages")
    if not messages:
        raise bad_request("messages: expected at least one message", "messages")
    if len(messages) > max_messages:
        raise bad_request(f"messages: at most {max_messages} messages per request, got {len(messages)}", "messages")
    out, chars = [], 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where}: expected an object with role and content, got {_kind(m)}", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role: expected one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        content = _content(m.get("content"), f"{where}.content")
        chars += len(content)
        out.append({"role": role, "content": content})
    if chars > max_prompt_chars:
        raise bad_request(f"messages: at most {max_prompt_chars} characters of content per request on this server, "
                          f"got {chars}", "messages", code="prompt_too_long")
    return tuple(out)


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return _text(content, where)
    if isinstance(content, list):  # content parts: text only
        texts = []
        for k, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(f"{where}[{k}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                  "supported", f"{where}[{k}]")
            texts.append(_text(part["text"], f"{where}[{k}].text"))
        return "".join(texts)
    raise bad_request(f"{where}: expected a string, got {_kind(content)}", where)


def _optional(body: dict, name: str, kind: type, default, *, prefix: str = ""):
    value = body.get(name)
    if value is None:
        return default
    if type(value) is not kind:
        raise bad_request(f"{prefix}{name}: expected {_kind(kind())}, got {_kind(value)}", prefix + name)
    return value


def _number(body: dict, name: str, default: float, *, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"{name}: expected a number, got {_kind(value)}", name)
    value = float(value)
    if not (low < value <= high if low_open else low <= value <= high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad_request(f"{name}: expected a number in {interval}, got {value:g}", name)
    return value


def _integer(body: dict, name: str, default, *, low: int, high: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name}: expected a whole number, got {_kind(value)}", name)
    if value < low or (high is not None and value > high):
        raise bad_request(f"{name}: expected a whole number in [{low}, {high if high is not None else '...'}], "
                          f"got {value}", name)
    return value


def _max_tokens(body: dict, limit: int) -> int:
    names = [n for n in ("max_completion_tokens", "max_tokens") if body.get(n) is not None]
    if not names:
        return limit
    name = names[0]  # the newer name wins where a client sends both
    value = _integer(body, name, None, low=1)
    if value > limit:
        raise bad_request(f"{name}: at most {limit} tokens per reply on this server, got {value}", name)
    return value


def _notes(notes) -> dict | None:
    from ..runtime.notes import MAX_NOTES, check_note

    if notes is None:
        return None
    if not isinstance(notes, dict) or len(notes) > MAX_NOTES:
        raise bad_request(f"notes: expected an object of at most {MAX_NOTES} key: value strings, got {_kind(notes)}",
                          "notes")
    for key, value in notes.items():
        try:
            check_note(key, value)
        except BelleEdgeError as e:
            raise bad_request(f"notes: {e}", "notes") from None
    return dict(notes)


def _stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request(f"stop: expected a string or an array of strings, got {_kind(stop)}", "stop")
    if len(stop) > MAX_STOP:
        raise bad_request(f"stop: at most {MAX_STOP} stop strings, got {len(stop)}", "stop")
    if not all(stop):
        raise bad_request("stop: stop strings must not be empty", "stop")
    for s in stop:
        _text(s, "stop")
    return tuple(stop)
