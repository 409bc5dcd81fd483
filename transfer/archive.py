"""Safe extraction of an image-folder zip.

Every member name is checked before anything is written (no absolute paths, no ``..``, no
symlinks), and every image is decoded once on its way out, so a file that will not load at
training time is reported now, by name, instead of crashing epoch 3.
"""

from __future__ import annotations

import io
import random
import stat
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image
from tqdm import tqdm

from transfer.errors import UserError
from transfer.layout import SPLITS, is_image_name, is_litter, layout_problem


@dataclass
class ExtractReport:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    ignored: int = 0
    val_from_train: float = 0.0

    def as_metrics(self) -> dict[str, object]:
        splits = {
            split: {"images": sum(classes.values()), "per_class": dict(sorted(classes.items()))}
            for split, classes in self.counts.items()
        }
        return {
            "classes": len(self.counts.get("train", {})),
            **splits,
            "skipped_count": len(self.skipped),
            "skipped": dict(sorted(self.skipped.items())),
            "ignored_entries": self.ignored,
            "val_split_from_train": self.val_from_train,
        }


def unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    """Why extracting this member could write outside the target folder, or None."""
    name = info.filename
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "path with '..'"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link"
    return None


def _data_root(names: list[PurePosixPath]) -> PurePosixPath:
    """The folder inside the archive that holds the splits: the top, or a single top folder."""
    tops = {n.parts[0] for n in names if len(n.parts) > 1}
    if "train" in tops:
        return PurePosixPath()
    if len(tops) == 1:
        return PurePosixPath(tops.pop())
    raise UserError(
        "the archive has no train/ folder at its top or inside a single top folder "
        f"(top-level folders: {', '.join(sorted(tops)) or 'none'})"
    )


def split_off_val(files: list[PurePosixPath], fraction: float, seed: int) -> dict[PurePosixPath, PurePosixPath]:
    """Map a seeded, stratified ``fraction`` of each class's train images to ``val/``.

    Each class keeps at least one training image and, when it has two or more, gives at
    least one to validation, so the layout check passes for every class.
    """
    by_class: dict[str, list[PurePosixPath]] = {}
    for rel in files:
        if rel.parts[0] == "train" and len(rel.parts) >= 3 and is_image_name(rel.name):
            by_class.setdefault(rel.parts[1], []).append(rel)
    moved = {}
    rng = random.Random(seed)
    for label in sorted(by_class):
        members = sorted(by_class[label])
        count = min(max(round(len(members) * fraction), 1), len(members) - 1)
        for rel in rng.sample(members, count):
            moved[rel] = PurePosixPath("val", *rel.parts[1:])
    return moved


def extract_image_folder(archive: Path, dest: Path, *, val_fraction: float = 0.0, seed: int = 0) -> ExtractReport:
    """Extract ``archive``'s splits into the empty folder ``dest``; return what was kept.

    Without a ``val/`` split in the archive, ``val_fraction`` > 0 moves that fraction of
    ``train/`` there (see :func:`split_off_val`).
    """
    try:
        zf = zipfile.ZipFile(archive)
    except FileNotFoundError:
        raise UserError(f"{archive} does not exist: run the fetch stage first") from None
    except zipfile.BadZipFile:
        raise UserError(f"{archive} is not a zip archive") from None
    with zf:
        infos = zf.infolist()
        unsafe = [f"{i.filename} ({r})" for i in infos if (r := unsafe_reason(i))]
        if unsafe:
            more = f" and {len(unsafe) - 5} more" if len(unsafe) > 5 else ""
            raise UserError(f"{archive} has unsafe members, nothing extracted: {', '.join(unsafe[:5])}{more}")

        report = ExtractReport()
        members = []
        for info in infos:
            path = PurePosixPath(info.filename)
            if is_litter(path):
                report.ignored += not info.is_dir()
            else:
                members.append((path, info))
        root = _data_root([p for p, i in members if not i.is_dir()])

        files = []
        for path, info in members:
            rel = path.relative_to(root) if path.is_relative_to(root) else None
            if rel is None or not rel.parts or rel.parts[0] not in SPLITS:
                report.ignored += not info.is_dir()
            elif info.is_dir():  # class folders count even while empty, so the layout check sees them
                if len(rel.parts) == 2:
                    report.counts.setdefault(rel.parts[0], {}).setdefault(rel.parts[1], 0)
            else:
                files.append((rel, info))

        has_val = any(rel.parts[0] == "val" for rel, _ in files) or "val" in report.counts
        moved = {}
        if val_fraction > 0 and not has_val:
            moved = split_off_val([rel for rel, _ in files], val_fraction, seed)
            report.val_from_train = val_fraction
            for rel in moved.values():
                report.counts.setdefault("val", {}).setdefault(rel.parts[1], 0)

        for original, info in tqdm(files, desc="unzip", unit="file", disable=None, leave=False):
            rel = moved.get(original, original)
            shown = str(rel)
            if len(rel.parts) < 3:
                report.skipped[shown] = "not inside a class folder"
                continue
            split, label = rel.parts[0], rel.parts[1]
            report.counts.setdefault(split, {}).setdefault(label, 0)
            if not is_image_name(rel.name):
                report.skipped[shown] = f"unsupported file type '{rel.suffix or rel.name}'"
                continue
            try:
                payload = zf.read(info)
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise UserError(f"{archive} is corrupt at {info.filename}: {exc}; fetch it again") from None
            problem = decode_problem(payload)
            if problem:
                report.skipped[shown] = f"does not decode as an image ({problem})"
                continue
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(payload)
            report.counts[split][label] += 1

    problem = layout_problem(report.counts)
    if problem:
        raise UserError(f"{archive} is not an image-folder data set: {problem}")
    return report


def decode_problem(payload: bytes) -> str | None:
    """Decode the image fully; return why it failed, or None if it is a usable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(payload)) as image:
                image.load()
    except Exception as exc:  # PIL raises many types for broken files; all mean "unusable"
        return f"{exc.__class__.__name__}: {' '.join(str(exc).split())}"[:200]
    return None
