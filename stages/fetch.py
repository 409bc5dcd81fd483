"""Stage ``fetch``: the data set's zip from ``data.url`` (an http(s) or file URL, a path, or a
local image folder, which is packed), with the URL, sha256 and size of what arrived in the
report, so that a change upstream shows (``data.sha256`` pins it).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from tqdm import tqdm

from transfer.atomic import atomic_path, write_json
from transfer.download import Fetched, fetch, local_path, verified
from transfer.errors import UserError
from transfer.imagefolder import SPLITS, is_image_name, is_litter, layout_problem
from transfer.params import load_params
from transfer.stage import run_stage, stage_parser


def _is_zip(path: Path) -> str | None:
    if zipfile.is_zipfile(path):
        return None
    with path.open("rb") as payload:
        head = payload.read(256).lstrip().lower()
    kind = "an HTML page" if head.startswith((b"<!doctype html", b"<html")) else "not a zip archive"
    return f"the download is {kind} ({path.stat().st_size} bytes), not the data set's zip"


def zip_folder(src: Path, dest: Path, sha256: str | None) -> Fetched:
    """Store the image-folder data set in the folder ``src`` (or its one subfolder) as a zip at
    ``dest``: only its images, after checking the layout, so that a folder named by mistake
    never reaches DVC's cache or a remote. Links are not followed (a link to a folder could
    loop, a link to a file could pack one from outside). Sorted members with a fixed
    timestamp (ZipInfo's default) give the same bytes for the same images; they are stored,
    not deflated (images are compressed)."""
    def folders(parent: Path) -> list[Path]:
        return sorted(p for p in parent.glob("*")
                      if p.is_dir() and not p.is_symlink() and not is_litter(Path(p.name)))

    subfolders = folders(src)
    root = subfolders[0] if not (src / "train").is_dir() and len(subfolders) == 1 else src
    counts: dict[str, dict[str, int]] = {}
    files: list[Path] = []
    for split in SPLITS:
        for folder in folders(root / split):
            images = sorted(p for p in folder.rglob("*") if is_image_name(p.name) and p.is_file() and not p.is_symlink()
                            and not is_litter(p.relative_to(folder)))
            counts.setdefault(split, {})[folder.name] = len(images)
            files.extend(images)
    if problem := layout_problem(counts, required=("train",)):  # unzip may split val/ off train/
        raise UserError(f"{src} is not an image-folder data set: {problem}; nothing was packed (data.url must name "
                        "a folder of train/ (and val/) class folders, or a zip)")
    with atomic_path(dest) as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            for path in tqdm(files, desc=f"zip {src.name}", unit="file", disable=None, leave=False):
                info = zipfile.ZipInfo(path.relative_to(root).as_posix())
                info.external_attr = 0o644 << 16
                zf.writestr(info, path.read_bytes())
        return verified(tmp, sha256, f"the zip of {src}")


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", default="data/hymenoptera_data.zip", help="where the zip goes")
    parser.add_argument("--report", default="reports/fetch.json", help="URL, digest and size seen")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    data = params.data
    out = Path(args.out)
    source = local_path(data.url)
    if source and source.is_dir():  # a local image folder: pack it as the zip
        fetched = zip_folder(source, out, data.sha256)
    else:
        fetched = fetch(data.url, out, sha256=data.sha256, retries=params.runtime.download_retries,
                        timeout=params.runtime.download_timeout, check=_is_zip,
                        hint=f"download {data.url} by hand and set data.url in {args.params} to the file's path")
    write_json(args.report, {"url": data.url, "sha256": fetched.sha256, "bytes": fetched.size,
                             "sha256_pinned": data.sha256 is not None})
    print(f"fetched {data.url} -> {out} ({fetched.size} bytes, sha256 {fetched.sha256})")


if __name__ == "__main__":
    run_stage(main)
