"""What an image-folder data set looks like, ``<split>/<class>/<image>``, and its listing.

The rules match torchvision's ``ImageFolder`` (the same accepted extensions, classes are the
sorted folder names), plus the checks a pipeline needs before training: train/ and val/ present
(test/ where the data set has one), the same classes in each, spelled the same, no class left
empty. Torch-free: fetch and unzip use it too.
"""

from __future__ import annotations

import itertools
import os
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath

from transfer.errors import UserError

SPLITS = ("train", "val", "test")
# The extensions torchvision.datasets.folder.IMG_EXTENSIONS accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Operating-system and notebook litter that is never data.
LITTER = {"__MACOSX", "Thumbs.db", "desktop.ini"}


def is_litter(path: PurePath) -> bool:
    """True for hidden entries (``.DS_Store``, ``.ipynb_checkpoints``) and OS litter."""
    return any(part.startswith(".") or part in LITTER for part in path.parts)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def folded(name: str) -> str:
    """``name`` as Unicode's canonical caseless matching compares names (NFC of the case fold
    of NFD): ``Ants`` and ``ants``, or ``café`` with a composed ``é`` and with ``e`` and a
    combining accent, are one name. macOS and Windows file systems take them for one file or
    folder, Linux for two, and the composed and decomposed spellings print alike."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", name).casefold())


def layout_problem(counts: Mapping[str, Mapping[str, int]], required: tuple[str, ...] = ("train", "val")) -> str | None:
    """Return why ``counts`` (split -> class -> images) is not a usable data set, or None."""
    found = "; ".join(
        f"{split}: " + (", ".join(f"{c} ({n})" for c, n in sorted(classes.items())) or "no classes")
        for split, classes in sorted(counts.items())
    ) or "nothing"
    if missing := [s for s in required if s not in counts]:
        return f"no {' or '.join(m + '/' for m in missing)} split (found {found})"
    # Class folders equal by folded(), in one split or in two: one class spelled two ways, which
    # would be two labels that print alike (or, on another file system, one folder).
    def spelled(name: str) -> str:
        splits = " ".join(f"{split}/" for split, classes in counts.items() if name in classes)
        return f"{name!a} ({' '.join(f'U+{ord(c):04X}' for c in name)}) in {splits}"

    alike = sorted(sorted({name for classes in counts.values() for name in classes}), key=folded)
    for name, other in itertools.pairwise(alike):
        if folded(name) == folded(other):
            return (f"class folders that differ only in Unicode normalisation or letter case: {spelled(name)} and "
                    f"{spelled(other)}; give the class one spelling in every split")
    if not (train := counts["train"]):  # every caller requires train/
        return f"train/ holds no class folders (found {found})"
    for split in SPLITS[1:]:
        if counts.get(split, train).keys() != train.keys():
            return f"train/ and {split}/ have different class folders (found {found})"
    if empty := sorted(f"{s}/{c}" for s, classes in counts.items() for c, n in classes.items() if not n):
        return f"class folders without images: {', '.join(empty)} (found {found})"
    if len(train) < 2:
        return f"at least 2 classes are needed to train a classifier (found {found})"
    return None


@dataclass(frozen=True)
class Split:
    """One split: sorted class names and (path, label) samples, in ``ImageFolder``'s order."""

    classes: list[str]
    samples: list[tuple[str, int]]

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.samples]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)


def image_folders(root: Path) -> dict[str, Split]:
    """``train``, ``val`` and (where there is one) ``test`` of ``root``, with train/'s classes:
    regular files with an image's extension (a named pipe would hang the decoder). Links to
    folders are not followed, class folders included: a link to a parent would list every
    image again and again (a class folder linked to its split, each class once more)."""
    found = {split: {folder.name: _images(folder) for folder in sorted((root / split).iterdir())
                     if folder.is_dir() and not folder.is_symlink()}
             for split in SPLITS if (root / split).is_dir()}
    if problem := layout_problem({split: {c: len(files) for c, files in found[split].items()} for split in found}):
        raise UserError(f"{root} is not an image-folder data set: {problem}")
    classes = sorted(found["train"])
    return {split: Split(classes, [(path, label) for label, name in enumerate(classes) for path in folders[name]])
            for split, folders in found.items()}


def _images(folder: Path) -> list[str]:
    """Its images, in subfolders too (``os.walk`` does not follow links to folders)."""
    return [os.path.join(top, name) for top, _, names in sorted(os.walk(folder))
            for name in sorted(names) if is_image_name(name) and os.path.isfile(os.path.join(top, name))]
