"""Atomic writes: a reader (or DVC) sees the previous file or the whole new one, never half.

Everything goes to a temporary sibling first and is then renamed into place; a failure removes
it. Inside :func:`staged_outputs` (every stage runs in it) the renames wait for the end of the
stage, so that its outputs are replaced together or not at all: a stage that fails or is
interrupted halfway leaves all of them as they were. ``now=True`` is for files that must land
at once (the history a running training rewrites after every epoch, its resume state).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transfer.errors import UserError
from transfer.interrupts import deferred_interrupts

#: The outputs written so far in :func:`staged_outputs`, destination -> its temporary sibling;
#: None outside it (a stage's functions called from Python, as tests do).
_staged: dict[Path, Path] | None = None


@contextlib.contextmanager
def staged_outputs() -> Iterator[None]:
    """Outputs written in the block land together when it ends without an error; otherwise
    none does. A failure between the renames (which cannot run out of space) says which landed."""
    global _staged
    outer, _staged = _staged, {}
    staged = _staged
    try:
        yield
    except BaseException:
        for tmp in staged.values():
            _remove(tmp)
        raise
    finally:
        _staged = outer
    done: list[str] = []
    with deferred_interrupts():
        for dest, tmp in staged.items():
            try:
                _replace(tmp, dest)
            except OSError as exc:
                for left in list(staged.values())[len(done):]:
                    _remove(left)
                raise UserError(f"cannot replace {dest} ({exc}); replaced {', '.join(done) or 'nothing'}, the other "
                                "outputs are as they were: run the stage again") from None
            done.append(str(dest))


def _replace(tmp: Path, dest: Path) -> None:
    """``tmp`` in place of ``dest``; a folder by two renames, so that a crash between them leaves
    the old one under a hidden ``.old`` name, never a half-written ``dest``."""
    if not tmp.is_dir():
        os.replace(tmp, dest)
        return
    old = dest.parent / f".{dest.name}.old"
    _remove(old)
    if os.path.lexists(dest):  # a link to a folder too, even a dangling one
        os.replace(dest, old)
    os.replace(tmp, dest)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], *, now: bool = False, size: int | None = None,
                folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write to (``folder``: an empty folder); on success it replaces
    ``dest`` (``size``: its bytes, where known, for the message of a failure)."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        names = {"prefix": f".{dest.name}.", "suffix": ".tmp", "dir": dest.parent}
        if folder:
            tmp = Path(tempfile.mkdtemp(**names))
        else:
            fd, name = tempfile.mkstemp(**names)
            os.close(fd)
            tmp = Path(name)
    except OSError as exc:
        exc.add_note(f"writing {dest}")
        raise
    try:
        yield tmp
        tmp.chmod(0o755 if folder else 0o644)  # mkstemp/mkdtemp make them private
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError):
            exc.add_note(f"writing {dest}" + (f" ({size / 2**20:,.1f} MB)" if size is not None else ""))
        raise
    if _staged is None or now:
        _replace(tmp, dest)
    else:
        if dest in _staged:  # written twice: the later one counts
            _remove(_staged.pop(dest))
        _staged[dest] = tmp


def atomic_dir(dest: str | os.PathLike[str]) -> contextlib.AbstractContextManager[Path]:
    """Yield an empty temporary folder; on success it replaces the folder ``dest``."""
    return atomic_path(dest, folder=True)


def write_bytes(dest: str | os.PathLike[str], data: bytes, *, now: bool = False) -> None:
    with atomic_path(dest, now=now, size=len(data)) as tmp:
        tmp.write_bytes(data)


def write_text(dest: str | os.PathLike[str], text: str, *, now: bool = False) -> None:
    """As UTF-8, its newlines untranslated on every platform."""
    write_bytes(dest, text.encode(), now=now)


def write_json(dest: str | os.PathLike[str], data: Any) -> None:
    """Write indented JSON with sorted keys, so reruns give byte-identical files; a
    non-finite number (invalid JSON for strict readers) is a bug, never written."""
    write_text(dest, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
