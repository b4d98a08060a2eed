"""Readers and a writer for BELLE dialogue data.

Two record formats are read, one JSON object per line (blank lines skipped), or one JSON array of such objects:

1. BELLE multi-turn (``BelleGroup/multiturn_chat_0.8M`` and friends)::

       {"id": "77771", "conversations": [{"from": "human", "value": "..."}, {"from": "assistant", "value": "..."}]}

   "from" is human/user or assistant/gpt/bot (any case); one optional "system" entry may come first (a string
   field "system" next to "conversations" is read the same way). Consecutive messages of one side are joined
   with "\\n". A trailing human message without a reply becomes ``Turn(user, "")``, an assistant message with no
   human message before it ``Turn("", text)``: such one-sided turns are kept here and dropped by cleaning.
2. Instruction (``BelleGroup/train_0.5M_CN`` and Alpaca style)::

       {"instruction": "...", "input": "...", "output": "..."}

   becomes one turn, user = instruction + ("\\n" + input if input else ""). "input" may be absent, empty or
   null; "output" must be present (an empty string gives a one-sided turn).

Either may carry an "id" (a string or an integer). Every mistake in a file raises one-line ``InputError`` naming
``file:line``, the field, what was expected and what was found.

``write_dialogues`` writes the multi-turn format (system first when set, then human/assistant pairs with empty
values kept as ""), so ``read_dialogues(write_dialogues(d))`` gives ``d`` back exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import InputError
from .folders import write_text_atomic

USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"assistant", "gpt", "bot"})
SYSTEM_ROLE = "system"


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str  # "" when the source had no reply (a one-sided turn; cleaning drops those)


@dataclass(frozen=True)
class Dialogue:
    turns: tuple[Turn, ...]
    system: str | None = None
    id: str | None = None

    def __post_init__(self):
        if not isinstance(self.turns, tuple):  # a list is accepted and stored as a tuple (hashable, immutable)
            object.__setattr__(self, "turns", tuple(self.turns))


def _show(value: Any, limit: int = 40) -> str:
    """A value for a one-line message: its JSON type and a short, single-line repr."""
    kind = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return f"{kind} {text}".replace("\n", "\\n")


def _string(value: Any, where: str, field: str, *, optional: bool = False) -> str | None:
    if isinstance(value, str):
        return value
    if optional and value is None:
        return None
    raise InputError(f"{where}: field '{field}': expected a string, got {_show(value)}")


def _record_id(obj: dict, where: str) -> str | None:
    value = obj.get("id")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise InputError(f"{where}: field 'id': expected a string or an integer, got {_show(value)}")


def _parse_conversations(obj: dict, where: str) -> Dialogue:
    messages = obj["conversations"]
    if not isinstance(messages, list):
        raise InputError(f"{where}: field 'conversations': expected an array of {{\"from\", \"value\"}} messages, "
                         f"got {_show(messages)}")
    system = _string(obj.get("system"), where, "system", optional=True)
    turns: list[Turn] = []
    users: list[str] = []
    assistants: list[str] = []
    for i, message in enumerate(messages):
        field = f"conversations[{i}]"
        if not isinstance(message, dict):
            raise InputError(f"{where}: field '{field}': expected an object with \"from\" and \"value\", "
                             f"got {_show(message)}")
        for key in ("from", "value"):
            if key not in message:
                raise InputError(f"{where}: field '{field}.{key}' is missing; each message needs \"from\" and "
                                 f"\"value\"")
        role = _string(message["from"], where, f"{field}.from").strip().lower()
        text = _string(message["value"], where, f"{field}.value")
        if role == SYSTEM_ROLE:
            if i != 0:
                raise InputError(f"{where}: field '{field}.from': a \"system\" message may only come first, "
                                 f"found at position {i}")
            if system is not None:
                raise InputError(f"{where}: field '{field}.from': the record has both a \"system\" field and a "
                                 f"\"system\" message; keep one")
            system = text
        elif role in USER_ROLES:
            if assistants:  # a reply closed the previous turn
                turns.append(Turn("\n".join(users), "\n".join(assistants)))
                users, assistants = [], []
            users.append(text)
        elif role in ASSISTANT_ROLES:
            assistants.append(text)
        else:
            raise InputError(f"{where}: field '{field}.from': expected one of human, user, assistant, gpt, bot, "
                             f"system, got {_show(message['from'])}")
    if users or assistants:
        turns.append(Turn("\n".join(users), "\n".join(assistants)))
    return Dialogue(tuple(turns), system, _record_id(obj, where))


def _parse_instruction(obj: dict, where: str) -> Dialogue:
    if "output" not in obj:
        raise InputError(f"{where}: field 'output' is missing; an instruction record needs \"instruction\" and "
                         f"\"output\" (\"input\" is optional)")
    instruction = _string(obj["instruction"], where, "instruction")
    extra = _string(obj.get("input"), where, "input", optional=True)
    output = _string(obj["output"], where, "output")
    system = _string(obj.get("system"), where, "system", optional=True)
    user = instruction + ("\n" + extra if extra else "")
    return Dialogue((Turn(user, output),), system, _record_id(obj, where))


def parse_record(obj: dict, where: str) -> Dialogue:
    """One record (already decoded JSON) as a ``Dialogue``; ``where`` ("file:line") prefixes every error."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object (a BELLE conversation or an instruction record), "
                         f"got {_show(obj)}")
    if "conversations" in obj:
        return _parse_conversations(obj, where)
    if "instruction" in obj:
        return _parse_instruction(obj, where)
    # field names shown escaped and cut: a name holding a line break broke the one-line message (fuzzing)
    fields = ", ".join(repr(name)[1:-1][:40] for name in sorted(map(str, obj))[:8]) or "none"
    raise InputError(f"{where}: not a known record: expected field 'conversations' (BELLE multi-turn) or "
                     f"'instruction' + 'output' (instruction format), got fields: {fields}")


def _json_error(path: str, err: json.JSONDecodeError, hint: str) -> InputError:
    return InputError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno}); {hint}")


# Beyond JSONDecodeError, decoding raises ValueError for an integer of more than 4,300 digits and RecursionError
# for arrays or objects nested thousands deep (both found by fuzzing, tests/test_fuzz_inputs.py).
_UNDECODABLE = (ValueError, RecursionError)


def _undecodable(where: str, err: Exception, hint: str) -> InputError:
    return InputError(f"{where}: invalid JSON ({str(err).splitlines()[0][:120]}); {hint}")


def _read_array(path: str, text: str) -> list[Dialogue]:
    """A file holding one JSON array: decoded element by element so each error names the element's line."""
    decoder = json.JSONDecoder()
    hint = "expected one JSON array of records"
    ws = " \t\r\n"

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    def line(i: int) -> int:
        return text.count("\n", 0, i) + 1

    dialogues = []
    i = skip(skip(0) + 1)  # past "["
    if i < len(text) and text[i] == "]":
        i = skip(i + 1)
    else:
        while True:
            try:
                obj, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as err:
                raise _json_error(path, err, hint) from None
            except _UNDECODABLE as err:
                raise _undecodable(f"{path}:{line(i)}", err, hint) from None
            dialogues.append(parse_record(obj, f"{path}:{line(i)}"))
            i = skip(end)
            if i < len(text) and text[i] == ",":
                i = skip(i + 1)
                continue
            if i < len(text) and text[i] == "]":
                i = skip(i + 1)
                break
            found = repr(text[i]) if i < len(text) else "the end of the file"
            raise InputError(f"{path}:{line(i)}: invalid JSON (expected ',' or ']' after an array element, found "
                             f"{found}); {hint}")
    if i < len(text):
        raise InputError(f"{path}:{line(i)}: invalid JSON (extra data after the array); {hint}")
    return dialogues


def read_dialogues(path: str) -> list[Dialogue]:
    """All dialogues of a JSON-lines file (or a file that is one JSON array), in file order."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (invalid byte at offset {err.start}); save the file as UTF-8") \
            from None
    except OSError as err:
        raise InputError(f"{path}: cannot read the dialogue file: {err.strerror or err}") from None
    if text.lstrip().startswith("["):
        return _read_array(path, text)
    dialogues = []
    # split on "\n" only: str.splitlines would also split inside JSON strings holding a raw U+2028, U+0085, ...
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno}); expected one JSON "
                             f"object per line (JSON lines) or one JSON array") from None
        except _UNDECODABLE as err:
            raise _undecodable(f"{path}:{lineno}", err, "expected one JSON object per line (JSON lines) or one JSON "
                                                        "array") from None
        dialogues.append(parse_record(obj, f"{path}:{lineno}"))
    return dialogues


def _record(dialogue: Dialogue) -> dict:
    messages = []
    if dialogue.system is not None:
        messages.append({"from": "system", "value": dialogue.system})
    for turn in dialogue.turns:
        messages.append({"from": "human", "value": turn.user})
        messages.append({"from": "assistant", "value": turn.assistant})
    record: dict = {} if dialogue.id is None else {"id": dialogue.id}
    record["conversations"] = messages
    return record


def write_dialogues(dialogues: Iterable[Dialogue], path: str) -> None:
    """JSON lines in the BELLE multi-turn format, UTF-8 (not ASCII-escaped); the file is replaced atomically."""
    write_text_atomic(path, (json.dumps(_record(d), ensure_ascii=False) + "\n" for d in dialogues))
