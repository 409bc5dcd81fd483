"""Stage ``unzip``: safe extraction of an image-folder zip. Unsafe archives are refused before
anything is written, the layout is validated with a message listing what was found, litter
is ignored, undecodable or unsupported files are skipped and reported by name, and a failure
leaves the previous good output (or nothing)."""

from __future__ import annotations

import errno
import io
import json
import os
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from conftest import (
    CORRUPT_NAME,
    GIF_NAME,
    REPO_ROOT,
    ZIP_TIME,
    bilevel_png,
    error_line,
    leftovers,
    run_module,
    stage_env,
    write_params,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from stages import unzip as unzip_stage
from transfer.archive import extract_image_folder
from transfer.errors import UserError
from transfer.imagefolder import is_litter, layout_problem
from transfer.stage import run_stage

MakeZip = Callable[..., Path]


def stage_args(archive: Path, tmp_path: Path, changes: dict[str, Any] | None = None) -> list[str]:
    """argv for the stage, with a params file (the repo's, plus ``changes``) in tmp_path."""
    params = write_params(tmp_path / "params.yaml", {"data.val_fraction": 0, **(changes or {})})
    return [str(archive), "--params", str(params), "--out", str(tmp_path / "out" / "data"),
            "--report", str(tmp_path / "metrics" / "data.json")]


def run_ok(archive: Path, tmp_path: Path, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the stage in-process on ``archive``; return the data report it wrote."""
    unzip_stage.main(stage_args(archive, tmp_path, changes))
    return json.loads((tmp_path / "metrics" / "data.json").read_text())


def run_failing(archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                changes: dict[str, Any] | None = None) -> str:
    """Run the stage through run_stage expecting a user error; return its one stderr line."""
    with pytest.raises(SystemExit) as info:
        run_stage(unzip_stage.main, stage_args(archive, tmp_path, changes))
    assert info.value.code == 1
    return error_line(capsys.readouterr().err)


def assert_nothing_written(tmp_path: Path) -> None:
    """No output folder, no report, no temporary folders."""
    assert not (tmp_path / "out" / "data").exists()
    assert not (tmp_path / "metrics" / "data.json").exists()
    assert leftovers(tmp_path / "out") == []


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def previous_output(tmp_path: Path) -> tuple[list[str], bytes]:
    """The good output's file names and its report's bytes, taken before a run that must fail
    without touching them."""
    return files_under(tmp_path / "out" / "data"), (tmp_path / "metrics" / "data.json").read_bytes()


def assert_previous_output_intact(tmp_path: Path, before: tuple[list[str], bytes]) -> None:
    """A failed run leaves the previous good output and report as they were, and no temporary
    file or folder beside either: the next ``dvc repro`` must find them usable."""
    files, report = before
    assert files_under(tmp_path / "out" / "data") == files
    assert (tmp_path / "metrics" / "data.json").read_bytes() == report
    assert leftovers(tmp_path / "out") == [] and leftovers(tmp_path / "metrics") == []


def add_member(archive: Path, name: str, data: bytes = b"x", mode: int = stat.S_IFREG | 0o644,
               compress_type: int = zipfile.ZIP_STORED) -> None:
    """Append one member with the given Unix mode (e.g. a symlink) to an existing zip."""
    info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
    info.external_attr = mode << 16
    info.compress_type = compress_type
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(info, data)


def add_zeros(archive: Path, name: str, size: int) -> None:
    """Append a deflated member of ``size`` zero bytes: a few kB in the zip per MB unpacked."""
    add_member(archive, name, bytes(size), compress_type=zipfile.ZIP_DEFLATED)


def corrupt_member(archive: Path, name: str) -> None:
    """Flip bytes inside the compressed data of member ``name`` (bad deflate data / CRC)."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(name)
    data = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + 10, start + 40):
        data[i] ^= 0xFF
    archive.write_bytes(bytes(data))


def understate_size(archive: Path, name: str, size: int) -> None:
    """Make both headers of member ``name`` claim it unpacks to ``size`` bytes (a lie)."""
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(name)
    struct.pack_into("<I", data, info.header_offset + 22, size)  # local header: uncompressed size
    encoded = name.encode()
    central = data.find(b"PK\x01\x02", info.header_offset)
    while data[central + 46:central + 46 + len(encoded)] != encoded:
        central = data.find(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", data, central + 24, size)  # central directory: uncompressed size
    archive.write_bytes(bytes(data))


# --------------------------------------------------------------------------- good archives

def test_extracts_and_reports(make_zip: MakeZip, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Images land in <split>/<class>/, each decodable; the gif and the corrupt jpg are skipped
    and named in the report and on stderr; litter is ignored and counted."""
    archive = make_zip(tmp_path / "a.zip", n_train=3, n_val=2, extra=("gif", "corrupt", "litter"))
    report = run_ok(archive, tmp_path)
    out = tmp_path / "out" / "data"
    assert files_under(out) == sorted(
        [f"train/{c}/{c}_train_{i}.png" for c in ("ants", "bees") for i in range(3)]
        + [f"val/{c}/{c}_val_{i}.png" for c in ("ants", "bees") for i in range(2)])
    with Image.open(out / "train" / "ants" / "ants_train_0.png") as image:
        assert image.size == (32, 32)
    assert report["classes"] == 2
    assert report["train"] == {"images": 6, "per_class": {"ants": 3, "bees": 3}}
    assert report["val"] == {"images": 4, "per_class": {"ants": 2, "bees": 2}}
    gif, corrupt = f"train/ants/{GIF_NAME}", f"val/bees/{CORRUPT_NAME}"
    assert sorted(report["skipped"]) == [gif, corrupt] and report["skipped_count"] == 2
    assert "unsupported file type '.gif'" in report["skipped"][gif]
    assert "does not decode" in report["skipped"][corrupt]
    # __MACOSX fork, 2 x .DS_Store, the image inside .ipynb_checkpoints
    assert report["ignored_entries"] == 4
    captured = capsys.readouterr()
    warnings = [ln for ln in captured.err.splitlines() if ln.startswith("warning: skipped")]
    assert len(warnings) == 2 and gif in warnings[0] and corrupt in warnings[1]
    assert "train 6 images, val 4 images in 2 classes, 2 skipped" in captured.out
    assert leftovers(tmp_path / "out") == []


def test_splits_at_archive_top_and_jpeg(make_zip: MakeZip, tmp_path: Path) -> None:
    """A zip without the wrapping folder, holding JPEGs and three classes, works too."""
    archive = make_zip(tmp_path / "a.zip", classes=("cats", "dogs", "owls"), n_train=2, n_val=1,
                       top="", fmt="JPEG")
    report = run_ok(archive, tmp_path)
    assert report["classes"] == 3 and report["val"]["per_class"] == {"cats": 1, "dogs": 1, "owls": 1}
    assert (tmp_path / "out" / "data" / "train" / "owls" / "owls_train_1.jpg").is_file()


def test_rerun_replaces_the_whole_folder(make_zip: MakeZip, tmp_path: Path) -> None:
    """A new archive replaces the old output whole: nothing stale survives."""
    run_ok(make_zip(tmp_path / "a.zip", classes=("ants", "bees")), tmp_path)
    report = run_ok(make_zip(tmp_path / "b.zip", classes=("cats", "dogs")), tmp_path)
    assert sorted(p.name for p in (tmp_path / "out" / "data" / "train").iterdir()) == ["cats", "dogs"]
    assert report["skipped"] == {}
    assert leftovers(tmp_path / "out") == []


def test_dataset_zip_fixture(dataset_zip: Path, tmp_path: Path) -> None:
    """The shared fixture is a valid data set with the real archive's one skipped gif."""
    report = run_ok(dataset_zip, tmp_path)
    assert report["train"]["per_class"] == {"ants": 6, "bees": 6}
    assert report["val"]["per_class"] == {"ants": 4, "bees": 4}
    assert list(report["skipped"]) == [f"train/ants/{GIF_NAME}"]


# --------------------------------------------------------------------------- unsafe archives

@pytest.mark.parametrize(
    ("name", "mode", "reason"),
    [
        ("/etc/evil.png", stat.S_IFREG | 0o644, "absolute path"),
        ("hymenoptera_data/train/ants/../../../../evil.png", stat.S_IFREG | 0o644, "'..'"),
        ("..\\evil.png", stat.S_IFREG | 0o644, "'..'"),
        ("hymenoptera_data/train/ants/link.png", stat.S_IFLNK | 0o777, "symbolic link"),
    ],
)
def test_unsafe_members_refused_before_writing(make_zip: MakeZip, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               name: str, mode: int, reason: str) -> None:
    """Zip-slip and symlinks are refused with the member named; nothing is written."""
    archive = make_zip(tmp_path / "a.zip")
    add_member(archive, name, b"/etc/passwd", mode)
    line = run_failing(archive, tmp_path, capsys)
    assert "unsafe members, nothing extracted" in line and name in line and reason in line
    assert_nothing_written(tmp_path)
    assert not (tmp_path / "evil.png").exists()


def test_failure_keeps_previous_good_output(make_zip: MakeZip, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A bad archive after a good one leaves the good output and its report untouched."""
    run_ok(make_zip(tmp_path / "good.zip"), tmp_path)
    before = previous_output(tmp_path)
    bad = make_zip(tmp_path / "bad.zip", n_val=0)
    assert "no val/ split" in run_failing(bad, tmp_path, capsys)
    assert_previous_output_intact(tmp_path, before)


def test_subprocess_unsafe_archive(make_zip: MakeZip, tmp_path: Path) -> None:
    """The real command line: exit code 1, one 'error:' line, no traceback, nothing written."""
    archive = make_zip(tmp_path / "a.zip")
    add_member(archive, "../evil.png")
    proc = run_module("stages.unzip", stage_args(archive, tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert "../evil.png (path with '..')" in error_line(proc.stderr)
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------- members that disagree

@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize(("first", "second"), [
    pytest.param("train/ants/a.png", "train/ants/a.png", id="the-same-name-twice"),
    pytest.param("train/ants/a.png", "train/Ants/a.png", id="letter-case"),
    pytest.param("train/ants/caf\u00e9.png", "train/ants/cafe\u0301.png", id="NFC-and-NFD"),
    pytest.param("train/ants/a.png", "train/ants//a.png", id="an-empty-part"),
    pytest.param("train/ants/a.png", "train/ants/a.png/b.png", id="a-file-where-a-folder-must-be"),
])
def test_members_that_would_be_one_file_are_refused_before_writing(make_zip: MakeZip, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   first: str, second: str) -> None:
    """Two members that would land in one file (on this file system, or on macOS's and Windows'
    that ignore letter case and Unicode normalisation) are refused, both named, before anything
    is written: a good image followed by a broken copy of the same name used to be counted twice
    while the broken one overwrote it."""
    archive = make_zip(tmp_path / "a.zip")
    with zipfile.ZipFile(archive) as zf:
        good = zf.read("hymenoptera_data/train/ants/ants_train_0.png")
    add_member(archive, f"hymenoptera_data/{first}", good)
    add_member(archive, f"hymenoptera_data/{second}", b"\x89PNG broken")
    line = run_failing(archive, tmp_path, capsys)
    assert "has members that would overwrite each other" in line and "nothing extracted" in line, line
    assert ascii(f"hymenoptera_data/{first}") in line and ascii(f"hymenoptera_data/{second}") in line, line
    assert_nothing_written(tmp_path)


def test_class_folders_spelled_two_ways_are_refused(make_zip: MakeZip, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A class whose folder is 'café' composed in train/ and decomposed in val/ (they print
    alike), or 'Ants' beside 'ants' in one split: refused, each spelling shown escaped and by
    its code points, instead of 'different class folders' listing names that look the same."""
    archive = make_zip(tmp_path / "a.zip", classes=("caf\u00e9", "bees"), n_val=0)
    with zipfile.ZipFile(archive) as zf:
        image = zf.read("hymenoptera_data/train/bees/bees_train_0.png")
    add_member(archive, "hymenoptera_data/val/cafe\u0301/a.png", image)
    add_member(archive, "hymenoptera_data/val/bees/b.png", image)
    line = run_failing(archive, tmp_path, capsys)
    assert "class folders that differ only in Unicode normalisation or letter case" in line, line
    assert "'cafe\\u0301' (U+0063 U+0061 U+0066 U+0065 U+0301) in val/" in line, line
    assert "'caf\\xe9' (U+0063 U+0061 U+0066 U+00E9) in train/" in line, line
    assert_nothing_written(tmp_path)

    add_member(archive, "hymenoptera_data/train/Bees/c.png", image)
    line = run_failing(archive, tmp_path, capsys)
    assert "'Bees' (U+0042 U+0065 U+0065 U+0073) in train/ and 'bees' (U+0062 U+0065 U+0065 U+0073) in train/ val/" \
        in line, line


@pytest.mark.parametrize(("name", "reason"), [
    pytest.param("hymenoptera_data/train/ants/" + "n" * 252 + ".png", "name too long", id="a-part-past-255-bytes"),
    pytest.param("hymenoptera_data/train/ants/" + "d/" * 500 + "a.png", "name too long", id="past-1000-bytes"),
    pytest.param("", "empty name", id="empty"),
    pytest.param("hymenoptera_data/train/ants\n/a.png", "control character in name", id="a-line-break"),
])
def test_names_that_cannot_be_written_are_refused(make_zip: MakeZip, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str], name: str, reason: str) -> None:
    """A name the file system would refuse (ENAMETOOLONG), or a path of so many folders that
    creating them would not end well, or a control character (a class named by a line break:
    found by the fuzzing below), is refused by name before anything is written."""
    archive = make_zip(tmp_path / "a.zip")
    add_member(archive, name)
    line = run_failing(archive, tmp_path, capsys)
    assert "unsafe members, nothing extracted" in line and f"({reason})" in line, line
    assert_nothing_written(tmp_path)


def patch_headers(archive: Path, name: str, local: int, central: int, value: bytes) -> None:
    """Overwrite ``value`` at offset ``local`` of member ``name``'s local header and at
    ``central`` of its central directory entry (the flags: 6 and 8; the method: 8 and 10)."""
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(name)
    data[info.header_offset + local:info.header_offset + local + len(value)] = value
    encoded = name.encode()
    entry = data.find(b"PK\x01\x02", info.header_offset)
    while data[entry + 46:entry + 46 + len(encoded)] != encoded:
        entry = data.find(b"PK\x01\x02", entry + 4)
    data[entry + central:entry + central + len(value)] = value
    archive.write_bytes(bytes(data))


@pytest.mark.parametrize(("local", "central", "value", "expected"), [
    pytest.param(6, 8, struct.pack("<H", 1), "is encrypted, password required", id="a-password"),
    pytest.param(8, 10, struct.pack("<H", 9), "compression method is not supported", id="deflate64"),
])
def test_members_zipfile_cannot_read_are_one_line(make_zip: MakeZip, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str], local: int, central: int,
                                                  value: bytes, expected: str) -> None:
    """A password-protected member, or one compressed with deflate64 (what Windows Explorer
    uses for large zips), ends in one line naming the member and what to do, not a traceback."""
    archive = make_zip(tmp_path / "a.zip")
    name = "hymenoptera_data/train/bees/bees_train_2.png"
    patch_headers(archive, name, local, central, value)
    line = run_failing(archive, tmp_path, capsys)
    assert f"cannot be extracted at {name}" in line and expected in line and "without a password" in line, line
    assert_nothing_written(tmp_path)


def test_names_flagged_utf8_that_are_not(make_zip: MakeZip, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A member name whose bytes are not the UTF-8 its flag promises: not a readable zip."""
    archive = make_zip(tmp_path / "a.zip")
    add_member(archive, "hymenoptera_data/train/ants/\u00e9.png")
    archive.write_bytes(archive.read_bytes().replace("\u00e9".encode(), b"\xff\xfe"))
    assert "is not a zip archive" in run_failing(archive, tmp_path, capsys)
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------- bad layouts

def test_missing_split(make_zip: MakeZip, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No val/: the message says so and lists what train/ held."""
    line = run_failing(make_zip(tmp_path / "a.zip", n_val=0), tmp_path, capsys)
    assert "not an image-folder data set" in line and "no val/ split" in line
    assert "found train: ants (6), bees (6)" in line
    assert_nothing_written(tmp_path)


def test_different_classes(make_zip: MakeZip, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A class only in val/ would give mismatched labels: refused, both splits listed."""
    archive = make_zip(tmp_path / "a.zip")
    with zipfile.ZipFile(archive) as zf:
        ants = zf.read("hymenoptera_data/val/ants/ants_val_0.png")
    add_member(archive, "hymenoptera_data/val/wasps/w.png", ants)
    line = run_failing(archive, tmp_path, capsys)
    assert "different class folders" in line
    assert "train: ants (6), bees (6); val: ants (4), bees (4), wasps (1)" in line
    assert_nothing_written(tmp_path)


def test_class_without_images(make_zip: MakeZip, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A class whose only file is unusable counts as empty and is refused, by name."""
    archive = make_zip(tmp_path / "a.zip", n_val=0)
    add_member(archive, "hymenoptera_data/val/ants/", b"", stat.S_IFDIR | 0o755)
    add_member(archive, "hymenoptera_data/val/bees/broken.jpg", b"\xff\xd8\xff\xe0 not really")
    line = run_failing(archive, tmp_path, capsys)
    assert "class folders without images: val/ants, val/bees" in line
    assert_nothing_written(tmp_path)


def test_single_class(make_zip: MakeZip, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One class is not a classification problem."""
    line = run_failing(make_zip(tmp_path / "a.zip", classes=("ants",)), tmp_path, capsys)
    assert "at least 2 classes" in line
    assert_nothing_written(tmp_path)


def test_no_train_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unrelated zip: the top-level folders are listed."""
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("docs/readme.txt", "hi")
        zf.writestr("src/main.py", "print()")
    line = run_failing(archive, tmp_path, capsys)
    assert "no train/ folder" in line and "docs, src" in line
    assert_nothing_written(tmp_path)


def test_not_a_zip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An HTML page saved as the zip is named as not a zip."""
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"<html>nope</html>")
    assert "is not a zip archive" in run_failing(archive, tmp_path, capsys)
    assert_nothing_written(tmp_path)


def test_missing_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Running unzip before fetch says which stage to run."""
    line = run_failing(tmp_path / "none.zip", tmp_path, capsys)
    assert "does not exist: run the fetch stage first" in line
    assert_nothing_written(tmp_path)


def test_corrupt_member_data(make_zip: MakeZip, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Flipped bytes inside a compressed member (bad CRC/deflate data) mean: fetch it again."""
    archive = make_zip(tmp_path / "a.zip")
    corrupt_member(archive, "hymenoptera_data/val/bees/bees_val_3.png")
    line = run_failing(archive, tmp_path, capsys)
    assert "is corrupt at hymenoptera_data/val/bees/bees_val_3.png" in line and "fetch it again" in line
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------- the rules themselves

@pytest.mark.parametrize(
    ("name", "litter"),
    [
        ("__MACOSX/train/ants/._a.png", True),
        ("data/.DS_Store", True),
        ("train/ants/.ipynb_checkpoints/a.png", True),
        ("train/ants/._a.png", True),
        ("train/ants/Thumbs.db", True),
        ("train/ants/a.png", False),
        ("train/ants.v2/a.png", False),
    ],
)
def test_is_litter(name: str, litter: bool) -> None:
    """Hidden and OS entries are litter; dotted names that are not hidden are data."""
    assert is_litter(PurePosixPath(name)) is litter


def test_layout_problem_accepts_a_good_layout() -> None:
    """The check is not a blanket refusal."""
    assert layout_problem({"train": {"a": 1, "b": 2}, "val": {"a": 1, "b": 1}}) is None


def test_layout_problem_lists_what_was_found() -> None:
    """With nothing usable, the message says so rather than being empty."""
    problem = layout_problem({})
    assert problem is not None and "no train/ or val/ split" in problem and "found nothing" in problem


def test_user_error_is_the_failure_type(make_zip: MakeZip, tmp_path: Path) -> None:
    """Stages called in-process raise UserError (not SystemExit) so callers can handle it."""
    with pytest.raises(UserError, match="no val/ split"):
        run_ok(make_zip(tmp_path / "a.zip", n_val=0), tmp_path)


# --------------------------------------------------------------------------- val split off train

def test_val_split_off_train(make_zip: MakeZip, tmp_path: Path) -> None:
    """Without val/, data.val_fraction moves a seeded, stratified share of train/ there."""
    archive = make_zip(tmp_path / "a.zip", n_train=8, n_val=0)
    report = run_ok(archive, tmp_path, {"data.val_fraction": 0.25, "seed": 3})
    assert report["train"]["per_class"] == {"ants": 6, "bees": 6}
    assert report["val"]["per_class"] == {"ants": 2, "bees": 2}
    assert report["val_split_from_train"] == 0.25
    out = tmp_path / "out" / "data"
    val_files = files_under(out / "val")
    assert all("_train_" in name for name in val_files)
    assert not set(files_under(out / "train")) & set(val_files), "an image is in one split only"
    run_ok(archive, tmp_path, {"data.val_fraction": 0.25, "seed": 3})
    assert files_under(out / "val") == val_files, "the same seed gives the same split"


def test_val_fraction_ignored_when_val_exists(make_zip: MakeZip, tmp_path: Path) -> None:
    """An archive's own val/ split is never replaced."""
    report = run_ok(make_zip(tmp_path / "a.zip"), tmp_path, {"data.val_fraction": 0.5})
    assert report["val"]["per_class"] == {"ants": 4, "bees": 4}
    assert report["val_split_from_train"] == 0


def test_test_split_off_val(make_zip: MakeZip, tmp_path: Path) -> None:
    """Without test/, data.test_fraction moves a seeded, stratified share of val/ there: the
    images evaluate scores, which neither trained nor chose the epoch."""
    archive = make_zip(tmp_path / "a.zip", n_train=4, n_val=4)
    report = run_ok(archive, tmp_path, {"data.test_fraction": 0.5, "seed": 3})
    assert {split: report[split]["per_class"] for split in ("train", "val", "test")} == {
        "train": {"ants": 4, "bees": 4}, "val": {"ants": 2, "bees": 2}, "test": {"ants": 2, "bees": 2}}
    assert (report["val_split_from_train"], report["test_split_from_val"]) == (0, 0.5)
    out = tmp_path / "out" / "data"
    test_files = files_under(out / "test")
    assert len(test_files) == 4 and all("_val_" in name for name in test_files)
    assert not {Path(f).name for f in files_under(out / "val")} & {Path(f).name for f in test_files}
    run_ok(archive, tmp_path, {"data.test_fraction": 0.5, "seed": 3})
    assert files_under(out / "test") == test_files, "the same seed gives the same split"
    run_ok(archive, tmp_path, {"data.test_fraction": 0.5, "seed": 4})
    assert files_under(out / "test") != test_files, "another seed draws another split"


def test_val_and_test_split_off_a_train_only_archive(make_zip: MakeZip, tmp_path: Path) -> None:
    """val/ comes off train/ first, then test/ off that val/."""
    report = run_ok(make_zip(tmp_path / "a.zip", n_train=8, n_val=0), tmp_path,
                    {"data.val_fraction": 0.5, "data.test_fraction": 0.5})
    assert [report[split]["images"] for split in ("train", "val", "test")] == [8, 4, 4]
    assert (report["val_split_from_train"], report["test_split_from_val"]) == (0.5, 0.5)
    names = [Path(f).name for split in ("train", "val", "test") for f in files_under(tmp_path / "out" / "data" / split)]
    assert len(names) == len(set(names)) == 16, "each image in one split"


def test_an_archives_own_test_split_is_kept(make_zip: MakeZip, tmp_path: Path) -> None:
    """A test/ folder in the archive is extracted as it is; test_fraction then changes nothing."""
    report = run_ok(make_zip(tmp_path / "a.zip", n_test=3), tmp_path, {"data.test_fraction": 0.5})
    assert report["test"]["per_class"] == {"ants": 3, "bees": 3}
    assert report["val"]["per_class"] == {"ants": 4, "bees": 4}
    assert report["test_split_from_val"] == 0
    assert all("_test_" in name for name in files_under(tmp_path / "out" / "data" / "test"))


def test_a_test_split_with_other_classes_is_refused() -> None:
    problem = layout_problem({"train": {"ants": 2, "bees": 2}, "val": {"ants": 1, "bees": 1}, "test": {"ants": 1}})
    assert problem is not None and problem.startswith("train/ and test/ have different class folders")


# --------------------------------------------------------------------------- sizes

MB = 2**20


def test_member_past_the_cap_is_refused_before_reading(make_zip: MakeZip, tmp_path: Path) -> None:
    """A member that unpacks past runtime.max_unpacked_mb (a zip bomb) is refused, by name,
    from its header alone: its data is corrupt, so reading it would have failed otherwise."""
    archive = make_zip(tmp_path / "a.zip")
    name = "hymenoptera_data/train/ants/bomb.png"
    add_zeros(archive, name, 3 * MB)
    corrupt_member(archive, name)
    proc = run_module("stages.unzip", stage_args(archive, tmp_path, {"runtime.max_unpacked_mb": 2}))
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc.stderr)
    assert f"{name} unpacks to 3.0 MB, more than runtime.max_unpacked_mb (2 MB); nothing extracted" in line
    assert "corrupt" not in line
    assert_nothing_written(tmp_path)


def test_archive_past_the_cap_is_refused_and_keeps_previous_output(make_zip: MakeZip, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Members each under the cap that together pass it: refused before any is read, the
    previous output and report untouched, no temporary folder left."""
    run_ok(make_zip(tmp_path / "good.zip"), tmp_path)
    before = previous_output(tmp_path)
    archive = make_zip(tmp_path / "big.zip", n_train=1, n_val=1)
    for i in range(3):
        add_zeros(archive, f"hymenoptera_data/train/bees/big_{i}.png", MB)
        corrupt_member(archive, f"hymenoptera_data/train/bees/big_{i}.png")
    line = run_failing(archive, tmp_path, capsys, {"runtime.max_unpacked_mb": 2})
    assert "its 7 images unpack to 3.0 MB, more than runtime.max_unpacked_mb (2 MB); nothing extracted" in line
    assert_previous_output_intact(tmp_path, before)


def test_member_larger_than_its_header_says(make_zip: MakeZip, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A lying header (1 kB declared, 3 MB inside, under a 2 MB cap): reading stops at the
    declared size, so the member is found corrupt (its CRC is that of all 3 MB) instead of
    filling memory or disk; nothing is written."""
    archive = make_zip(tmp_path / "a.zip")
    name = "hymenoptera_data/val/ants/liar.png"
    add_zeros(archive, name, 3 * MB)
    understate_size(archive, name, 1024)
    with zipfile.ZipFile(archive) as zf:
        assert zf.getinfo(name).file_size == 1024
    line = run_failing(archive, tmp_path, capsys, {"runtime.max_unpacked_mb": 2})
    assert f"is corrupt at {name}: Bad CRC-32" in line and "fetch it again" in line
    assert_nothing_written(tmp_path)


def test_the_cap_counts_only_the_images_extracted(make_zip: MakeZip, tmp_path: Path) -> None:
    """Litter, files outside the splits and non-image files are never read, so they do not
    count: an archive with 3 MB of those passes a 2 MB cap."""
    archive = make_zip(tmp_path / "a.zip")
    add_zeros(archive, "__MACOSX/hymenoptera_data/train/ants/._big.png", MB)
    add_zeros(archive, "hymenoptera_data/docs/big.bin", MB)
    add_zeros(archive, "hymenoptera_data/train/ants/notes.txt", MB)
    report = run_ok(archive, tmp_path, {"runtime.max_unpacked_mb": 2})
    assert report["train"]["per_class"] == {"ants": 6, "bees": 6}
    assert report["skipped"] == {"train/ants/notes.txt": "unsupported file type '.txt'"}


def test_image_past_the_pixel_limit_is_left_out(make_zip: MakeZip, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A 10,000 x 10,000 PNG of 13 kB (past Pillow's decompression-bomb limit, at its warning
    level) is left out and reported with its pixel count, like any file that cannot be
    used; the rest is extracted."""
    archive = make_zip(tmp_path / "a.zip")
    add_member(archive, "hymenoptera_data/train/ants/huge.png", bilevel_png(10_000, 10_000))
    report = run_ok(archive, tmp_path)
    reason = report["skipped"]["train/ants/huge.png"]
    assert reason.startswith("too large to decode safely: 100,000,000 pixels, over the 89,478,485 pixels")
    assert report["skipped_count"] == 1 and report["train"]["per_class"] == {"ants": 6, "bees": 6}
    assert not (tmp_path / "out" / "data" / "train" / "ants" / "huge.png").exists()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: skipped train/ants/huge.png: {reason}"]


def test_only_skipped_images_leave_no_empty_folder(make_zip: MakeZip, tmp_path: Path) -> None:
    """A subfolder whose only image is left out does not appear in the output."""
    archive = make_zip(tmp_path / "a.zip")
    add_member(archive, "hymenoptera_data/train/ants/sub/broken.png", b"\x89PNG not really")
    report = run_ok(archive, tmp_path)
    assert list(report["skipped"]) == ["train/ants/sub/broken.png"]
    assert not (tmp_path / "out" / "data" / "train" / "ants" / "sub").exists()


# --------------------------------------------------------------------------- full or read-only disks

def limit_file_size(limit: int) -> Callable[[], None]:
    """For ``preexec_fn``: files the process writes may not grow past ``limit`` bytes, and
    a write past it fails with EFBIG (SIGXFSZ ignored) instead of killing the process."""
    def limit_writes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_writes


def test_file_size_limit_keeps_previous_output(make_zip: MakeZip, tmp_path: Path) -> None:
    """The real command under a 16 kB file-size limit (ulimit -f) with 22 kB images: EFBIG
    on the first one. One line names the output and the cause; the previous output and
    report are intact and no temporary file or folder is left."""
    run_ok(make_zip(tmp_path / "good.zip"), tmp_path)
    before = previous_output(tmp_path)
    archive = make_zip(tmp_path / "large.zip", size=96)
    proc = subprocess.run([sys.executable, "-m", "stages.unzip", *stage_args(archive, tmp_path)],
                          cwd=REPO_ROOT, env=stage_env(), capture_output=True, text=True, timeout=60,
                          check=False, preexec_fn=limit_file_size(16 * 1024))
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc.stderr)
    out = tmp_path / "out" / "data"
    assert line.startswith("error: [Errno 27] File too large") and f"writing {out}" in line, line
    assert line.endswith("the stage's outputs are as they were")
    assert_previous_output_intact(tmp_path, before)


#: Runs in a private mount namespace: a small tmpfs at $MNT, a good unzip into it, then
#: (optionally) the tmpfs made read-only, then the unzip under test; what it left is
#: listed into $OUTSIDE, since the tmpfs vanishes with the namespace.
NAMESPACE_SCRIPT = r"""
mount -t tmpfs -o size="$SIZE" tmpfs "$MNT" || exit 97
args="--params $OUTSIDE/params.yaml --out $MNT/out/data --report $MNT/metrics/data.json"
"$PY" -m stages.unzip "$GOOD" $args > /dev/null 2>&1 || exit 98
cp "$MNT/metrics/data.json" "$OUTSIDE/report_before"
(cd "$MNT" && find . | sort) > "$OUTSIDE/files_before"
if [ "$READ_ONLY" = 1 ]; then mount -o remount,ro "$MNT" || exit 97; fi
"$PY" -m stages.unzip "$NEW" $args 2> "$OUTSIDE/stderr" > /dev/null
echo $? > "$OUTSIDE/rc"
cp "$MNT/metrics/data.json" "$OUTSIDE/report_after"
(cd "$MNT" && find . | sort) > "$OUTSIDE/files_after"
"""


def mount_namespace(probe_dir: Path) -> list[str]:
    """The command prefix that runs a command in a private mount namespace where it may
    mount a tmpfs (as root, or through a user namespace); skip the test where neither works.
    Mounts made there are invisible outside and vanish with the command."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to make a small or read-only file system")
    prefix = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix.append("--map-root-user")
    probe_dir.mkdir()
    probe = subprocess.run([*prefix, "sh", "-c", 'mount -t tmpfs tmpfs "$0"', str(probe_dir)],
                           capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace here: {probe.stderr.decode().strip()}")
    return prefix


@pytest.mark.parametrize(("case", "size", "read_only", "code", "cause"), [
    pytest.param("disk-full", "200k", False, "ENOSPC", "No space left on device", id="disk-full"),
    pytest.param("read-only", "1m", True, "EROFS", "Read-only file system", id="read-only"),
])
def test_full_or_read_only_disk_keeps_previous_output(make_zip: MakeZip, tmp_path: Path, case: str, size: str,
                                                      read_only: bool, code: str, cause: str) -> None:
    """On a real full (a 200 kB tmpfs, 450 kB of images) or read-only file system: exit code
    1, one line naming the output and the cause, the previous output and report intact, no
    temporary files."""
    prefix = mount_namespace(tmp_path / "probe")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    write_params(tmp_path / "params.yaml", {"data.val_fraction": 0})
    env = {**stage_env(), "MNT": str(mnt), "OUTSIDE": str(tmp_path), "SIZE": size, "PY": sys.executable,
           "READ_ONLY": str(int(read_only)), "GOOD": str(make_zip(tmp_path / "good.zip")),
           "NEW": str(make_zip(tmp_path / "new.zip", size=96))}
    proc = subprocess.run([*prefix, "sh", "-c", NAMESPACE_SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{case}: the set-up failed ({proc.returncode}): {proc.stderr}"
    assert (tmp_path / "rc").read_text().strip() == "1"
    line = error_line((tmp_path / "stderr").read_text())
    assert line.startswith(f"error: [Errno {getattr(errno, code)}] {cause}"), line
    assert f"writing {mnt / 'out' / 'data'}" in line
    assert (tmp_path / "files_after").read_text() == (tmp_path / "files_before").read_text()
    assert (tmp_path / "report_after").read_bytes() == (tmp_path / "report_before").read_bytes()
    assert ".tmp" not in (tmp_path / "files_after").read_text()


# --------------------------------------------------------------------------- fuzzing member names

#: Parts of member names: the splits and classes in several spellings, the dots and names the
#: checks single out, image and other names, a name too long, and any text.
NAME_PARTS = st.sampled_from(
    ["train", "val", "test", "Train", "hymenoptera_data", "ants", "Ants", "bees", "caf\u00e9", "cafe\u0301", ".",
     "..", "", ".DS_Store", "__MACOSX", "a.png", "A.PNG", "b.jpg", "x.txt", "n" * 256, "\\..\\x.png", "C:"]
) | st.text(max_size=6)
#: Names laid out as a data set's, with the variants that must not clash: top folders, splits,
#: classes and files in several spellings, a file where a folder is, an empty part.
LAID_OUT = st.tuples(
    st.sampled_from(["", "hymenoptera_data/", "hymenoptera_data//", "./", "Other/"]),
    st.sampled_from(["train/", "val/", "test/", "Train/"]),
    st.sampled_from(["ants/", "Ants/", "bees/", "caf\u00e9/", "cafe\u0301/"]),
    st.sampled_from(["a.png", "A.png", "b.jpg", "c.PNG", "sub/d.png", "e.txt", "", "a.png/f.png", ".g.png"]),
).map("".join)
MEMBER_NAMES = st.lists(NAME_PARTS, min_size=1, max_size=5).map("/".join) | LAID_OUT | LAID_OUT
#: A good data set the names are added to, or a part of one, or none.
GOOD = [f"hymenoptera_data/{split}/{c}/{c}{i}.png" for split in ("train", "val") for c in ("ants", "bees")
        for i in (0, 1)]


@settings(max_examples=50, deadline=None)
@given(names=st.tuples(st.sampled_from([[], GOOD, GOOD[:4]]), st.lists(MEMBER_NAMES, min_size=1, max_size=8)).map(
    lambda parts: parts[0] + parts[1]), val_fraction=st.sampled_from([0, 0.5]), per_class=st.sampled_from(["all", 1]))
def test_any_member_names_give_a_report_or_a_user_error(tiny_png: bytes, names: list[str], val_fraction: float,
                                                        per_class: int | str) -> None:
    """Whatever the member names (slashes, dots, '..', Unicode, case variants, duplicates), a
    zip of tiny valid images is extracted with a report or refused with a UserError, never
    another exception; what was extracted is what the report counts. (Found so: an empty name
    raised IndexError, a file and a folder of one name IsADirectoryError, and a name twice was
    counted twice.)"""
    with tempfile.TemporaryDirectory() as folder:
        archive, dest = Path(folder) / "a.zip", Path(folder) / "out"
        dest.mkdir()
        with warnings.catch_warnings(), zipfile.ZipFile(archive, "w") as zf:
            warnings.simplefilter("ignore")  # duplicate names
            for name in names:
                zf.writestr(zipfile.ZipInfo(name, date_time=ZIP_TIME), b"" if name.endswith("/") else tiny_png)
        try:
            report = extract_image_folder(archive, dest, max_unpacked_mb=1, val_fraction=val_fraction,
                                          test_fraction=0.0, seed=0, train_per_class=per_class)
        except UserError as exc:
            assert "\n" not in str(exc)
            return
        extracted = [p for p in dest.rglob("*") if p.is_file()]
        assert len(extracted) == sum(report[split]["images"] for split in ("train", "val", "test") if split in report)


@pytest.fixture(scope="module")
def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()
