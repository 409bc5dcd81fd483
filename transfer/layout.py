"""What an image-folder data set looks like: ``<split>/<class>/<image>``.

The rules match torchvision's ``ImageFolder`` (the same accepted extensions, classes are the
sorted folder names), plus the checks a pipeline needs before training: train/ and val/ present
(test/ where the data set has one), the same classes in each, no class left empty.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath

SPLITS = ("train", "val", "test")
REQUIRED = ("train", "val")
# The extensions torchvision.datasets.folder.IMG_EXTENSIONS accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Operating-system and notebook litter that is never data.
LITTER = {"__MACOSX", "Thumbs.db", "desktop.ini"}


def is_litter(path: PurePosixPath) -> bool:
    """True for hidden entries (``.DS_Store``, ``.ipynb_checkpoints``) and OS litter."""
    return any(part.startswith(".") or part in LITTER for part in path.parts)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def layout_problem(counts: Mapping[str, Mapping[str, int]], required: tuple[str, ...] = REQUIRED) -> str | None:
    """Return why ``counts`` (split -> class -> images) is not a usable data set, or None."""
    found = "; ".join(
        f"{split}: " + (", ".join(f"{c} ({n})" for c, n in sorted(classes.items())) or "no classes")
        for split, classes in sorted(counts.items())
    ) or "nothing"
    missing = [s for s in required if s not in counts]
    if missing:
        return f"no {' or '.join(m + '/' for m in missing)} split (found {found})"
    names = {split: set(classes) for split, classes in counts.items()}
    if not names["train"]:
        return f"train/ holds no class folders (found {found})"
    for split in sorted(names.keys() - {"train"}, key=SPLITS.index):
        if names[split] != names["train"]:
            return f"train/ and {split}/ have different class folders (found {found})"
    empty = sorted(f"{s}/{c}" for s, classes in counts.items() for c, n in classes.items() if n == 0)
    if empty:
        return f"class folders without images: {', '.join(empty)} (found {found})"
    if len(names["train"]) < 2:
        return f"at least 2 classes are needed to train a classifier (found {found})"
    return None
