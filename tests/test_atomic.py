"""Atomic writes: readers (and DVC) see the previous output or the whole new one, never a
half-written file or folder, and failures leave no temporary litter behind."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from conftest import error_line, leftovers

from transfer.atomic import atomic_dir, atomic_path, write_json, write_text
from transfer.stage import run_stage


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

def run(main: Any, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``main`` as a stage runs it: its exit status and its stderr."""
    try:
        run_stage(lambda _argv: main())
    except SystemExit as exc:
        return exc.code, capsys.readouterr().err  # type: ignore[return-value]
    return 0, capsys.readouterr().err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO,
                                  errno.ENAMETOOLONG, errno.ELOOP])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_failing_write_is_one_line_with_its_own_message(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          code: int, kind: str) -> None:
    """Whatever the errno, a write that fails is one ``error:`` line with the system's own
    words and the output it was writing; the previous output is intact, no temporary is left."""
    dest = tmp_path / "out"
    if kind == "file":
        dest.write_bytes(b"old")
    else:
        dest.mkdir()
        (dest / "good.txt").write_text("good")

    def main() -> None:
        with atomic_path(dest) if kind == "file" else atomic_dir(dest) as tmp:
            raise OSError(code, os.strerror(code), str(tmp))

    status, err = run(main, capsys)
    assert status == 1 and error_line(err) == err.strip(), err
    assert os.strerror(code) in err and f"writing {dest}" in err and "outputs are as they were" in err, err
    assert (dest.read_bytes() == b"old") if kind == "file" else sorted(p.name for p in dest.iterdir()) == ["good.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_real_full_device_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The writer's own write to a full device (/dev/full answers ENOSPC) is named as such."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")

    def main() -> None:
        with atomic_path(dest, size=10) as tmp:
            tmp.write_bytes(b"half")
            with open("/dev/full", "wb") as full:
                full.write(b"x" * 10)

    status, err = run(main, capsys)
    assert status == 1 and "No space left on device" in err and f"writing {dest} (0.0 MB)" in err, err
    assert dest.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- a stage's outputs together

def test_a_stage_replaces_its_outputs_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Inside a stage the outputs land only when it ends well: one that fails after writing
    some of them (out of disk before its pictures, say) leaves every one as it was, and so
    its ``nothing was written`` is true; a ``now`` write (a live history) lands at once."""
    a, b, live = tmp_path / "metrics.json", tmp_path / "plots", tmp_path / "history.csv"
    a.write_text("old")
    b.mkdir()
    (b / "old.png").write_text("old")

    def main(fail: bool) -> None:
        write_json(a, {"new": 1})
        with atomic_dir(b) as tmp:
            (tmp / "new.png").write_text("new")
        write_text(live, "epoch 1", now=True)
        assert a.read_text() == "old" and (b / "old.png").exists(), "nothing lands before the end"
        if fail:
            raise OSError(errno.ENOSPC, "No space left on device")

    status, _ = run(lambda: main(fail=True), capsys)
    assert status == 1 and a.read_text() == "old" and sorted(p.name for p in b.iterdir()) == ["old.png"]
    assert live.read_text() == "epoch 1" and leftovers(tmp_path) == []
    status, _ = run(lambda: main(fail=False), capsys)
    assert status == 0
    assert json.loads(a.read_text()) == {"new": 1} and sorted(p.name for p in b.iterdir()) == ["new.png"]
    assert leftovers(tmp_path) == []
