"""Safe extraction of an image-folder zip: member names and unpacked sizes are checked before
anything is written (no absolute paths, ``..`` or symlinks; ``runtime.max_unpacked_mb`` refuses a
zip bomb from its headers), and every image is decoded on its way out, with the decoder every
later stage uses, so a file that would not load in training is reported now, by name.
"""

from __future__ import annotations

import hashlib
import random
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from tqdm import tqdm

from transfer.errors import UserError
from transfer.imagefolder import SPLITS, is_image_name, is_litter, layout_problem
from transfer.images import ImageTooLarge, decode

#: Members are copied out in pieces of this size, never read whole into memory.
CHUNK_BYTES = 1 << 20


@dataclass
class ExtractReport:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    ignored: int = 0
    val_from_train: float = 0.0
    test_from_val: float = 0.0
    train_per_class: int | str = "all"
    left_out_of_train: int = 0  #: training images beyond train_per_class
    digests: dict[str, str] = field(default_factory=dict)  #: image -> sha256 of its bytes

    def duplicates(self) -> list[list[str]]:
        """Images whose bytes are equal and that are in different splits: a leak, which makes
        validation and test scores optimistic (the same image trained on and scored)."""
        by_digest: dict[str, list[str]] = {}
        for name, digest in sorted(self.digests.items()):
            by_digest.setdefault(digest, []).append(name)
        return [names for names in by_digest.values() if len({PurePosixPath(n).parts[0] for n in names}) > 1]

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
            "duplicates_across_splits": self.duplicates(),
            "ignored_entries": self.ignored,
            "val_split_from_train": self.val_from_train,
            "test_split_from_val": self.test_from_val,
            "train_per_class": self.train_per_class,
            "left_out_of_train": self.left_out_of_train,
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


def split_off(files: list[PurePosixPath], fraction: float, seed: int, source: str = "train",
              target: str = "val") -> dict[PurePosixPath, PurePosixPath]:
    """Map a seeded, stratified ``fraction`` of each class's ``source`` images to ``target``.

    Each class keeps at least one image and gives at least one, so the layout check passes
    for every class; a class of a single image cannot be split, and is refused by name.
    """
    by_class: dict[str, list[PurePosixPath]] = {}
    for rel in files:
        if rel.parts[0] == source and len(rel.parts) >= 3 and is_image_name(rel.name):
            by_class.setdefault(rel.parts[1], []).append(rel)
    moved = {}
    rng = random.Random(seed)
    key = "data.val_fraction" if target == "val" else "data.test_fraction"
    for label in sorted(by_class):
        members = sorted(by_class[label])
        if len(members) < 2:
            raise UserError(f"{key}: class {label} has {len(members)} image in {source}/, which cannot be split into "
                            f"{source}/ and {target}/; add images or set {key}: 0")
        count = min(max(round(len(members) * fraction), 1), len(members) - 1)
        for rel in rng.sample(members, count):
            moved[rel] = PurePosixPath(target, *rel.parts[1:])
    return moved


def extract_image_folder(archive: Path, dest: Path, *, max_unpacked_mb: int, val_fraction: float = 0.0,
                         test_fraction: float = 0.0, seed: int = 0, train_per_class: int | str = "all",
                         ) -> ExtractReport:
    """Extract ``archive``'s splits into the empty folder ``dest``; return what was kept. A
    val/ or test/ split the archive lacks is split off train/ or val/ where the fractions ask
    (:func:`split_off`); then train/ keeps ``train_per_class`` images per class (:func:`subset`)."""
    try:
        zf = zipfile.ZipFile(archive)
    except FileNotFoundError:
        raise UserError(f"{archive} does not exist: run the fetch stage first") from None
    except zipfile.BadZipFile:
        raise UserError(f"{archive} is not a zip archive") from None
    with zf:
        unsafe = [f"{i.filename} ({r})" for i in zf.infolist() if (r := unsafe_reason(i))]
        if unsafe:
            more = f" and {len(unsafe) - 5} more" if len(unsafe) > 5 else ""
            raise UserError(f"{archive} has unsafe members, nothing extracted: {', '.join(unsafe[:5])}{more}")
        report = ExtractReport()
        files = _split_files(zf.infolist(), report)
        moved = split_splits([rel for rel, _ in files], report, val_fraction, test_fraction, seed)
        images = _images_to_extract(files, moved, report)
        check_sizes(archive, [info for _, info in images], max_unpacked_mb)
        for rel, info in tqdm(images, desc="unzip", unit="image", disable=None, leave=False):
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = copy_member(zf, info, target, archive)
            problem = decode_problem(target)
            if problem:
                _remove(target, up_to=dest)
                report.skipped[str(rel)] = problem.replace(str(target), str(rel))  # not the temporary folder's name
            else:
                report.counts[rel.parts[0]][rel.parts[1]] += 1
                report.digests[str(rel)] = digest
    problem = layout_problem(report.counts)
    if problem:
        raise UserError(f"{archive} is not an image-folder data set: {problem}")
    if train_per_class != "all":
        subset(dest, report, int(train_per_class), seed)
    return report


def subset(dest: Path, report: ExtractReport, per_class: int, seed: int) -> None:
    """Keep ``per_class`` training images of each class (all of a smaller class): the first
    of a seeded shuffle of its usable images, so that a larger subset holds every smaller one
    (the 10 images are among the 20) and validation and test images never change with it."""
    report.train_per_class = per_class
    for label in sorted(report.counts["train"]):
        images = sorted(n for n in report.digests if PurePosixPath(n).parts[:2] == ("train", label))
        random.Random(f"train_per_class:{seed}:{label}").shuffle(images)
        for name in images[per_class:]:
            _remove(dest / name, up_to=dest)
            del report.digests[name]
        report.counts["train"][label] = min(per_class, len(images))
        report.left_out_of_train += max(0, len(images) - per_class)


def _split_files(infos: list[zipfile.ZipInfo], report: ExtractReport) -> list[tuple[PurePosixPath, zipfile.ZipInfo]]:
    """The files inside the archive's splits, by path relative to the folder holding them;
    class folders are counted even while empty, so that the layout check sees them."""
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
        elif info.is_dir():
            if len(rel.parts) == 2:
                report.counts.setdefault(rel.parts[0], {}).setdefault(rel.parts[1], 0)
        else:
            files.append((rel, info))
    return files


def split_splits(files: list[PurePosixPath], report: ExtractReport, val_fraction: float, test_fraction: float,
                 seed: int) -> dict[PurePosixPath, PurePosixPath]:
    """Where each file goes: a val/ split off train/ and a test/ split off val/, where the
    fractions ask for them and the archive has none."""
    moved: dict[PurePosixPath, PurePosixPath] = {}
    for source, target, fraction in (("train", "val", val_fraction), ("val", "test", test_fraction)):
        present = {rel.parts[0] for rel in (moved.get(f, f) for f in files)} | set(report.counts)
        if fraction <= 0 or target in present:
            continue
        now = {moved.get(f, f): f for f in files}
        for rel, new in split_off(list(now), fraction, seed, source, target).items():
            moved[now[rel]] = new
            report.counts.setdefault(target, {}).setdefault(new.parts[1], 0)
        setattr(report, f"{target}_from_{source}", fraction)
    return moved


def _images_to_extract(files: list[tuple[PurePosixPath, zipfile.ZipInfo]],
                       moved: dict[PurePosixPath, PurePosixPath],
                       report: ExtractReport) -> list[tuple[PurePosixPath, zipfile.ZipInfo]]:
    """The members to extract, each with its path in the output (``moved`` applied); files
    outside a class folder or of another type than an image are recorded as skipped."""
    images = []
    for original, info in files:
        rel = moved.get(original, original)
        if len(rel.parts) < 3:
            report.skipped[str(rel)] = "not inside a class folder"
            continue
        report.counts.setdefault(rel.parts[0], {}).setdefault(rel.parts[1], 0)
        if not is_image_name(rel.name):
            report.skipped[str(rel)] = f"unsupported file type '{rel.suffix or rel.name}'"
            continue
        images.append((rel, info))
    return images


def _remove(path: Path, up_to: Path) -> None:
    """Delete a file left out, and the folders it leaves empty below ``up_to``, so the
    output holds only what the report counts (as before, when only good images were
    written)."""
    path.unlink()
    for parent in path.parents:
        if parent == up_to or any(parent.iterdir()):
            break
        parent.rmdir()


def _megabytes(size: int) -> str:
    return f"{size / 2**20:,.1f} MB"


def check_sizes(archive: Path, infos: list[zipfile.ZipInfo], max_unpacked_mb: int) -> None:
    """Refuse, before reading any member, members whose declared sizes add up to more than
    ``max_unpacked_mb`` (naming the largest where it alone is over). ``zipfile`` stops at a
    member's declared size, so a header that understates it gives a bad CRC, not more data."""
    cap = max_unpacked_mb * 2**20
    largest = max(infos, key=lambda info: info.file_size, default=None)
    hint = ("nothing extracted (a zip bomb? if the data set really is that large, raise "
            "runtime.max_unpacked_mb in params.yaml)")
    if largest is not None and largest.file_size > cap:
        raise UserError(f"{archive}: {largest.filename} unpacks to {_megabytes(largest.file_size)}, more than "
                        f"runtime.max_unpacked_mb ({max_unpacked_mb} MB); {hint}")
    total = sum(info.file_size for info in infos)
    if total > cap:
        raise UserError(f"{archive}: its {len(infos)} images unpack to {_megabytes(total)}, more than "
                        f"runtime.max_unpacked_mb ({max_unpacked_mb} MB); {hint}")


def copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, archive: Path) -> str:
    """Copy member ``info`` to ``target`` in pieces, never whole in memory; return its sha256."""
    digest = hashlib.sha256()
    try:
        with zf.open(info) as member, target.open("wb") as out:
            while chunk := member.read(CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise UserError(f"{archive} is corrupt at {info.filename}: {exc}; fetch it again") from None
    return digest.hexdigest()


def decode_problem(source: str | Path | IO[bytes]) -> str | None:
    """Decode the image fully, as every later stage will (:func:`transfer.images.decode`);
    return why it is left out, or None if it is a usable image."""
    try:
        decode(source)
    except ImageTooLarge as exc:
        return str(exc)
    except Exception as exc:  # PIL raises many types for broken files; all mean "unusable"
        return f"does not decode as an image ({exc.__class__.__name__}: {' '.join(str(exc).split())})"[:240]
    return None
