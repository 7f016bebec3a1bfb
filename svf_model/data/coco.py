"""COCO-20i: the 80 COCO categories in 4 folds of 20 novel classes.

Layout (HSNet's ``COCO2014``; ``<root>/COCO2014`` is used when present)::

    <root>/train2014/<name>.jpg, <root>/val2014/<name>.jpg
    <root>/annotations/train2014/<name>.png, <root>/annotations/val2014/<name>.png
        class index 1..80 in the order of COCO_CLASSES (not the sparse COCO ids 1..90), 0 background

or a ``list_file`` with ``image label`` per line relative to ``root`` (PFENet/BAM's lists).

Two class splits exist in the literature (ids 1-based):

* ``"interleaved"``: fold ``i`` = ``{4k + i + 1 : k = 0..19}``. PFENet/BAM with
  ``use_split_coco: True`` ("SPLIT COCO", from FWB), HSNet (``fold + 4 * v`` 0-based). This is the
  split of most recent results (PFENet, BAM, HSNet, SVF).
* ``"contiguous"``: fold ``i`` = ``20i+1 .. 20i+20``. PANet's split; PFENet/BAM with
  ``use_split_coco: False``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .episodes import Item
from .labelmap import MIN_AREA, LabelMapSource, read_list_file

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)
COCO_SPLITS = ("interleaved", "contiguous")


def coco_fold_classes(fold: int, class_split: str = "interleaved") -> list[int]:
    """Novel class ids (1-based) of ``fold`` under ``class_split`` (see module docstring)."""
    if fold not in (0, 1, 2, 3):
        raise ValueError(f"COCO-20i fold must be 0..3, got {fold}")
    if class_split == "interleaved":
        return [4 * k + fold + 1 for k in range(20)]
    if class_split == "contiguous":
        return list(range(20 * fold + 1, 20 * fold + 21))
    raise ValueError(f"class_split must be one of {COCO_SPLITS}, got {class_split!r}")


def _scan(root: Path, split: str) -> list[Item]:
    subset = f"{split}2014"
    labels = sorted((root / "annotations" / subset).glob("*.png"))
    if not labels:
        raise FileNotFoundError(f"no label maps in {root / 'annotations' / subset}")
    return [Item(root / subset / f"{p.stem}.jpg", p) for p in labels]


class Coco20i(LabelMapSource):
    """Episodes of one COCO-20i fold.

    Args:
        root: folder holding ``train2014``, ``val2014`` and ``annotations`` (or ``COCO2014/``).
        fold: 0..3.
        split: ``"val"`` (novel classes over val2014) or ``"train"`` (base classes over train2014).
        class_split: ``"interleaved"`` (default) or ``"contiguous"``.
        list_file: explicit ``image label`` list instead of scanning the folders.
        exclude_novel: for ``"train"``, drop images that contain a novel class (BAM option).
        min_area: minimum class area (pixels) for an image to count for a class.
        index_cache: optional JSON cache of the label index (recommended: 80k labels).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        fold: int,
        split: str = "val",
        class_split: str = "interleaved",
        list_file: str | os.PathLike | None = None,
        exclude_novel: bool = True,
        min_area: int = MIN_AREA,
        index_cache: str | os.PathLike | None = None,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        root = Path(root)
        if (root / "COCO2014").is_dir():
            root = root / "COCO2014"
        items = read_list_file(list_file, root, f"{split}2014", f"annotations/{split}2014") if list_file \
            else _scan(root, split)
        novel = coco_fold_classes(fold, class_split)
        base = [c for c in range(1, 81) if c not in novel]
        self.fold, self.split, self.class_split = fold, split, class_split
        super().__init__(
            root, items, COCO_CLASSES,
            class_ids=novel if split == "val" else base,
            exclude_ids=novel if (split == "train" and exclude_novel) else (),
            min_area=min_area, index_cache=index_cache,
        )
