"""Atomic writes: readers (and DVC) see the previous output or the whole new one, never a
half-written file or folder, and failures leave no temporary litter behind."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
from conftest import leftovers

from transfer.atomic import atomic_dir, atomic_path, write_json
from transfer.errors import UserError


class Boom(Exception):
    """Stands for any failure of the writer."""


def test_atomic_path_replaces_on_success(tmp_path: Path) -> None:
    """The new content appears at once, readable by others, with no temp file left."""
    dest = tmp_path / "sub" / "out.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"old")
    with atomic_path(dest) as tmp:
        assert tmp.parent == dest.parent and tmp != dest
        tmp.write_bytes(b"new")
        assert dest.read_bytes() == b"old", "the destination changes only at the end"
    assert dest.read_bytes() == b"new"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
    assert leftovers(dest.parent) == []


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_path_failure_keeps_previous_file(tmp_path: Path, error: type[BaseException]) -> None:
    """A failing or interrupted writer leaves the old file untouched and no temp file."""
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(error), atomic_path(dest) as tmp:
        tmp.write_bytes(b"half")
        raise error()
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_path_failure_leaves_nothing_new(tmp_path: Path) -> None:
    """Without a previous file, a failed write leaves nothing at all."""
    dest = tmp_path / "out.bin"
    with pytest.raises(Boom), atomic_path(dest) as tmp:
        tmp.write_bytes(b"half")
        raise Boom()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_on_success(tmp_path: Path) -> None:
    """The new folder replaces the old one whole: stale files of the old one are gone."""
    dest = tmp_path / "out"
    (dest / "stale").mkdir(parents=True)
    (dest / "stale" / "old.txt").write_text("old")
    with atomic_dir(dest) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "new.txt").write_text("new")
        assert (dest / "stale" / "old.txt").exists(), "the old folder stays until the end"
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_dir_failure_keeps_previous_folder(tmp_path: Path, error: type[BaseException]) -> None:
    """A failure mid-way leaves the previous good folder exactly as it was."""
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "good.txt").write_text("good")
    with pytest.raises(error), atomic_dir(dest) as tmp:
        (tmp / "half.txt").write_text("half")
        raise error()
    assert sorted(p.name for p in dest.iterdir()) == ["good.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_failure_leaves_nothing_new(tmp_path: Path) -> None:
    """Without a previous folder, a failure leaves no output and no hidden temp folder."""
    with pytest.raises(Boom), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "half.txt").write_text("half")
        raise Boom()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_cleans_up_after_an_earlier_crash(tmp_path: Path) -> None:
    """A '.old' folder left by a crash between the two renames is removed on the next run."""
    dest = tmp_path / "out"
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "x").write_text("x")
    with atomic_dir(dest) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (dest / "new.txt").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_atomic_dir_output_is_readable_by_others(tmp_path: Path) -> None:
    """The data folder should be as readable as one made by mkdir or restored by dvc checkout."""
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x.txt").write_text("x")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) & 0o055 == 0o055


def test_write_json_is_deterministic(tmp_path: Path) -> None:
    """Sorted keys and a final newline: reruns give byte-identical metrics files."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_json(a, {"b": 1, "a": {"d": 2, "c": 3}})
    write_json(b, {"a": {"c": 3, "d": 2}, "b": 1})
    assert a.read_bytes() == b.read_bytes()
    assert a.read_text().endswith("}\n")
    assert json.loads(a.read_text()) == {"a": {"c": 3, "d": 2}, "b": 1}


# --------------------------------------------------------------------------- failing writes

@pytest.mark.parametrize(("code", "names_file", "cause"), [
    pytest.param(errno.ENOSPC, False, "no space left on the device); it is left as it was. Free some space",
                 id="ENOSPC"),
    pytest.param(errno.EDQUOT, True, "disk quota exceeded); it is left as it was. Free some space or raise the quota",
                 id="EDQUOT"),
    pytest.param(errno.EFBIG, True, "a file is larger than this process may write (ulimit -f)", id="EFBIG"),
    pytest.param(errno.EROFS, True, "the file system is read-only); it is left as it was. Run where", id="EROFS"),
    pytest.param(errno.EACCES, True, "permission denied); it is left as it was. Check the owner and permissions",
                 id="EACCES"),
])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_failing_write_is_one_clear_line(tmp_path: Path, code: int, names_file: bool, cause: str,
                                           kind: str) -> None:
    """A write that fails for want of space or permission (as ``write()`` reports it, with no
    file name, or naming the temporary file) becomes a UserError naming the destination,
    the errno and what to do; the previous output is intact and no temporary file is left."""
    dest = tmp_path / "out"
    if kind == "file":
        dest.write_bytes(b"old")
        writer = atomic_path(dest)
    else:
        dest.mkdir()
        (dest / "good.txt").write_text("good")
        writer = atomic_dir(dest)
    with pytest.raises(UserError) as info, writer as tmp:
        target = tmp if kind == "file" else tmp / "sub" / "x.png"
        raise OSError(code, os.strerror(code), str(target) if names_file else None)
    message = str(info.value)
    assert message.startswith(f"cannot write {dest} ({errno.errorcode[code]}: "), message
    assert cause in message and "\n" not in message
    if kind == "file":
        assert dest.read_bytes() == b"old"
    else:
        assert sorted(p.name for p in dest.iterdir()) == ["good.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_real_full_device_is_one_clear_line(tmp_path: Path) -> None:
    """The writer's own write to a full device (/dev/full answers ENOSPC) is named as such."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(UserError, match=r"\(ENOSPC: no space left on the device\)"), atomic_path(dest) as tmp:
        tmp.write_bytes(b"half")
        with open("/dev/full", "wb") as full:
            full.write(b"x" * 10)
    assert dest.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_permission_errors_on_other_files_keep_their_own_message(tmp_path: Path) -> None:
    """An input the writer cannot read is not an output problem: its PermissionError passes
    through untouched, for the stage to explain."""
    with pytest.raises(PermissionError) as info, atomic_path(tmp_path / "out.bin"):
        raise PermissionError(errno.EACCES, "Permission denied", "/elsewhere/input.zip")
    assert info.value.filename == "/elsewhere/input.zip"
    assert list(tmp_path.iterdir()) == []
