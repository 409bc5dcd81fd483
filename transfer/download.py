"""Fetching a file from http(s)://, file:// or a local path, atomically and verifiably: only a
complete file whose sha256 matches is renamed into place; transient network errors are retried
with exponential back-off.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import ssl
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NamedTuple

from tqdm import tqdm

from transfer.atomic import atomic_path
from transfer.errors import UserError, say

CHUNK = 1 << 20
USER_AGENT = "transfer-pipeline/1.0 (+https://dvc.org)"


class _Transient(Exception):
    """A failure worth retrying; the message says what happened."""


class Fetched(NamedTuple):
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
    file by hand) ends every error of a download (not of a local file, nor of writing ``dest``,
    which are OSErrors)."""
    path = local_path(url)
    suffix = f"; {hint}" if hint and path is None else ""
    attempt = 0
    while True:
        try:
            with atomic_path(dest) as tmp:
                with tmp.open("wb") as out:
                    if path is None:
                        _copy_http(url, out, timeout)
                    else:
                        _copy_file(path, out)
                fetched = verified(tmp, sha256, url)
                if check and (problem := check(tmp)):
                    raise UserError(f"{url}: {problem}")
            return fetched
        except _Transient as exc:
            if attempt == retries:
                tries = f" after {retries + 1} attempts" if retries else ""
                raise UserError(f"could not download {url}{tries}: {exc}{suffix}") from None
            wait = min(backoff * 2**attempt, 60.0)
            attempt += 1
            say(f"warning: {exc}; retrying in {wait:g}s ({attempt}/{retries})")
            time.sleep(wait)
        except UserError as exc:
            raise UserError(f"{exc}{suffix}") from None


def local_path(url: str) -> Path | None:
    """The local file a ``file://`` URL or plain path names; None for http(s) URLs."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL": a bracket after //
        raise UserError(f"{url} is neither a URL nor a path that can be read ({exc})") from None
    scheme = parts.scheme  # lower case
    if scheme in ("http", "https"):
        return None
    if scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    if len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise UserError(f"unsupported URL scheme {scheme!r} in {url}: use http(s)://, file:// or a path")
    return Path(os.path.expanduser(url))  # ~nosuchuser stays as it is: see _copy_file


def _copy_file(path: Path, out: BinaryIO) -> None:
    """Copy the local file ``path``. Its errors are UserErrors: raised inside ``atomic_path``,
    an OSError would read as a failure to write the destination."""
    try:
        status = path.stat()
        if not stat.S_ISREG(status.st_mode):  # a named pipe or device would block or never end
            kind = "a folder, not a file" if stat.S_ISDIR(status.st_mode) else "not a regular file"
            raise UserError(f"{path} is {kind}")
        src = path.open("rb")
    except FileNotFoundError:
        home = str(path).partition("/")[0]  # ~nosuchuser: os.path.expanduser left it as it was
        hint = f" ({home} is no user's home folder)" if home.startswith("~") else ""
        raise UserError(f"{path} does not exist{hint}") from None
    except OSError as exc:  # a loop of links, a name too long, no permission
        raise UserError(f"{path} cannot be read: {exc.strerror}") from None
    with src:
        _stream(src, out, status.st_size, path.name)


def _copy_http(url: str, out: BinaryIO, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length", "")  # no .length after a redirect to ftp://
            total = int(length) if length.isdigit() else None
            _stream(response, out, total, Path(url).name)
    except urllib.error.HTTPError as exc:
        problem = f"server answered HTTP {exc.code} {exc.reason}"
        if exc.code >= 500 or exc.code == 429:
            raise _Transient(problem) from None
        raise UserError(f"could not download {url}: {problem}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, socket.gaierror):
            host = urllib.parse.urlsplit(url).hostname
            raise UserError(f"could not download {url}: cannot resolve host {host!r} (offline?)") from None
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise UserError(f"could not download {url}: TLS certificate not trusted: {reason.verify_message}") from None
        raise _Transient("connection refused" if isinstance(reason, ConnectionRefusedError)
                         else f"no answer within {timeout:g}s" if isinstance(reason, TimeoutError)
                         else str(reason)) from None
    except TimeoutError:
        raise _Transient(f"no data within {timeout:g}s") from None
    except (ConnectionError, http.client.HTTPException) as exc:
        raise _Transient(f"connection broke: {exc.__class__.__name__} {exc}".strip()) from None
    if total is not None and out.tell() != total:
        raise _Transient(f"connection closed after {out.tell()} of {total} bytes")


def _stream(src: BinaryIO, out: BinaryIO, total: int | None, name: str) -> None:
    """Copy ``src`` to the new file ``out`` in pieces, with a progress bar."""
    with tqdm.wrapattr(src, "read", total=total, desc=name, disable=None, leave=False) as reader:
        shutil.copyfileobj(reader, out, CHUNK)


def verified(path: Path, sha256: str | None, what: str) -> Fetched:
    """The sha256 and size of the complete file ``path``; a UserError where a pinned ``sha256``
    (in any letter case) differs."""
    fetched = Fetched(sha256_of(path), path.stat().st_size)
    if sha256 and fetched.sha256 != sha256.lower():
        raise UserError(f"sha256 mismatch for {what}: expected {sha256.lower()}, got {fetched.sha256} "
                        f"({fetched.size} bytes)")
    return fetched


def sha256_of(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as src:
        return hashlib.file_digest(src, "sha256").hexdigest()
