"""Stage ``fetch``: the data set's zip from ``data.url`` (an http(s) or file URL, a path, or a
local image folder, which is packed), with the URL, sha256 and size of what arrived in the
report, so that a change upstream shows (``data.sha256`` pins it).
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

from transfer.atomic import write_json
from transfer.download import fetch, local_path, zip_folder
from transfer.errors import run_stage
from transfer.params import load_params


def _is_zip(path: Path) -> str | None:
    if zipfile.is_zipfile(path):
        return None
    with path.open("rb") as payload:
        head = payload.read(256).lstrip().lower()
    kind = "an HTML page" if head.startswith((b"<!doctype html", b"<html")) else "not a zip archive"
    return f"the download is {kind} ({path.stat().st_size} bytes), not the data set's zip"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/hymenoptera_data.zip", help="where the zip goes")
    parser.add_argument("--report", default="reports/fetch.json", help="URL, digest and size seen")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    data, net = params.data, params.runtime
    out = Path(args.out)
    source = local_path(data.url)
    if source is not None and source.is_dir():  # a local image folder: pack it as the zip
        fetched = zip_folder(source, out, sha256=data.sha256)
    else:
        hint = f"download {data.url} by hand and set data.url in {args.params} to the file's path"
        fetched = fetch(
            data.url, out, sha256=data.sha256, retries=net.download_retries, timeout=net.download_timeout,
            check=_is_zip, hint=hint,
        )
    write_json(args.report, {"url": data.url, "sha256": fetched.sha256, "bytes": fetched.size,
                             "sha256_pinned": data.sha256 is not None})
    print(f"fetched {data.url} -> {out} ({fetched.size} bytes, sha256 {fetched.sha256})")


if __name__ == "__main__":
    run_stage(main)
