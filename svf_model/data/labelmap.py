"""Episode sources over class-id label maps (PASCAL-5i, COCO-20i).

A label map holds class ids ``1..N``, 0 for background and 255 for "ignore" (object borders in
VOC). The per-class mask of an episode is 1 where ``label == class``, 255 where ``label == 255``
and 0 elsewhere, as in PFENet/BAM.

An index (pixel count of every id in every label) is built once by reading all labels, and can be
cached as JSON (``index_cache``) because it does not depend on the fold.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .episodes import IGNORE, EpisodeSource, Item, read_label

logger = logging.getLogger(__name__)

#: PFENet/BAM keep a class in an image only if it covers at least 2 * 32 * 32 pixels.
MIN_AREA = 2 * 32 * 32


def read_list_file(path: str | os.PathLike, root: Path, image_dir: str, label_dir: str,
                   image_ext: str = ".jpg") -> list[Item]:
    """Parse a list file: ``image label`` per line (relative to ``root`` or absolute), or one stem
    per line (then ``root/image_dir/<stem><image_ext>`` and ``root/label_dir/<stem>.png``)."""
    items = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) >= 2:
            items.append(Item(root / parts[0], root / parts[1]))
        else:
            stem = Path(parts[0]).stem
            items.append(Item(root / image_dir / f"{stem}{image_ext}", root / label_dir / f"{stem}.png"))
    return items


def count_ids(label_path: Path) -> dict[int, int]:
    """``{class id: pixel count}`` of one label map (0 and 255 included)."""
    counts = np.bincount(read_label(label_path).ravel(), minlength=256)
    return {int(i): int(counts[i]) for i in np.flatnonzero(counts)}


def build_index(items: Sequence[Item], cache: str | os.PathLike | None = None,
                workers: int = 4) -> dict[str, dict[int, int]]:
    """``{label path: {id: pixels}}`` for every item, read from / written to ``cache`` if given."""
    index: dict[str, dict[int, int]] = {}
    if cache is not None and Path(cache).is_file():
        raw = json.loads(Path(cache).read_text())
        index = {k: {int(i): n for i, n in v.items()} for k, v in raw.items()}
    todo = [it.label for it in items if str(it.label) not in index]
    if todo:
        from tqdm.auto import tqdm

        with ThreadPoolExecutor(workers) as pool:
            counted = list(tqdm(pool.map(count_ids, todo), total=len(todo), desc="indexing labels",
                                disable=len(todo) < 200))
        index.update({str(p): c for p, c in zip(todo, counted, strict=True)})
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            Path(cache).write_text(json.dumps(index))
    return index


class LabelMapSource(EpisodeSource):
    """Episodes of the classes ``class_ids`` over label-map items.

    Args:
        root: dataset root (for relative paths in reports).
        items: all candidate (image, label) pairs.
        names: class names indexed by id - 1 (``names[0]`` is class id 1).
        class_ids: the ids this source samples (e.g. the 5 novel classes of a fold).
        exclude_ids: drop every image that contains any of these ids at all (BAM's training
            option: no image showing a novel class is seen during meta-training).
        min_area: an image counts for a class only if the class covers at least this many pixels.
        index_cache: JSON file caching the label index (optional).
    """

    default_mode = "image"

    def __init__(
        self,
        root: str | os.PathLike,
        items: Sequence[Item],
        names: Sequence[str],
        class_ids: Iterable[int],
        exclude_ids: Iterable[int] = (),
        min_area: int = MIN_AREA,
        index_cache: str | os.PathLike | None = None,
    ) -> None:
        self.root = Path(root)
        self.names = list(names)
        self.class_ids = sorted(class_ids)
        self.id_of = {self.names[i - 1]: i for i in self.class_ids}
        exclude = set(exclude_ids)
        index = build_index(items, index_cache)
        self._items: dict[str, list[Item]] = {self.names[i - 1]: [] for i in self.class_ids}
        self.dropped = 0
        for item in items:
            counts = index[str(item.label)]
            if exclude & set(counts):
                self.dropped += 1
                continue
            for cid in self.class_ids:
                if counts.get(cid, 0) >= min_area:
                    self._items[self.names[cid - 1]].append(item)
        logger.info("%s: %d images dropped (novel classes present), %s", type(self).__name__, self.dropped,
                    {c: len(v) for c, v in self._items.items()})

    @property
    def classes(self) -> list[str]:
        return list(self._items)

    def items(self, class_name: str) -> list[Item]:
        return self._items[class_name]

    def load_mask(self, item: Item, class_name: str) -> np.ndarray:
        label = read_label(item.label)
        mask = (label == self.id_of[class_name]).astype(np.uint8)
        mask[label == IGNORE] = IGNORE
        return mask
