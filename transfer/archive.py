"""Safe extraction of an image-folder zip: member names and unpacked sizes are checked before
anything is written (no absolute paths, ``..``, symlinks or names too long to write; no two
members that would be one file, :func:`clashes`; ``runtime.max_unpacked_mb`` refuses a zip
bomb from its headers), and every image is decoded on its way out, with the decoder every later
stage uses, so a file that would not load in training is reported now, by name.
"""

from __future__ import annotations

import itertools
import random
import shutil
import stat
import zipfile
import zlib
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from transfer.download import sha256_of
from transfer.errors import UserError, one_line
from transfer.imagefolder import SPLITS, folded, is_image_name, is_litter, layout_problem
from transfer.images import ImageTooLarge, decode


def unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    """Why extracting this member could write outside the target folder, or could not be
    written (a name past the usual limits of 255 bytes a part; 1,000 in all keeps folders few
    enough to create), or None."""
    name = info.filename
    if not name:
        return "empty name"
    if name.startswith(("/", "\\")) or name[1:2] == ":":
        return "absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "path with '..'"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link"
    if len(name.encode()) > 1000 or any(len(part.encode()) > 255 for part in parts):
        return "name too long"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):  # a line break in a class name, a path, a message
        return "control character in name"
    return None


def clashes(infos: list[zipfile.ZipInfo]) -> list[str]:
    """Files of the archive that would be one file, or a file where another needs a folder:
    the same name twice, or names equal by :func:`transfer.imagefolder.folded` (``a.jpg`` and
    ``A.jpg``: one file on macOS and Windows). Which copy survived would depend on the order
    of the members or on the file system. Sorted by their folded parts, a name is followed by
    the names it clashes with."""
    keyed = sorted((tuple(folded(str(PurePosixPath(info.filename))).split("/")), info.filename)
                   for info in infos if not info.filename.endswith("/"))
    return [f"{first!a} and {then!a}" for (key, first), (later, then) in itertools.pairwise(keyed)
            if later[:len(key)] == key]


def _refuse(archive: Path, what: str, members: list[str]) -> None:
    if members:
        more = f" and {len(members) - 5} more" if len(members) > 5 else ""
        shown = [m if m.isprintable() else repr(m) for m in members[:5]]  # what cannot be seen, escaped
        raise UserError(f"{archive} has {what}, nothing extracted: {', '.join(shown)}{more}")


def split_off(files: list[PurePosixPath], fraction: float, seed: int, source: str = "train",
              target: str = "val") -> dict[PurePosixPath, PurePosixPath]:
    """Map a seeded, stratified ``fraction`` of each class's ``source`` images to ``target``.

    Each class keeps at least one image and gives at least one, so the layout check passes
    for every class; a class of a single image cannot be split, and is refused by name.
    """
    by_class: defaultdict[str, list[PurePosixPath]] = defaultdict(list)
    for rel in sorted(files):
        if rel.parts[0] == source and len(rel.parts) >= 3 and is_image_name(rel.name):
            by_class[rel.parts[1]].append(rel)
    moved = {}
    rng = random.Random(seed)
    for label, members in sorted(by_class.items()):
        if len(members) < 2:
            raise UserError(f"data.{target}_fraction: class {label} has 1 image in {source}/, which cannot be split "
                            f"into {source}/ and {target}/; add images or set data.{target}_fraction: 0")
        count = min(max(round(len(members) * fraction), 1), len(members) - 1)
        for rel in rng.sample(members, count):
            moved[rel] = PurePosixPath(target, rel.relative_to(source))
    return moved


def extract_image_folder(archive: Path, dest: Path, *, max_unpacked_mb: int, val_fraction: float,
                         test_fraction: float, seed: int, train_per_class: int | str) -> dict[str, Any]:
    """Extract ``archive``'s splits into the empty folder ``dest``; return the report of what
    was kept (reports/data.json). A val/ or test/ split the archive lacks is split off train/
    or val/ where the fractions ask (:func:`split_off`); then train/ keeps ``train_per_class``
    images per class: the first of a seeded shuffle of each class's usable images, so that a
    larger subset holds every smaller one (the 10 images are among the 20) and validation and
    test images never change with it."""
    try:
        zf = zipfile.ZipFile(archive)
    except FileNotFoundError:
        raise UserError(f"{archive} does not exist: run the fetch stage first") from None
    except (zipfile.BadZipFile, UnicodeDecodeError):  # the latter: names flagged UTF-8 that are not
        raise UserError(f"{archive} is not a zip archive") from None
    with zf:
        infos = zf.infolist()
        _refuse(archive, "unsafe members", [f"{i.filename} ({r})" for i in infos if (r := unsafe_reason(i))])
        _refuse(archive, "members that would overwrite each other (names equal after Unicode normalisation and case "
                "folding, or a file where a folder must be)", clashes(infos))
        members = [(path, info) for info in infos if not is_litter(path := PurePosixPath(info.filename))]
        # The folder holding the splits: the top, or a single top folder.
        tops = {path.parts[0] for path, info in members if path.parent.name and not info.is_dir()}
        if "train" not in tops and len(tops) != 1:
            raise UserError("the archive has no train/ folder at its top or inside a single top folder "
                            f"(top-level folders: {', '.join(sorted(tops)) or 'none'})")
        root = PurePosixPath() if "train" in tops else PurePosixPath(*tops)
        # The files in the splits, by path below the root; class folders count even while
        # empty, so that the layout check sees them.
        # split -> class -> usable images; "+= 0" lists a class that has none (yet).
        counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        files: dict[PurePosixPath, zipfile.ZipInfo] = {}
        for path, info in members:
            if root not in path.parents:  # not below the root, or the root itself
                continue
            rel = path.relative_to(root)
            if rel.parts[0] not in SPLITS:
                continue
            if not info.is_dir():
                files[rel] = info
            elif len(rel.parts) == 2:
                counts[rel.parts[0]][rel.parts[1]] += 0
        ignored = sum(not info.is_dir() for info in infos) - len(files)
        # A val/ split off train/ and a test/ split off val/, where asked and the archive has none.
        fractions = {"val_split_from_train": 0.0, "test_split_from_val": 0.0}
        for source, target, fraction in (("train", "val", val_fraction), ("val", "test", test_fraction)):
            if fraction > 0 and target not in {rel.parts[0] for rel in files} | set(counts):
                moves = split_off(list(files), fraction, seed, source, target)
                files = {moves.get(rel, rel): info for rel, info in files.items()}
                fractions[f"{target}_split_from_{source}"] = fraction
        skipped: dict[str, str] = {}
        images = []
        for rel, info in files.items():
            if len(rel.parts) < 3:
                skipped[str(rel)] = "not inside a class folder"
                continue
            counts[rel.parts[0]][rel.parts[1]] += 0
            if is_image_name(rel.name):
                images.append((rel, info))
            else:
                skipped[str(rel)] = f"unsupported file type '{rel.suffix or rel.name}'"
        # Refused from the headers before any member is read (naming the largest where it alone
        # is over): zipfile stops at a member's declared size, so a header that understates it
        # gives a bad CRC, not more data.
        cap = max_unpacked_mb * 2**20
        total = sum(info.file_size for _, info in images)
        if total > cap:  # and so is the largest, if it alone is
            largest = max((info for _, info in images), key=lambda info: info.file_size)
            what = (f"{largest.filename} unpacks to {largest.file_size / 2**20:,.1f} MB" if largest.file_size > cap
                    else f"its {len(images)} images unpack to {total / 2**20:,.1f} MB")
            raise UserError(f"{archive}: {what}, more than runtime.max_unpacked_mb ({max_unpacked_mb} MB); nothing "
                            "extracted (a zip bomb? if the data set really is that large, raise "
                            "runtime.max_unpacked_mb in params.yaml)")
        digests: dict[str, str] = {}  # image -> sha256 of its bytes
        for rel, info in tqdm(images, desc="unzip", unit="image", disable=None, leave=False):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as member, target.open("wb") as out:
                    shutil.copyfileobj(member, out)  # in pieces, never whole in memory
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise UserError(f"{archive} is corrupt at {info.filename}: {exc}; fetch it again") from None
            except (RuntimeError, NotImplementedError) as exc:  # a password; deflate64, say
                raise UserError(f"{archive} cannot be extracted at {info.filename}: {exc}; zip the data set again "
                                "without a password, with deflate compression") from None
            try:  # decoded fully, as every later stage will
                decode(target)
            except ImageTooLarge as exc:
                problem = str(exc)
            except Exception as exc:  # PIL raises many types for broken files; all mean "unusable"
                problem = f"does not decode as an image ({exc.__class__.__name__}: {one_line(exc)})"[:240]
            else:
                counts[rel.parts[0]][rel.parts[1]] += 1
                digests[str(rel)] = sha256_of(target)
                continue
            target.unlink()
            skipped[str(rel)] = problem.replace(str(target), str(rel))  # not the temporary folder's name
    if problem := layout_problem(counts):
        raise UserError(f"{archive} is not an image-folder data set: {problem}")
    left_out = 0
    if train_per_class != "all":
        for label in counts["train"]:
            names = sorted(name for name in digests if name.startswith(f"train/{label}/"))
            random.Random(f"train_per_class:{seed}:{label}").shuffle(names)
            for name in names[int(train_per_class):]:
                (dest / name).unlink()
                del digests[name]
                counts["train"][label] -= 1
                left_out += 1
    # The folders that what was left out leaves empty, deepest first, so the output holds only
    # what the report counts (as before, when only good images were written).
    for folder in sorted(dest.rglob("*"), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    # Images whose bytes are equal and that are in different splits: a leak, which makes
    # validation and test scores optimistic (the same image trained on and scored).
    by_digest: defaultdict[str, list[str]] = defaultdict(list)
    for name in sorted(digests):
        by_digest[digests[name]].append(name)
    leaks = [names for names in by_digest.values() if len({name.split("/")[0] for name in names}) > 1]
    return {
        "classes": len(counts["train"]),
        **{split: {"images": classes.total(), "per_class": classes} for split, classes in counts.items()},
        "skipped_count": len(skipped),
        "skipped": skipped,
        "duplicates_across_splits": leaks,
        "ignored_entries": ignored,
        **fractions,
        "train_per_class": train_per_class,
        "left_out_of_train": left_out,
    }

