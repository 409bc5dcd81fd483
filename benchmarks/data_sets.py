"""The image sets the benchmark trains on: the real archive, a cut-down subset of it for smoke
runs, and a deterministic scaled-up copy of it for the "does time per image stay flat" check.

Why generate instead of download: nothing can be downloaded where the benchmark runs, and
the scaling question is about how the stages behave with many *real-looking* JPEGs (decode
cost, pixel sizes, the decoded-image cache filling up), so every generated image is a real
image of the archive re-encoded with small, seeded changes (mirror, crop, colour), at about
its original pixel size and still a JPEG. The same arguments always give the same files.
"""

from __future__ import annotations

import io
import random
import zipfile
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath

from PIL import Image, ImageEnhance

# The images the project's unzip stage keeps, which are those torchvision's ImageFolder (the
# reference loop) reads, less the real archive's ``imageNotFound.gif``: both sides see the same.
from transfer.imagefolder import SPLITS, is_image_name

TOP = "hymenoptera_data"
#: Fixed timestamps so the generated archives are byte-identical from run to run.
ZIP_TIME = (2020, 1, 1, 0, 0, 0)


def _split_class_name(member: str) -> tuple[str, str, str] | None:
    """``(split, class, file name)`` of an image member laid out ``[top/]split/class/file``."""
    parts = PurePosixPath(member).parts
    if any(part.startswith(".") or part == "__MACOSX" for part in parts):
        return None
    if not is_image_name(member):
        return None
    for i, part in enumerate(parts):
        if part in SPLITS and len(parts) == i + 3:
            return part, parts[i + 1], parts[i + 2]
    return None


def image_members(archive: Path) -> dict[tuple[str, str], list[str]]:
    """The archive's image members by (split, class), each list sorted by name."""
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            found = _split_class_name(name)
            if found:
                grouped[found[0], found[1]].append(name)
    return {key: sorted(names) for key, names in sorted(grouped.items())}


def _write_member(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_STORED  # JPEGs do not compress; storing keeps unzip fast
    zf.writestr(info, data)


def subset_zip(source: Path, dest: Path, per_class: int) -> Path:
    """``dest``: the first ``per_class`` images (by name) of every class of both splits of
    ``source``, laid out like the real archive. For smoke runs that must finish in minutes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(dest, "w") as out:
        for (split, cls), names in image_members(source).items():
            for name in names[:per_class]:
                _write_member(out, f"{TOP}/{split}/{cls}/{PurePosixPath(name).name}", src.read(name))
    return dest


def extract(archive: Path, dest: Path) -> Path:
    """Unpack ``archive``'s images (only them) into ``dest/<split>/<class>/`` and return ``dest``:
    the DATA_DIR the reference loop takes."""
    with zipfile.ZipFile(archive) as zf:
        for (split, cls), names in image_members(archive).items():
            folder = dest / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                (folder / PurePosixPath(name).name).write_bytes(zf.read(name))
    return dest


def count_images(folder: Path) -> dict[str, int]:
    """Images per split under ``folder/<split>/<class>/``, as ImageFolder would count them."""
    return {split: sum(1 for p in (folder / split).glob("*/*")
                       if p.is_file() and is_image_name(p.name) and not p.name.startswith("."))
            for split in SPLITS}


def variant(data: bytes, key: str) -> bytes:
    """A re-encoded JPEG of the image ``data``: seeded by ``key``, mirrored half the time,
    cropped to 80-100% of its area and resized back to the original pixel size, brightness,
    contrast and saturation each within 15%, JPEG quality 85-95."""
    rng = random.Random(key)
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    keep = rng.uniform(0.8, 1.0) ** 0.5  # of each side
    crop_w, crop_h = max(1, round(width * keep)), max(1, round(height * keep))
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    image = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BILINEAR)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(rng.uniform(0.85, 1.15))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=rng.randint(85, 95))
    return out.getvalue()


def _variants(job: tuple[str, bytes, int]) -> list[tuple[str, bytes]]:
    """``(member name, bytes)`` of the original (unchanged) and ``copies - 1`` variants."""
    name, data, copies = job
    path = PurePosixPath(name)
    out = [(name, data)]
    out += [(str(path.with_name(f"{path.stem}_v{k:02d}.jpg")), variant(data, f"{name}:{k}")) for k in range(1, copies)]
    return out


def scaled_zip(source: Path, dest: Path, factor: int, workers: int = 1) -> Path:
    """``dest``: every image of ``source`` (both splits) plus ``factor - 1`` variants of it
    (:func:`variant`), so ``factor`` times as many images, same classes, same layout.
    ``workers`` processes encode in parallel; the output does not depend on their number."""
    if factor < 1:
        raise ValueError(f"scale factor must be at least 1, got {factor}")
    dest.parent.mkdir(parents=True, exist_ok=True)

    def jobs(src: zipfile.ZipFile) -> Iterable[tuple[str, bytes, int]]:
        for (split, cls), names in image_members(source).items():
            for name in names:
                yield f"{TOP}/{split}/{cls}/{PurePosixPath(name).name}", src.read(name), factor

    with zipfile.ZipFile(source) as src, zipfile.ZipFile(dest, "w") as out:
        if workers <= 1:
            results: Iterable[list[tuple[str, bytes]]] = map(_variants, jobs(src))
            for members in results:
                for name, data in members:
                    _write_member(out, name, data)
        else:
            with ProcessPoolExecutor(workers) as pool:
                for members in pool.map(_variants, jobs(src), chunksize=4):
                    for name, data in members:
                        _write_member(out, name, data)
    return dest
