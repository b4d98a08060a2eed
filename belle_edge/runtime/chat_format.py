"""Prompt formats, cut into the pieces the runtime prefills turn by turn.

The runtime never re-renders the whole conversation: turn 0 (system) is prefilled once, each new turn
prefills only ``reply_end`` of the previous reply plus ``turn_text`` of the new message. A format therefore
answers four questions:

* ``system_text(system)``      text of turn 0 (may be empty)
* ``first_turn_text(system, message)``  text of turn 1 up to the assistant's reply
* ``turn_text(message)``       text of a later turn up to the assistant's reply
* ``reply_end``                text that closes a reply in the conversation record
* ``note_text(body)``          pinned notes placed mid-dialogue (runtime/notes.py)

plus ``stop_strings`` and ``end_token`` (a special token that closes a reply and so stops generation).

Two kinds: a checkpoint's own Jinja chat template (cut by rendering sentinel conversations; refused if the
template does not render incrementally) and BELLE's ``Human:/Assistant:`` formats. Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError, UnsupportedModelError

_SENTINEL_USER = "\u2063belle-edge-user\u2063"
_SENTINEL_REPLY = "\u2063belle-edge-reply\u2063"
NOTE_ACKNOWLEDGED = "好的，已记下。"  # the assistant's side of notes written as an exchange ("OK, noted.")

# BELLE's formats (DESIGN.md): v1 is the BLOOM model cards' format, v2 the v2 training code's, with EOS after
# each reply. BLOOM-based BELLE was never trained on multi-turn data and writes the next "Human:" itself, so
# "Human:" is always a stop string.
BELLE_VARIANTS = {
    "belle": {"turn": "Human: {message}\n\nAssistant:", "reply_end": "\n\n", "eos_in_record": False},
    "belle-v2": {"turn": "Human: \n{message}\n\nAssistant: \n", "reply_end": "", "eos_in_record": True},
}
FORMAT_NAMES = ("auto", "template", *BELLE_VARIANTS)


@dataclass(frozen=True)
class BelleFormat:
    variant: str = "belle"
    eos_token: str | None = None
    stop_strings: tuple[str, ...] = ("Human:",)
    add_special_tokens_first: bool = True  # the tokenizer's own BOS rule applies to the first segment

    def __post_init__(self):
        # a manifest's "variant" / "eos_token" may be anything: a list raised TypeError here, a number in
        # reply_end (fuzzing)
        if not isinstance(self.variant, str) or self.variant not in BELLE_VARIANTS:
            raise InputError(f"chat format: unknown BELLE variant {self.variant!r}; known: {', '.join(BELLE_VARIANTS)}")
        if not (self.eos_token is None or isinstance(self.eos_token, str)):
            raise InputError(f"chat format: eos_token: expected a string or null, got {type(self.eos_token).__name__}")

    @property
    def name(self) -> str:
        return self.variant

    @property
    def end_token(self) -> str | None:
        return self.eos_token

    @property
    def reply_end(self) -> str:
        spec = BELLE_VARIANTS[self.variant]
        eos = (self.eos_token or "") if spec["eos_in_record"] else ""
        return eos + spec["reply_end"]

    def system_text(self, system: str | None) -> str:
        return f"{system}\n\n" if system else ""

    def turn_text(self, message: str) -> str:
        return BELLE_VARIANTS[self.variant]["turn"].format(message=message)

    def first_turn_text(self, system: str | None, message: str) -> str:
        return self.turn_text(message)

    def note_text(self, body: str) -> str:
        """Pinned notes (runtime/notes.py) mid-dialogue: written as the system prompt is."""
        return self.system_text(body)

    def to_dict(self) -> dict:
        return {"kind": "belle", "variant": self.variant, "eos_token": self.eos_token}


def _first_line(text: str, limit: int = 200) -> str:
    lines = str(text).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[:limit - 1] + "…"


MAX_TEMPLATE_CHARS = 50_000  # the largest published chat templates are ~15,000 characters; jinja compiles one
# of this size in ~0.3 s (fuzzing found 100,000 characters of repeated loops taking seconds)


@dataclass(frozen=True)
class TemplateFormat:
    """A checkpoint's Jinja chat template (rendered as transformers does: trim_blocks, lstrip_blocks)."""

    template: str
    bos_token: str | None = None
    eos_token: str | None = None
    stop_strings: tuple[str, ...] = ()
    add_special_tokens_first: bool = False  # templates write their own BOS
    _compiled: object = field(default=None, repr=False, compare=False)

    name = "template"

    def __post_init__(self):
        # what a file may hold instead of a template (fuzzing found a number, a huge or deeply nested template, a
        # non-string bos_token to raise TypeError / RecursionError here or later)
        if not isinstance(self.template, str):
            raise UnsupportedModelError(f"chat template: expected a string, got {type(self.template).__name__}")
        if len(self.template) > MAX_TEMPLATE_CHARS:
            raise UnsupportedModelError(f"chat template: {len(self.template)} characters, more than "
                                        f"{MAX_TEMPLATE_CHARS}; choose --chat-format belle or belle-v2")
        for name in ("bos_token", "eos_token"):
            if not (getattr(self, name) is None or isinstance(getattr(self, name), str)):
                raise UnsupportedModelError(f"chat template's {name}: expected a string, "
                                            f"got {type(getattr(self, name)).__name__}")
        from jinja2.exceptions import TemplateError

        from .template_sandbox import BoundedSandbox, BoundedTransformer

        def raise_exception(message):
            raise TemplateError(_first_line(message))

        env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        try:
            object.__setattr__(self, "_compiled", env.from_string(BoundedTransformer().visit(env.parse(self.template))))
        except Exception as e:  # TemplateSyntaxError, or RecursionError/MemoryError/SyntaxError of a pathological one
            raise UnsupportedModelError(f"chat template does not compile: {type(e).__name__}: {_first_line(e)}") \
                from None
        self._check_incremental()

    def _render(self, messages: list[dict], generation: bool) -> str:
        from .template_sandbox import rendering

        bos, eos = self.bos_token or "", self.eos_token or ""
        size = len(bos) + len(eos) + sum(len(m["content"]) for m in messages)
        try:
            with rendering(size, len(messages)):
                return "".join(self._compiled.generate(messages=messages, add_generation_prompt=generation,
                                                       bos_token=bos, eos_token=eos))
        except Exception as e:  # the template is code: whatever it raises (ZeroDivisionError, RecursionError, a
            # bound of template_sandbox.py) means it cannot render this conversation
            raise UnsupportedModelError(f"chat template cannot render a conversation ({type(e).__name__}: "
                                        f"{_first_line(e)}); choose --chat-format belle or belle-v2") from None

    _no_system = False  # set when the template refuses a system message

    def _system(self, system):
        if system and self._no_system:
            raise InputError("this model's chat template does not accept a system prompt; leave --system out")
        return [{"role": "system", "content": system}] if system else []

    def _history(self, system):
        return self._system(system) + [{"role": "user", "content": _SENTINEL_USER},
                                       {"role": "assistant", "content": _SENTINEL_REPLY}]

    def _check_incremental(self) -> None:
        for system in (None, "S"):
            if system:
                try:
                    self._render(self._system(system) + [{"role": "user", "content": "M"}], True)
                except UnsupportedModelError:  # e.g. raise_exception('System role not supported')
                    object.__setattr__(self, "_no_system", True)
                    continue
            hist = self._render(self._history(system), False)
            full = self._render(self._history(system) + [{"role": "user", "content": "M"}], True)
            if _SENTINEL_USER not in hist:  # the user's message is nowhere (found by fuzzing: no error, no prompt)
                raise UnsupportedModelError("chat template does not render the user's messages; choose --chat-format "
                                            "belle or belle-v2")
            if not full.startswith(hist) or _SENTINEL_REPLY not in hist:
                raise UnsupportedModelError(
                    "chat template does not render turn by turn (a longer conversation does not extend a shorter "
                    "one); choose --chat-format belle or belle-v2")

    @property
    def end_token(self) -> str | None:
        """What closes a reply in the template ("<|im_end|>", "</s>"), else the EOS token. The loader stops
        on it only if the tokenizer has it as one token."""
        end = self.reply_end.split()
        return end[0] if end else self.eos_token

    @property
    def reply_end(self) -> str:
        hist = self._render(self._history(None), False)
        return hist[hist.index(_SENTINEL_REPLY) + len(_SENTINEL_REPLY):]

    def turn_text(self, message: str) -> str:
        hist = self._history(None)
        before = self._render(hist, False)
        return self._render(hist + [{"role": "user", "content": message}], True)[len(before):]

    def system_text(self, system: str | None) -> str:
        first = self._render(self._system(system) + [{"role": "user", "content": _SENTINEL_USER}], True)
        later = self.turn_text(_SENTINEL_USER)
        if first.endswith(later):
            return first[:len(first) - len(later)]
        if _SENTINEL_USER not in first:  # ValueError from index() before (fuzzing)
            raise UnsupportedModelError("chat template does not render the first user message; choose "
                                        "--chat-format belle or belle-v2")
        return first[:first.index(_SENTINEL_USER)]  # system folded into the first user block (Llama-2 style)

    def first_turn_text(self, system: str | None, message: str) -> str:
        first = self._render(self._system(system) + [{"role": "user", "content": message}], True)
        head = self.system_text(system)
        if not first.startswith(head):
            raise UnsupportedModelError("chat template renders the system segment differently per message")
        return first[len(head):]

    def note_text(self, body: str) -> str:
        """Pinned notes (runtime/notes.py) mid-dialogue. Where the record ends each message with a newline (ChatML:
        Qwen2), the notes are plain lines between two messages: the keys say what each fact is, and the block
        costs one token besides its text, where a mid-dialogue system message costs five (its wrapper), which is
        what put W=3 with notes over 10% more KV than W=3 without (dialogue-memory benchmark: +12% as a system
        message, +9% as lines, the same accuracy). Elsewhere (Llama-2's ``[INST]``, whose blocks each open with
        BOS) an exchange the assistant acknowledges, which keeps BOS first in the sequence."""
        if self.reply_end.endswith("\n"):
            return body + "\n"
        return self.turn_text(body) + NOTE_ACKNOWLEDGED + self.reply_end

    def to_dict(self) -> dict:
        return {"kind": "template", "template": self.template, "bos_token": self.bos_token,
                "eos_token": self.eos_token}


ChatFormat = BelleFormat | TemplateFormat


def make_chat_format(choice: str, *, template: str | None, bos_token: str | None, eos_token: str | None,
                     where: str) -> ChatFormat:
    """Pick the format: ``auto`` takes the checkpoint's template where it has one, else BELLE's."""
    if choice not in FORMAT_NAMES:
        raise InputError(f"chat format: expected one of {', '.join(FORMAT_NAMES)}, got {choice!r}")
    if choice == "template" and not template:
        raise InputError(f"{where}: --chat-format template, but the checkpoint has no chat template")
    if choice in ("auto", "template") and template:
        return TemplateFormat(template, bos_token=bos_token, eos_token=eos_token)
    variant = "belle" if choice == "auto" else choice
    return BelleFormat(variant, eos_token=eos_token)


def chat_format_from_dict(d: dict) -> ChatFormat:
    if not isinstance(d, dict):  # AttributeError before (fuzzing)
        raise InputError(f"chat format: expected an object, got {type(d).__name__}")
    if d.get("kind") == "template":
        if "template" not in d:  # KeyError before (fuzzing)
            raise InputError("chat format: kind 'template' without a field 'template'")
        return TemplateFormat(d["template"], bos_token=d.get("bos_token"), eos_token=d.get("eos_token"))
    if d.get("kind") == "belle":
        return BelleFormat(d.get("variant", "belle"), eos_token=d.get("eos_token"))
    raise InputError(f"chat format: unknown kind {d.get('kind')!r}")
