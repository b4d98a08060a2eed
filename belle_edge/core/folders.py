"""Writing a folder whole or not at all: every command that makes a folder (an artifact, a pruned or
quantized checkpoint, a cache entry) builds it in a hidden sibling and renames it into place at the end, so
a failed or interrupted run never leaves a folder that looks complete, and an existing one is replaced only
once the new one is whole.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterable, Iterator

from ..errors import InputError


@contextmanager
def staged_folder(out: str, *, force: bool = False) -> Iterator[str]:
    """Yield an empty hidden work folder beside ``out``; on a clean exit it becomes ``out``, on any error
    (Ctrl-C included) it is removed. ``out`` existing is refused unless ``force``."""
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and not force:
        raise InputError(f"{out}: already exists; pass --force to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.partial-")
    try:
        yield work
        move_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def move_into_place(work: str, out: str) -> None:
    """Rename a finished folder onto ``out``; an existing ``out`` is removed only once the new one is there."""
    old = None
    if os.path.exists(out):
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(work, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str, data) -> None:
    """Replace ``path`` with ``data`` as JSON in one rename (readers see the old file or the new one)."""
    import json

    write_text_atomic(path, [json.dumps(data, indent=1, ensure_ascii=False)])


def write_text_atomic(path: str, lines: Iterable[str]) -> None:
    """Write ``lines`` to ``path`` whole or not at all (a temporary file in the same folder, then os.replace)."""
    # a plain open (not mkstemp) so the file gets the usual permissions of the user's umask
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise InputError(f"{path}: cannot write: {err.strerror or err}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
