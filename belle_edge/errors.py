"""Errors a user can cause and fix.

Every fault of a user, a file or a device raises a ``BelleEdgeError`` subclass whose message is one line that
names the problem (the file, the field, what was expected and what was found) and, where possible, what to do.
The CLI prints that line and exits non-zero; it never shows a traceback for these. ``assert`` stays for
internal invariants only.
"""


class BelleEdgeError(Exception):
    """Base of all errors that are the user's, a file's or a device's fault."""


class CheckpointError(BelleEdgeError):
    """A checkpoint is missing, unreadable, or contradicts itself (config vs weights)."""


class UnsupportedModelError(BelleEdgeError):
    """The checkpoint is readable but describes an architecture or feature belle_edge does not support."""


class InputError(BelleEdgeError):
    """A message or setting given at run time is unusable (empty message, bad sampling value, ...)."""


class ContextFullError(InputError):
    """The dialogue no longer fits the KV cache or the model's positions, and nothing may be dropped."""


class SessionFileError(BelleEdgeError):
    """A saved session cannot be restored (unreadable, or saved from another model)."""


class MissingDependencyError(BelleEdgeError):
    """An optional dependency is not installed; the message names the extra that brings it."""


class QueueFullError(BelleEdgeError):
    """The batched engine's waiting queue is full: try again later (HTTP 429)."""


class EngineClosedError(BelleEdgeError):
    """The batched engine is shutting down and takes no new requests (HTTP 503)."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message cut to its first line (a BelleEdgeError's message is one line, whatever the
    library below said), at most ``limit`` characters; the exception's type when it says nothing."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]
