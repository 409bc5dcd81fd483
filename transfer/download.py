"""Fetching a file from http(s)://, file:// or a local path, atomically and verifiably (only a
complete file whose sha256 matches is renamed into place; transient network errors are retried
with exponential back-off), or packing a local image folder into a reproducible zip.
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
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm import tqdm

from transfer.atomic import atomic_path
from transfer.errors import UserError
from transfer.layout import SPLITS, is_image_name, is_litter, layout_problem

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
    file by hand) ends every error."""
    dest = Path(dest)
    suffix = f"; {hint}" if hint else ""
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
    return Path(url).expanduser()


def _copy(url: str, out: BinaryIO, timeout: float) -> Fetched:
    path = local_path(url)
    if path is None:
        return _copy_http(url, out, timeout)
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a named pipe or device would block or never end
            raise UserError(f"{path} is not a regular file")
        with path.open("rb") as src:
            return _stream(src, out, path.stat().st_size, path.name)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a file") from None
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


def zip_folder(src: Path, dest: Path, sha256: str | None = None) -> Fetched:
    """Store the image-folder data set in the folder ``src`` (or its one subfolder) as a zip at
    ``dest``: only its images, after checking the layout, so that a folder named by mistake
    never reaches DVC's cache or a remote. Sorted members with a fixed timestamp give the same
    bytes for the same images; they are stored, not deflated (images are compressed)."""
    def folders(parent: Path) -> list[Path]:
        return sorted(p for p in parent.glob("*") if p.is_dir() and not is_litter(PurePosixPath(p.name)))

    subfolders = folders(src)
    root = subfolders[0] if not (src / "train").is_dir() and len(subfolders) == 1 else src
    counts: dict[str, dict[str, int]] = {}
    files: list[Path] = []
    for split in SPLITS:
        for folder in folders(root / split):
            images = sorted(p for p in folder.rglob("*") if is_image_name(p.name) and p.is_file() and not p.is_symlink()
                            and not is_litter(PurePosixPath(p.relative_to(folder).as_posix())))
            counts.setdefault(split, {})[folder.name] = len(images)
            files.extend(images)
    problem = layout_problem(counts)
    if problem:
        raise UserError(f"{src} is not an image-folder data set: {problem}; nothing was packed (data.url must name "
                        "a folder of train/ and val/ class folders, or a zip)")
    with atomic_path(dest) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for path in tqdm(files, desc=f"zip {src.name}", unit="file", disable=None, leave=False):
                info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                zf.writestr(info, path.read_bytes())
        packed = Fetched(sha256_of(tmp), tmp.stat().st_size)
        if sha256 and packed.sha256 != sha256.lower():
            raise UserError(f"sha256 mismatch for the zip of {src}: expected {sha256.lower()}, got "
                            f"{packed.sha256}; update data.sha256 if the folder changed on purpose")
    return packed
