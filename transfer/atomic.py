"""Atomic writes: a reader (or DVC) sees either the previous file or the whole new one.

Everything is first written to a temporary sibling of the destination, on the same file
system, and then moved into place with ``os.replace``. If the writer fails or is
interrupted, the temporary file is removed and the destination is left as it was.
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


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``dest``."""
    dest = Path(dest)
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
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_json(dest: str | os.PathLike[str], data: Any) -> None:
    """Write indented JSON with sorted keys, so reruns give byte-identical files."""
    write_text(dest, json.dumps(data, indent=2, sort_keys=True) + "\n")
