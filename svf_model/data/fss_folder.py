"""FSS-1000-layout folders: ``<root>/<class>/<stem>.jpg`` with the mask ``<stem>.png`` beside it.

Masks hold one class each (nonzero = the class; 255 would be foreground here, not ignore). The class
list comes from ``<root>/classes.json`` (a list, or a dict whose keys are the classes) when present,
else from the sub-folders. ``fss-dev`` in ``../shared/data`` has this layout.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .episodes import EpisodeSource, Item, read_label

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_classes(root: str | os.PathLike) -> list[str]:
    """The classes of a folder: ``classes.json`` order if present, else sorted sub-folders."""
    root = Path(root)
    index = root / "classes.json"
    if index.is_file():
        data = json.loads(index.read_text())
        names = list(data) if isinstance(data, (list, dict)) else None
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{index} must hold a list of class names or a dict keyed by class name")
        return names
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_classes(
    classes: Sequence[str], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Seeded hold-out: ``(train, val)`` with ``round(val_fraction * n)`` (at least 1) val classes.

    Both lists keep the order of ``classes``.
    """
    if not 0 < val_fraction < 1:
        raise ValueError("val_fraction must be in (0, 1)")
    n_val = max(1, round(val_fraction * len(classes)))
    held = set(random.Random(seed).sample(list(classes), n_val))
    return [c for c in classes if c not in held], [c for c in classes if c in held]


class FSSFolder(EpisodeSource):
    """Episode source over an FSS-1000-layout folder.

    Args:
        root: the folder.
        classes: restrict to these classes (default: all of :func:`list_classes`).
    """

    default_mode = "balanced"

    def __init__(self, root: str | os.PathLike, classes: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder not found: {self.root}")
        available = list_classes(self.root)
        if classes is not None:
            unknown = sorted(set(classes) - set(available))
            if unknown:
                raise KeyError(f"classes not in {self.root}: {unknown}")
        self._classes = list(classes) if classes is not None else available
        self._items: dict[str, list[Item]] = {}

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    def items(self, class_name: str) -> list[Item]:
        if class_name not in self._items:
            folder = self.root / class_name
            if not folder.is_dir():
                raise FileNotFoundError(f"class folder not found: {folder}")
            pairs = []
            for mask in sorted(folder.glob("*.png")):
                image = next((mask.with_suffix(s) for s in IMAGE_SUFFIXES if s != ".png"
                              and mask.with_suffix(s).is_file()), None)
                if image is not None:
                    pairs.append(Item(image, mask))
            self._items[class_name] = pairs
        return self._items[class_name]

    def load_mask(self, item: Item, class_name: str) -> np.ndarray:
        label = read_label(item.label)
        return (label > 127).astype(np.uint8) if label.max() > 1 else (label > 0).astype(np.uint8)
