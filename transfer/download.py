"""Fetching a file from http(s)://, file:// or a local path, atomically and verifiably: only a
complete file whose sha256 matches is renamed into place; transient network errors are retried
with exponential back-off.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import ssl
import stat
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from transfer.atomic import atomic_path
from transfer.errors import UserError

CHUNK = 1 << 20
USER_AGENT = "transfer-pipeline/1.0 (+https://dvc.org)"


class _Transient(Exception):
    """A failure worth retrying; the message says what happened."""


@dataclass(frozen=True)
class Fetched:
    sha256: str
    size: int


def fetch(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    backoff: float = 1.0,
    check: Callable[[Path], str | None] | None = None,
    hint: str = "",
) -> Fetched:
    """Copy ``url`` to ``dest``; verify ``sha256`` if given; return what was seen. ``check``
    gets the complete temporary file and returns a problem or None; ``hint`` (how to get the
    file by hand) ends every error of a download (not of a local file, nor of writing ``dest``)."""
    dest = Path(dest)
    suffix = f"; {hint}" if hint and local_path(url) is None else ""
    for attempt in range(retries + 1):
        try:
            with atomic_path(dest) as tmp:
                with tmp.open("wb") as out:
                    fetched = _copy(url, out, timeout)
                if sha256 and fetched.sha256 != sha256.lower():
                    raise UserError(
                        f"sha256 mismatch for {url}: expected {sha256.lower()}, got "
                        f"{fetched.sha256} ({fetched.size} bytes){suffix}"
                    )
                problem = check(tmp) if check else None
                if problem:
                    raise UserError(f"{url}: {problem}{suffix}")
            return fetched
        except _Transient as exc:
            if attempt == retries:
                tries = f" after {retries + 1} attempts" if retries else ""
                raise UserError(f"could not download {url}{tries}: {exc}{suffix}") from None
            wait = min(backoff * 2**attempt, 60.0)
            tqdm.write(f"warning: {exc}; retrying in {wait:g}s ({attempt + 1}/{retries})", file=sys.stderr)
            time.sleep(wait)
        except UserError as exc:
            if suffix and str(exc).endswith(suffix):
                raise
            raise UserError(f"{exc}{suffix}") from None
    raise AssertionError("unreachable")


def local_path(url: str) -> Path | None:
    """The local file a ``file://`` URL or plain path names; None for http(s) URLs."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return None
    if scheme == "file":
        return Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    if scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise UserError(f"unsupported URL scheme {scheme!r} in {url}: use http(s)://, file:// or a path")
    return Path(os.path.expanduser(url))  # ~nosuchuser stays as it is, and then does not exist


def _copy(url: str, out: BinaryIO, timeout: float) -> Fetched:
    path = local_path(url)
    if path is None:
        return _copy_http(url, out, timeout)
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):  # a named pipe or device would block or never end
            raise UserError(f"{path} is {'a folder, not a file' if stat.S_ISDIR(mode) else 'not a regular file'}")
        with path.open("rb") as src:
            return _stream(src, out, path.stat().st_size, path.name)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except PermissionError:
        raise UserError(f"{path} is not readable (permission denied)") from None


def _copy_http(url: str, out: BinaryIO, timeout: float) -> Fetched:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            name = Path(urllib.parse.urlsplit(url).path).name or url
            fetched = _stream(response, out, total, name)
            if total is not None and fetched.size != total:
                raise _Transient(f"connection closed after {fetched.size} of {total} bytes")
            return fetched
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code == 429:
            raise _Transient(f"server answered HTTP {exc.code} {exc.reason}") from None
        raise UserError(f"could not download {url}: server answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, socket.gaierror):
            host = urllib.parse.urlsplit(url).hostname
            raise UserError(f"could not download {url}: cannot resolve host {host!r} (offline?)") from None
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise UserError(f"could not download {url}: TLS certificate not trusted: {reason.verify_message}") from None
        if isinstance(reason, ConnectionRefusedError):
            raise _Transient("connection refused") from None
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise _Transient(f"no answer within {timeout:g}s") from None
        raise _Transient(str(reason)) from None
    except TimeoutError:
        raise _Transient(f"no data within {timeout:g}s") from None
    except (ConnectionError, http.client.HTTPException) as exc:
        raise _Transient(f"connection broke: {exc.__class__.__name__} {exc}".strip()) from None


def _stream(src: BinaryIO, out: BinaryIO, total: int | None, name: str) -> Fetched:
    digest = hashlib.sha256()
    size = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
              disable=None, leave=False) as bar:
        while chunk := src.read(CHUNK):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            bar.update(len(chunk))
    return Fetched(digest.hexdigest(), size)


def sha256_of(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as src:
        return hashlib.file_digest(src, "sha256").hexdigest()
