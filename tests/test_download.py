"""transfer.download.fetch against a real loopback HTTP server and real files: it must copy
exactly, verify digests, retry only what is transient, fail fast with a clear message on the
rest, and never leave a partial file at the destination or temporary files beside it."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import tqdm
from conftest import ALWAYS, LoopbackServer, leftovers

from transfer import download
from transfer.download import fetch, sha256_of
from transfer.errors import UserError

PAYLOAD = bytes(range(256)) * 40 + b"end"  # 10 KiB, not all zeros
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
FAST = {"backoff": 0.01, "timeout": 5.0}  # keep retries quick


def fails(url: str, dest: Path, **kwargs: object) -> str:
    """Fetch ``url`` expecting a UserError; check nothing is left; return the message."""
    with pytest.raises(UserError) as info:
        fetch(url, dest, **{**FAST, **kwargs})  # type: ignore[arg-type]
    assert not dest.exists(), "a failed download must leave no file at the destination"
    assert leftovers(dest.parent) == []
    message = str(info.value)
    assert "\n" not in message
    return message


def test_http_download(http_server: LoopbackServer, tmp_path: Path) -> None:
    """The bytes arrive unchanged, and the digest and size of what arrived are returned."""
    url = http_server.serve("data.zip", PAYLOAD)
    dest = tmp_path / "out" / "data.zip"
    fetched = fetch(url, dest, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert (fetched.sha256, fetched.size) == (DIGEST, len(PAYLOAD))
    assert sha256_of(dest) == DIGEST
    assert leftovers(dest.parent) == []
    assert http_server.hits("data.zip") == 1


def test_file_url_and_plain_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline users point the URL at a mirror: file://, absolute and relative paths work."""
    src = tmp_path / "mirror" / "data.zip"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    monkeypatch.chdir(tmp_path)
    for i, url in enumerate([src.as_uri(), str(src), "mirror/data.zip"]):
        dest = tmp_path / f"out{i}.zip"
        assert fetch(url, dest, **FAST).sha256 == DIGEST
        assert dest.read_bytes() == PAYLOAD


@pytest.mark.parametrize("pin", [DIGEST, DIGEST.upper()])
def test_pinned_digest_accepted(http_server: LoopbackServer, tmp_path: Path, pin: str) -> None:
    """A matching pin (in any letter case) passes."""
    url = http_server.serve("data.zip", PAYLOAD)
    assert fetch(url, tmp_path / "d.zip", sha256=pin, **FAST).sha256 == DIGEST


def test_wrong_digest_is_rejected(http_server: LoopbackServer, tmp_path: Path) -> None:
    """A mismatch names both digests and is not retried (the bytes would be the same)."""
    url = http_server.serve("data.zip", PAYLOAD)
    message = fails(url, tmp_path / "d.zip", sha256="0" * 64, retries=3)
    assert "sha256 mismatch" in message and "0" * 64 in message and DIGEST in message
    assert http_server.hits("data.zip") == 1


def test_failure_keeps_the_previous_file(http_server: LoopbackServer, tmp_path: Path) -> None:
    """A failed download never clobbers what was already at the destination."""
    url = http_server.serve("data.zip", PAYLOAD)
    dest = tmp_path / "d.zip"
    dest.write_bytes(b"previous")
    with pytest.raises(UserError):
        fetch(url, dest, sha256="0" * 64, **FAST)
    assert dest.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


def test_http_404_fails_at_once(http_server: LoopbackServer, tmp_path: Path) -> None:
    """A client error is permanent: no retry, and the message gives the status."""
    url = http_server.url("missing.zip")
    message = fails(url, tmp_path / "d.zip", retries=3)
    assert "HTTP 404" in message and url in message
    assert http_server.hits("missing.zip") == 1


def test_server_errors_are_retried(http_server: LoopbackServer, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Two 500s then success: the download succeeds on the third try, warning each time."""
    url = http_server.serve("data.zip", PAYLOAD, fail_first=2, fail_with=500)
    dest = tmp_path / "d.zip"
    assert fetch(url, dest, retries=2, **FAST).sha256 == DIGEST
    assert dest.read_bytes() == PAYLOAD
    assert http_server.hits("data.zip") == 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "HTTP 500" in warnings[0] and "(1/2)" in warnings[0]


@pytest.mark.parametrize("status", [500, 503, 429])
def test_retries_are_bounded(http_server: LoopbackServer, tmp_path: Path, status: int) -> None:
    """A server that keeps failing is asked retries+1 times, then the error says so."""
    url = http_server.serve("data.zip", PAYLOAD, fail_first=ALWAYS, fail_with=status)
    message = fails(url, tmp_path / "d.zip", retries=2)
    assert f"HTTP {status}" in message and "after 3 attempts" in message
    assert http_server.hits("data.zip") == 3


def test_truncated_body_is_retried(http_server: LoopbackServer, tmp_path: Path) -> None:
    """A connection closed before Content-Length bytes is transient; the retry completes it."""
    url = http_server.serve("data.zip", PAYLOAD, fail_first=1, fail_with="truncate")
    dest = tmp_path / "d.zip"
    assert fetch(url, dest, retries=1, **FAST).size == len(PAYLOAD)
    assert dest.read_bytes() == PAYLOAD
    assert http_server.hits("data.zip") == 2


def test_truncated_body_never_lands(http_server: LoopbackServer, tmp_path: Path) -> None:
    """If every answer is cut short, the half file is never renamed into place."""
    url = http_server.serve("data.zip", PAYLOAD, fail_first=ALWAYS, fail_with="truncate")
    message = fails(url, tmp_path / "d.zip", retries=1)
    assert f"{len(PAYLOAD) // 2} of {len(PAYLOAD)} bytes" in message
    assert http_server.hits("data.zip") == 2


def test_stalled_server_times_out(http_server: LoopbackServer, tmp_path: Path) -> None:
    """A server that stops sending mid-body fails after ``timeout`` seconds of silence."""
    url = http_server.serve("data.zip", PAYLOAD, fail_first=ALWAYS, fail_with="stall", stall=10)
    start = time.monotonic()
    message = fails(url, tmp_path / "d.zip", retries=0, timeout=0.3)
    assert time.monotonic() - start < 5
    assert "within 0.3s" in message and "could not download" in message


def test_refused_connection(closed_port: int, tmp_path: Path) -> None:
    """Nothing listening: retried (the server may be restarting), then a clear message."""
    message = fails(f"http://127.0.0.1:{closed_port}/d.zip", tmp_path / "d.zip", retries=1)
    assert "connection refused" in message and "after 2 attempts" in message


def test_unknown_host_fails_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A name that does not resolve (offline, typo) fails at once, without retries."""
    start = time.monotonic()
    message = fails("http://no-such-host.invalid/x.zip", tmp_path / "d.zip", retries=3, backoff=1)
    assert time.monotonic() - start < 5
    assert "cannot resolve host 'no-such-host.invalid'" in message
    assert "warning:" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://example.invalid/x.zip", "unsupported URL scheme 'ftp'"),
        ("s3://bucket/x.zip", "unsupported URL scheme 's3'"),
        ("no/such/file.zip", "does not exist"),
        ("file:///no/such/file.zip", "does not exist"),
    ],
)
def test_bad_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, expected: str) -> None:
    """Unsupported schemes and missing local files are permanent errors with a clear message."""
    monkeypatch.chdir(tmp_path)
    assert expected in fails(url, tmp_path / "d.zip", retries=3, backoff=1)


def test_folder_is_not_a_file(tmp_path: Path) -> None:
    """Pointing the URL at a folder says so."""
    assert "is a folder" in fails(str(tmp_path), tmp_path / "d.zip")


def test_check_rejects_payload_and_hint_is_appended_once(http_server: LoopbackServer,
                                                         tmp_path: Path) -> None:
    """The caller's check sees the complete file; its verdict and the hint form the message."""
    url = http_server.serve("data.zip", PAYLOAD)
    seen: list[bytes] = []

    def check(path: Path) -> str | None:
        seen.append(path.read_bytes())
        return "not what we wanted"

    message = fails(url, tmp_path / "d.zip", check=check, hint="get it by hand")
    assert seen == [PAYLOAD]
    assert message == f"{url}: not what we wanted; get it by hand"


def test_hint_on_network_errors(http_server: LoopbackServer, tmp_path: Path) -> None:
    """Every failure ends with the hint on how to fetch by hand, exactly once."""
    message = fails(http_server.url("missing.zip"), tmp_path / "d.zip", hint="get it by hand")
    assert message.endswith("; get it by hand") and message.count("get it by hand") == 1


def test_interrupted_download_leaves_nothing(http_server: LoopbackServer, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the middle of the body: the partial temp file is removed, dest never appears."""
    url = http_server.serve("data.zip", PAYLOAD)

    class InterruptingBar(tqdm.tqdm):  # type: ignore[type-arg]
        def update(self, n: float | None = 1) -> bool | None:
            raise KeyboardInterrupt

    monkeypatch.setattr(download, "CHUNK", 1024)
    monkeypatch.setattr(download, "tqdm", InterruptingBar)
    dest = tmp_path / "d.zip"
    with pytest.raises(KeyboardInterrupt):
        fetch(url, dest, **FAST)
    assert list(tmp_path.iterdir()) == []
