"""Writing a folder whole or not at all: every command that makes a folder (an artifact, a pruned or
quantized checkpoint, a cache entry) builds it in a hidden sibling and renames it into place at the end, so
a failed or interrupted run never leaves a folder that looks complete, and an existing one is replaced only
once the new one is whole. The files are flushed to disk (fsync) before the rename and the rename after it, so
the same holds after a power cut, not only after a killed process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
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
    remove_abandoned(out)
    # the pid in the name: a run killed outright (SIGKILL, power) cannot clean up after itself; the next run
    # for the same folder removes work folders whose process is gone
    work = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.partial-{os.getpid()}-")
    try:
        yield work
        sync_tree(work)
        move_into_place(work, out)
        sync_dir(parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def move_into_place(work: str, out: str) -> None:
    """Rename a finished folder onto ``out``. An existing ``out`` is swapped with the new one in one atomic
    step where the system can (Linux ``renameat2(RENAME_EXCHANGE)``), so at every instant ``out`` is the
    whole old folder or the whole new one, even if the process is killed; elsewhere the old one is moved
    to a hidden name first and removed after."""
    if os.path.exists(out):
        if _exchange(work, out):
            shutil.rmtree(work, ignore_errors=True)  # now holds the old folder
            return
        old = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(work, out)


def sync_tree(folder: str) -> None:
    """fsync every file under ``folder`` and every folder in it: what a rename then publishes is on disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_dir(root)


def sync_dir(folder: str) -> None:
    """fsync a folder (its entries: a rename into it). A no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder: nothing more can be done there
        pass
    finally:
        os.close(fd)


def remove_abandoned(out: str) -> list[str]:
    """Remove the work folders (``.name.partial-PID-*``) and set-aside old folders (``.name.old-PID``) that a
    killed run left beside ``out``, when process PID is gone. Returns what was removed."""
    parent, name = os.path.dirname(out), os.path.basename(out)
    removed = []
    for path in glob.glob(os.path.join(parent, f".{glob.escape(name)}.partial-*")) + \
            glob.glob(os.path.join(parent, f".{glob.escape(name)}.old-*")):
        tail = os.path.basename(path)[len(name) + 1:].split(".", 1)[-1]  # "partial-PID-xyz" | "old-PID"
        pid = tail.split("-")[1] if tail.count("-") >= 1 else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the call is not available or refused."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # the kernel or the file system cannot exchange: fall back
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


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
        sync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as err:
        raise InputError(f"{path}: cannot write: {err.strerror or err}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
