"""Rendering a chat template from a file within bounds: jinja's sandbox plus a budget of steps and sizes.

A chat template is code from a file: it renders in jinja's ImmutableSandboxedEnvironment (no attribute access to
internals, no mutation of the messages) and, since fuzzing found templates that loop for hours, recurse until
RecursionError or build gigabytes from a few bytes ("{{ 'x' * 10**10 }}", a string doubled in a loop), within
bounds: every operation a render performs that can repeat or grow (a call, an attribute or item read, an
operator, a filter, a loop step, a piece of output) costs a step, every string or list it makes counts its size,
and arguments that would build something large in one step (widths, repeat counts) are checked before.

``TemplateFormat`` (chat_format.py) compiles with :class:`BoundedSandbox` after :class:`BoundedTransformer`
rewrote the template, and renders inside :func:`rendering`. Imported when the first template is compiled.
Torch-free.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import string

from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

MAX_TEMPLATE_STEPS = 30_000  # per render (+ 100 per message + 4 per input character: some templates iterate
# over a message's characters); 97 published templates take 25..70 for a 4-message conversation; ~0.1 s
_CALL_STEPS = 4  # a call (a macro's above all) costs several times a loop step or an attribute read
MAX_TEMPLATE_VALUE = 256_000  # characters / items of any one value (+ 2x the input's characters)
MAX_TEMPLATE_WORK = 16_000_000  # characters / items made in all, output included (+ 64x the input's characters)
MAX_TEMPLATE_ARG = 100_000  # the largest whole number a filter or method takes (a width, a count): jinja's range cap
MAX_TEMPLATE_BITS = 65_536  # the largest integer an operator may make
_SLOW_FILTER_CHARS = 20_000  # striptags, urlize: quadratic in the worst case, so only on short texts
_ITER, _CONCAT, _OUT = "belle_edge_iter__", "belle_edge_concat__", "belle_edge_out__"


class TemplateLimitError(Exception):
    """A render went past one of the bounds above (reported as UnsupportedModelError by TemplateFormat)."""


class _Budget:
    __slots__ = ("steps", "value", "work")

    def __init__(self, steps: int, value: int, work: int):
        self.steps, self.value, self.work = steps, value, work


_budget: contextvars.ContextVar = contextvars.ContextVar("belle_edge_template_budget", default=None)
_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?([a-zA-Z%])")


def _size(value) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)) else None


def _text_size(value) -> int:
    return len(value) if isinstance(value, str) else len(str(value))


class BoundedTransformer(NodeTransformer):
    """Route what the sandbox does not see through the budget: loop steps, ``~`` and output."""

    @staticmethod
    def _call(name, args, lineno):
        return nodes.Call(nodes.Name(name, "load", lineno=lineno), list(args), [], None, None, lineno=lineno)

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = self._call(_ITER, [node.iter], node.lineno)
        return node

    def visit_Concat(self, node):
        node = self.generic_visit(node)
        return self._call(_CONCAT, node.nodes, node.lineno)

    def visit_Output(self, node):
        node = self.generic_visit(node)
        node.nodes = [self._call(_OUT, [nodes.Const(child.data, lineno=child.lineno)
                                        if isinstance(child, nodes.TemplateData) else child], child.lineno)
                      for child in node.nodes]
        return node

class BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})  # (intercepting also stops compile-time folding)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.globals.pop("lipsum", None)  # lipsum(n) makes n paragraphs: nothing a chat template needs
        self.globals.update({_ITER: self._iter, _CONCAT: self._concat, _OUT: self._out})
        self._helpers = tuple(self.globals[name] for name in (_ITER, _CONCAT, _OUT))
        for name, func in list(self.filters.items()):
            self.filters[name] = self._bounded_filter(name, func)

    # -------------------------------------------------------------- the budget
    @staticmethod
    def _current() -> _Budget:
        budget = _budget.get()
        if budget is None:  # outside a render (jinja folding constants at compile time): do it at render time
            raise TemplateLimitError("not rendering")
        return budget

    def _tick(self, steps: int = 1) -> None:
        budget = self._current()
        budget.steps -= steps
        if budget.steps < 0:
            raise TemplateLimitError("more steps than the bound (a loop that does not end?)")

    def _room(self, size: int) -> None:
        """Make room for a value of ``size`` characters / items before it is built."""
        budget = self._current()
        if size > budget.value:
            raise TemplateLimitError(f"a value of {size} characters or items (bound {budget.value})")
        budget.work -= size
        if budget.work < 0:
            raise TemplateLimitError("more characters made than the bound (output or values that keep growing)")

    def _sized(self, value):
        size = _size(value)
        if size is not None and size > self._current().value:
            raise TemplateLimitError(f"a value of {size} characters or items (bound {self._current().value})")
        if isinstance(value, int) and value.bit_length() > MAX_TEMPLATE_BITS:
            raise TemplateLimitError(f"an integer of {value.bit_length()} bits")
        return value

    @staticmethod
    def _check_args(args, kwargs) -> None:
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_TEMPLATE_ARG:
                raise TemplateLimitError(f"argument {arg} (bound {MAX_TEMPLATE_ARG})")

    # -------------------------------------------------------------- what the transformer routes here
    def _iter(self, iterable):
        for item in iterable:
            self._tick()
            yield item

    def _concat(self, *parts):
        self._tick()
        parts = [p if isinstance(p, str) else str(p) for p in parts]
        self._room(sum(map(len, parts)))
        return "".join(parts)

    def _out(self, value):
        self._tick()
        self._room(_text_size(value))
        return value

    # -------------------------------------------------------------- what the sandbox routes here
    def getattr(self, obj, attribute):
        self._tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self._tick()
        return self._sized(super().getitem(obj, argument))  # (a slice copies)

    def is_safe_attribute(self, obj, attr, value):
        if isinstance(obj, str) and attr in ("expandtabs", "translate", "maketrans"):
            return False  # each can make a string far larger than its arguments
        return super().is_safe_attribute(obj, attr, value)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own spelling)
        if any(__obj is helper for helper in __self._helpers):
            return __context.call(__obj, *args, **kwargs)  # (drops jinja's _loop_vars / _block_vars)
        __self._tick(_CALL_STEPS)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, list, dict, tuple)) and not isinstance(__obj, functools.partial):
            __self._check_args(args, kwargs)
            name = getattr(__obj, "__name__", "")
            if isinstance(owner, str) and name == "join" and args:
                items = [x if isinstance(x, str) else str(x) for x in args[0]]
                __self._room(sum(map(len, items)) + len(owner) * max(len(items) - 1, 0))
                args = (items, *args[1:])
            elif isinstance(owner, str) and name == "replace" and len(args) >= 2:
                __self._room(_replace_size(owner, args[0], args[1], args[2] if len(args) > 2 else None))
        return __self._sized(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        self._tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) is not None and isinstance(n, int):
                    self._room(_size(seq) * max(n, 0))
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > MAX_TEMPLATE_BITS:
                    raise TemplateLimitError("an integer product too large")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if left.bit_length() * right > MAX_TEMPLATE_BITS:
                raise TemplateLimitError(f"an integer power too large ({left} ** {right})")
        elif operator == "+" and _size(left) is not None and _size(right) is not None:
            self._room(_size(left) + _size(right))
        elif operator == "%" and isinstance(left, str):
            self._room(_printf_size(left, right))
        return self._sized(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        def bounded(*args, **kwargs):
            self._tick()
            self._check_args(args, kwargs)
            values = list(args[0].values()) if value.__name__ == "format_map" and args and isinstance(
                args[0], dict) else [*args, *kwargs.values()]
            self._room(_format_size(fmt, values))
            return wrapped(*args, **kwargs)

        return bounded

    def _bounded_filter(self, name, func):
        offset = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # eval_ctx / environment / context
        check = _FILTER_CHECKS.get(name)

        @functools.wraps(func)
        def bounded(*args, **kwargs):
            self._tick()
            self._check_args(args[offset + 1:], kwargs)
            if check is not None:
                args = args[:offset] + tuple(check(self, *args[offset:], **kwargs))
            return self._sized(func(*args, **kwargs))

        return bounded


def _replace_size(s, old, new, count=None) -> int:
    s, old, new = str(s), str(old), str(new)
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * len(new)


def _printf_size(fmt: str, args) -> int:
    values = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    biggest = max((_text_size(v) for v in values), default=0)
    size = len(fmt)
    for width, precision, _ in _PRINTF.findall(fmt):
        for number in (width, precision):
            n = MAX_TEMPLATE_ARG if number == "*" else int(number or 0)
            if n > MAX_TEMPLATE_ARG:
                raise TemplateLimitError(f"a format width of {n} (bound {MAX_TEMPLATE_ARG})")
            size += n
        size += biggest
    return size


def _format_size(fmt: str, values) -> int:
    biggest = max((_text_size(v) for v in values), default=0)
    size = len(fmt)
    for _, field_name, spec, _ in string.Formatter().parse(fmt):
        if field_name is None:
            continue
        widths = [MAX_TEMPLATE_ARG] if "{" in (spec or "") else [int(n) for n in re.findall(r"\d+", spec or "")]
        width = max(widths, default=0)
        if width > MAX_TEMPLATE_ARG:
            raise TemplateLimitError(f"a format width of {width} (bound {MAX_TEMPLATE_ARG})")
        size += width + biggest
    return size


def _check_join(env, value, d="", attribute=None):
    items = list(value) if not isinstance(value, str) else value
    if attribute is None:
        env._room(sum(_text_size(x) for x in items) + _text_size(d) * max(len(items) - 1, 0))
    return items, d, attribute


def _check_replace(env, s, old, new, count=None):
    env._room(_replace_size(s, old, new, count))
    return (s, old, new) if count is None else (s, old, new, count)


def _check_indent(env, s, width=4, first=False, blank=False):
    text = str(s)
    env._room(len(text) + (text.count("\n") + 1) * (_text_size(width) if isinstance(width, str) else max(width, 0)))
    return s, width, first, blank


def _check_format(env, value, *args, **kwargs):
    env._room(_printf_size(str(value), kwargs if kwargs else tuple(args)))
    return (value, *args)


def _check_sum(env, iterable, attribute=None, start=0):
    if isinstance(start, bool) or not isinstance(start, (int, float)):  # sum(lists) copies quadratically
        raise TemplateLimitError("sum with a start that is not a number")
    return iterable, attribute, start


def _check_wordwrap(env, s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True):
    text = str(s)
    env._room(len(text) + (len(text) // max(int(width), 1) + 1) * len(wrapstring or "\n"))
    return s, width, break_long_words, wrapstring, break_on_hyphens


def _check_tojson(env, value, indent=None):
    if indent is not None and (not isinstance(indent, int) or indent > 64):
        raise TemplateLimitError(f"tojson indent {indent!r} (bound 64)")
    return value, indent


def _check_short(env, value, *args):
    if _text_size(value) > _SLOW_FILTER_CHARS:
        raise TemplateLimitError(f"striptags/urlize on {_text_size(value)} characters (bound {_SLOW_FILTER_CHARS})")
    return (value, *args)


_FILTER_CHECKS = {"join": _check_join, "replace": _check_replace, "indent": _check_indent, "format": _check_format,
                  "sum": _check_sum, "wordwrap": _check_wordwrap, "tojson": _check_tojson, "striptags": _check_short,
                  "urlize": _check_short}


@contextlib.contextmanager
def rendering(messages_chars: int, messages: int):
    """The budget of one render: the bounds above, grown with the conversation's size."""
    token = _budget.set(_Budget(MAX_TEMPLATE_STEPS + 100 * messages + 4 * messages_chars,
                                MAX_TEMPLATE_VALUE + 2 * messages_chars, MAX_TEMPLATE_WORK + 64 * messages_chars))
    try:
        yield
    finally:
        _budget.reset(token)
