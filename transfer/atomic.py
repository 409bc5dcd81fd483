"""Atomic writes: a reader (or DVC) sees the previous file or the whole new one, never half.

Everything goes to a temporary sibling first and is then renamed into place; a failure removes
it. A write that fails because of where it goes (a full disk, a quota, a read-only folder) is
for the user to fix outside the project, so it is one line naming the output and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transfer.errors import UserError

#: errno of a failed write -> (what happened, what to do about it).
WRITE_FAILURES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "Free some space and run again"),
    errno.EDQUOT: ("disk quota exceeded", "Free some space or raise the quota and run again"),
    errno.EFBIG: ("a file is larger than this process may write (ulimit -f) or the file system allows",
                  "Raise the limit (ulimit -f unlimited) or write to another file system"),
    errno.EROFS: ("the file system is read-only", "Run where the outputs can be written, or remount it read-write"),
    errno.EACCES: ("permission denied", "Check the owner and permissions of the folder"),
    errno.EPERM: ("operation not permitted", "Check the owner and permissions of the folder"),
}
#: Failures that can only come from writing, whichever file they name.
ALWAYS_WRITES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_write_failure(exc: OSError, dest: Path) -> bool:
    """Whether ``exc`` is a :data:`WRITE_FAILURES` error in writing ``dest``: on ``dest``,
    a folder above it, its temporary sibling or a file inside that. A permission error on
    some other file (an input the writer reads) is not, and keeps its own message."""
    if exc.errno not in WRITE_FAILURES:
        return False
    if exc.errno in ALWAYS_WRITES or exc.filename is None:  # a write() or flush() names no file
        return True
    dest = Path(os.path.abspath(dest))
    path = Path(os.path.abspath(os.fsdecode(exc.filename)))
    if path in dest.parents:
        return True
    return any(p == dest or (p.parent == dest.parent and p.name.startswith(f".{dest.name}."))
               for p in (path, *path.parents))


@contextlib.contextmanager
def explain_write_failures(dest: Path, size: int | None = None) -> Iterator[None]:
    """Turn a failure to write ``dest`` (:func:`is_write_failure`) into one clear line, which
    says how large the file is where that is known (``size`` bytes)."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None or not is_write_failure(exc, dest):
            raise
        what, todo = WRITE_FAILURES[exc.errno]
        large = f" ({size / 2**20:,.1f} MB)" if size is not None else ""
        raise UserError(f"cannot write {dest}{large} ({errno.errorcode[exc.errno]}: {what}); "
                        f"it is left as it was. {todo}") from None


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``dest`` (``size``: its
    bytes, where known, for the message of a failure)."""
    dest = Path(dest)
    with explain_write_failures(dest, size):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces the folder ``dest``.

    A failure leaves the previous ``dest`` (or nothing) in place. The swap is two renames,
    so a crash between them leaves the old folder under a hidden ``.old`` name, never a
    half-written ``dest``.
    """
    dest = Path(dest)
    with explain_write_failures(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        old = dest.parent / f".{dest.name}.old"
        try:
            yield tmp
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; an output folder is as readable as mkdir's
            if old.exists():
                shutil.rmtree(old)
            if dest.exists() or dest.is_symlink():
                os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(dest: str | os.PathLike[str], text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(dest: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(dest, len(data)) as tmp:
        tmp.write_bytes(data)


def write_json(dest: str | os.PathLike[str], data: Any) -> None:
    """Write indented JSON with sorted keys, so reruns give byte-identical files; a
    non-finite number (invalid JSON for strict readers) is a bug, never written."""
    write_text(dest, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
