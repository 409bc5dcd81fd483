"""Stage ``fetch`` as DVC runs it: params file in, zip and digest report out. Every bad input
ends in exit code 1 with one ``error:`` line saying what happened and how to fetch by hand,
and leaves neither the zip nor the report behind."""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import ALWAYS, LoopbackServer, error_line, leftovers, run_module, write_params
from imagefolders import make_image_folders

from stages import fetch as fetch_stage
from transfer.download import sha256_of
from transfer.stage import run_stage

HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Log in first</body></html>\n"


def stage_args(tmp_path: Path, changes: dict[str, Any]) -> list[str]:
    """argv for the stage, with a params file (the repo's, plus ``changes``) in tmp_path."""
    params = write_params(tmp_path / "params.yaml", {"runtime.download_retries": 0, **changes})
    return ["--params", str(params), "--out", str(tmp_path / "data" / "d.zip"),
            "--report", str(tmp_path / "metrics" / "fetch.json")]


def run_failing(tmp_path: Path, changes: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the stage in-process through run_stage; check the exit code, the single error line
    and that no output exists; return the error line."""
    with pytest.raises(SystemExit) as info:
        run_stage(fetch_stage.main, stage_args(tmp_path, changes))
    assert info.value.code == 1
    line = error_line(capsys.readouterr().err)
    assert_no_outputs(tmp_path)
    return line


def assert_no_outputs(tmp_path: Path) -> None:
    """Neither the zip nor the report (nor temporary files) may exist after a failure."""
    assert not (tmp_path / "data" / "d.zip").exists()
    assert not (tmp_path / "metrics" / "fetch.json").exists()
    assert leftovers(tmp_path / "data") == [] and leftovers(tmp_path / "metrics") == []


def test_fetch_over_http(http_server: LoopbackServer, dataset_zip: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    """The zip lands at --out and the report records url, digest, size, and that it was unpinned."""
    url = http_server.serve("hymenoptera_data.zip", dataset_zip.read_bytes())
    fetch_stage.main(stage_args(tmp_path, {"data.url": url}))
    out = tmp_path / "data" / "d.zip"
    assert out.read_bytes() == dataset_zip.read_bytes()
    report = json.loads((tmp_path / "metrics" / "fetch.json").read_text())
    assert report == {"url": url, "sha256": sha256_of(dataset_zip),
                      "bytes": dataset_zip.stat().st_size, "sha256_pinned": False}
    assert "fetched" in capsys.readouterr().out


def test_fetch_local_path_with_pinned_digest(dataset_zip: Path, tmp_path: Path) -> None:
    """An offline mirror given as a plain path, verified against a pinned digest."""
    digest = sha256_of(dataset_zip)
    fetch_stage.main(stage_args(tmp_path, {"data.url": str(dataset_zip), "data.sha256": digest}))
    report = json.loads((tmp_path / "metrics" / "fetch.json").read_text())
    assert report["sha256"] == digest and report["sha256_pinned"] is True
    assert (tmp_path / "data" / "d.zip").read_bytes() == dataset_zip.read_bytes()


def test_fetch_file_url(dataset_zip: Path, tmp_path: Path) -> None:
    """file:// URLs work like paths."""
    fetch_stage.main(stage_args(tmp_path, {"data.url": dataset_zip.as_uri()}))
    assert sha256_of(tmp_path / "data" / "d.zip") == sha256_of(dataset_zip)


def test_fetch_survives_a_transient_error(http_server: LoopbackServer, dataset_zip: Path,
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 503 on the first try is retried (runtime.download_retries) and the stage succeeds."""
    url = http_server.serve("d.zip", dataset_zip.read_bytes(), fail_first=1, fail_with=503)
    fetch_stage.main(stage_args(tmp_path, {"data.url": url, "runtime.download_retries": 1}))
    assert http_server.hits("d.zip") == 2
    assert (tmp_path / "data" / "d.zip").read_bytes() == dataset_zip.read_bytes()
    assert "warning: server answered HTTP 503" in capsys.readouterr().err


def test_wrong_digest(dataset_zip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A pinned digest that does not match names both digests."""
    line = run_failing(tmp_path, {"data.url": str(dataset_zip), "data.sha256": "ab" * 32}, capsys)
    assert "sha256 mismatch" in line and "ab" * 32 in line and sha256_of(dataset_zip) in line
    assert "by hand" not in line, "a local file: downloading it by hand would not help"


def test_html_page_instead_of_zip(http_server: LoopbackServer, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A login or error page served with 200 is recognised and named, not saved as the zip."""
    url = http_server.serve("d.zip", HTML, content_type="text/html")
    line = run_failing(tmp_path, {"data.url": url}, capsys)
    assert "HTML page" in line and f"{len(HTML)} bytes" in line and "by hand" in line


def test_other_non_zip_payload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Any other non-zip file is rejected too."""
    src = tmp_path / "src" / "notes.txt"
    src.parent.mkdir()
    src.write_bytes(b"just text\n" * 10)
    assert "not a zip archive" in run_failing(tmp_path, {"data.url": str(src)}, capsys)


def test_http_404(http_server: LoopbackServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A moved upstream file: the status, the URL and the manual route are all in the line."""
    url = http_server.url("gone.zip")
    line = run_failing(tmp_path, {"data.url": url, "runtime.download_retries": 3}, capsys)
    assert "HTTP 404" in line and url in line
    assert f"download {url} by hand and set data.url in" in line
    assert http_server.hits("gone.zip") == 1


def test_refused_connection(closed_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listening on the port."""
    line = run_failing(tmp_path, {"data.url": f"http://127.0.0.1:{closed_port}/d.zip"}, capsys)
    assert "connection refused" in line and "by hand" in line


def test_unknown_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """DNS failure (offline): fast, no retries, says the host could not be resolved."""
    start = time.monotonic()
    line = run_failing(tmp_path, {"data.url": "http://no-such-host.invalid/x.zip", "runtime.download_retries": 3},
                       capsys)
    assert time.monotonic() - start < 5
    assert "cannot resolve host 'no-such-host.invalid'" in line and "by hand" in line


def test_missing_local_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped mirror path."""
    line = run_failing(tmp_path, {"data.url": str(tmp_path / "nope.zip")}, capsys)
    assert "nope.zip does not exist" in line


def test_failure_keeps_previous_zip(tmp_path: Path, dataset_zip: Path) -> None:
    """A failed re-fetch outside DVC (which deletes outputs first) keeps the good zip."""
    args = stage_args(tmp_path, {"data.url": str(dataset_zip)})
    fetch_stage.main(args)
    good = (tmp_path / "data" / "d.zip").read_bytes()
    write_params(tmp_path / "params.yaml", {"data.url": str(tmp_path / "nope.zip"), "runtime.download_retries": 0})
    with pytest.raises(SystemExit):
        run_stage(fetch_stage.main, args)
    assert (tmp_path / "data" / "d.zip").read_bytes() == good
    assert leftovers(tmp_path / "data") == []


def test_bad_params_fail_before_fetching(http_server: LoopbackServer, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed pin is reported by key and nothing is downloaded."""
    url = http_server.serve("d.zip", b"PK")
    line = run_failing(tmp_path, {"data.url": url, "data.sha256": "not-a-digest"}, capsys)
    assert "data.sha256" in line
    assert http_server.hits("d.zip") == 0


def test_subprocess_http_error(http_server: LoopbackServer, tmp_path: Path) -> None:
    """The real command line: exit code 1 and one 'error:' line on stderr, no traceback."""
    url = http_server.url("gone.zip")
    proc = run_module("stages.fetch", stage_args(tmp_path, {"data.url": url}))
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc.stderr)
    assert "HTTP 404" in line and "by hand" in line
    assert_no_outputs(tmp_path)


def test_subprocess_retries_then_fails(http_server: LoopbackServer, dataset_zip: Path,
                                       tmp_path: Path) -> None:
    """Retry warnings go to stderr as 'warning:' lines; the final failure is one 'error:' line."""
    url = http_server.serve("d.zip", dataset_zip.read_bytes(), fail_first=ALWAYS, fail_with="truncate")
    proc = run_module("stages.fetch", stage_args(tmp_path, {"data.url": url, "runtime.download_retries": 1}))
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc.stderr)
    assert "after 2 attempts" in line and "connection closed after" in line
    assert sum(ln.startswith("warning:") for ln in proc.stderr.splitlines()) == 1
    assert http_server.hits("d.zip") == 2
    assert_no_outputs(tmp_path)


def test_local_folder_is_packed_deterministically(dataset_zip: Path, tmp_path: Path) -> None:
    """A local image folder as data.url is zipped; the same folder gives the same digest."""
    folder = tmp_path / "mirror"
    with zipfile.ZipFile(dataset_zip) as zf:
        zf.extractall(folder)
    digests = []
    for run in ("a", "b"):
        fetch_stage.main(stage_args(tmp_path / run, {"data.url": str(folder / "hymenoptera_data")}))
        out = tmp_path / run / "data" / "d.zip"
        with zipfile.ZipFile(out) as zf:
            assert "train/ants/ants_train_0.png" in zf.namelist()
        digests.append(json.loads((tmp_path / run / "metrics" / "fetch.json").read_text())["sha256"])
    assert digests[0] == digests[1] == sha256_of(tmp_path / "a" / "data" / "d.zip")


def test_local_folder_with_wrong_pin(dataset_zip: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A pinned digest also guards a packed folder; a mismatch leaves no zip."""
    folder = tmp_path / "mirror"
    with zipfile.ZipFile(dataset_zip) as zf:
        zf.extractall(folder)
    line = run_failing(tmp_path, {"data.url": str(folder), "data.sha256": "cd" * 32}, capsys)
    assert "sha256 mismatch" in line and "cd" * 32 in line


def test_local_folder_with_a_class_spelled_two_ways(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Class folders 'Ants' and 'ants' in one split (one folder on macOS and Windows) are
    refused by the rule unzip and training apply, with both spellings, before anything is
    packed."""
    folder = make_image_folders(tmp_path / "mirror", n_train=2, n_val=1)
    shutil.copytree(folder / "train" / "ants", folder / "train" / "Ants")
    line = run_failing(tmp_path, {"data.url": str(folder)}, capsys)
    assert "nothing was packed" in line and "differ only in Unicode normalisation or letter case" in line, line
    assert "'Ants' (U+0041 U+006E U+0074 U+0073) in train/ and 'ants' (U+0061 U+006E U+0074 U+0073) in train/ val/" \
        in line, line


def test_links_in_a_local_folder_are_not_packed(tmp_path: Path) -> None:
    """A loop of links inside the folder (a class folder linked to its split, a link to the
    top) packs each image once, and a link to a file outside packs nothing from outside."""
    folder = make_image_folders(tmp_path / "mirror", n_train=2, n_val=1)
    (folder / "train" / "again").symlink_to(".")
    (folder / "train" / "ants" / "top").symlink_to("../..")
    (tmp_path / "secret.png").write_bytes((folder / "val" / "bees" / "bees_val_0.png").read_bytes())
    (folder / "train" / "bees" / "outside.png").symlink_to(tmp_path / "secret.png")
    fetch_stage.main(stage_args(tmp_path, {"data.url": str(folder)}))
    with zipfile.ZipFile(tmp_path / "data" / "d.zip") as zf:
        names = sorted(zf.namelist())
    assert names == sorted(f"{split}/{c}/{c}_{split}_{i}.png" for split, n in (("train", 2), ("val", 1))
                           for c in ("ants", "bees") for i in range(n))


@pytest.mark.parametrize("case", ["loop", "too-long", "no-such-user", "bracket"])
def test_impossible_paths_end_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    """data.url naming a loop of links, a name too long for the file system, the home folder
    of a user that does not exist, or a path urllib cannot split: one line naming it."""
    loop = tmp_path / "loop.zip"
    loop.symlink_to("loop.zip")
    url, expected = {
        "loop": (str(loop), f"{loop} cannot be read: Too many levels of symbolic links"),
        "too-long": (str(tmp_path / ("n" * 300 + ".zip")), "File name too long"),
        "no-such-user": ("~nosuchuser/data.zip", "~nosuchuser/data.zip does not exist (~nosuchuser is no user's home "
                         "folder)"),
        "bracket": ("//[x/data.zip", "//[x/data.zip is neither a URL nor a path that can be read"),
    }[case]
    line = run_failing(tmp_path, {"data.url": url}, capsys)
    assert expected in line, line
    assert "writing" not in line, "the source is not what failed to be written"
