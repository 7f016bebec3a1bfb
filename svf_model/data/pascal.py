"""PASCAL-5i (Shaban et al.; PFENet/BAM protocol): VOC2012 images with SBD-augmented labels.

Layout (as PFENet/BAM's ``data_root``)::

    <root>/JPEGImages/<stem>.jpg
    <root>/SegmentationClassAug/<stem>.png     class ids 1..20, 0 background, 255 ignore

Image lists, first found: ``list_file``; ``<root>/lists/pascal/{train,val}.txt`` (PFENet/BAM's
``lists/pascal``, lines ``JPEGImages/x.jpg SegmentationClassAug/x.png``; the training list may also
be named ``voc_sbd_merge_noduplicate.txt``); ``<root>/ImageSets/SegmentationAug/train_aug.txt`` or
``<root>/ImageSets/Segmentation/{train,val}.txt`` (stems).

Folds: fold ``i`` tests on classes ``5i+1..5i+5`` and trains on the 15 others.
"""

from __future__ import annotations

import os
from pathlib import Path

from .labelmap import MIN_AREA, LabelMapSource, read_list_file

PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def pascal_fold_classes(fold: int) -> list[int]:
    """Class ids (1-based) of the novel classes of ``fold``: ``5*fold+1 .. 5*fold+5``."""
    if fold not in (0, 1, 2, 3):
        raise ValueError(f"PASCAL-5i fold must be 0..3, got {fold}")
    return list(range(5 * fold + 1, 5 * fold + 6))


def _find_list(root: Path, split: str) -> Path:
    names = ["train.txt", "voc_sbd_merge_noduplicate.txt"] if split == "train" else ["val.txt"]
    candidates = [root / "lists" / "pascal" / n for n in names]
    if split == "train":
        candidates.append(root / "ImageSets" / "SegmentationAug" / "train_aug.txt")
    candidates.append(root / "ImageSets" / "Segmentation" / f"{split}.txt")
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no PASCAL {split} list under {root}; looked for: " + ", ".join(map(str, candidates)))


class Pascal5i(LabelMapSource):
    """Episodes of one PASCAL-5i fold.

    Args:
        root: the VOC2012 folder (``JPEGImages``, ``SegmentationClassAug``).
        fold: 0..3.
        split: ``"val"`` (the fold's 5 novel classes, images of the val list) or ``"train"`` (the
            15 base classes, images of the training list).
        list_file: explicit image list (see module docstring).
        exclude_novel: for ``split="train"``, drop every image that contains a novel class (BAM;
            PFENet keeps them with the novel objects as background). Ignored for ``"val"``.
        min_area: minimum class area (pixels) for an image to count for a class.
        index_cache: optional JSON cache of the label index.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        fold: int,
        split: str = "val",
        list_file: str | os.PathLike | None = None,
        exclude_novel: bool = True,
        min_area: int = MIN_AREA,
        index_cache: str | os.PathLike | None = None,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        root = Path(root)
        label_dir = "SegmentationClassAug" if (root / "SegmentationClassAug").is_dir() else "SegmentationClass"
        items = read_list_file(list_file or _find_list(root, split), root, "JPEGImages", label_dir)
        novel = pascal_fold_classes(fold)
        base = [c for c in range(1, 21) if c not in novel]
        self.fold, self.split = fold, split
        super().__init__(
            root, items, PASCAL_CLASSES,
            class_ids=novel if split == "val" else base,
            exclude_ids=novel if (split == "train" and exclude_novel) else (),
            min_area=min_area, index_cache=index_cache,
        )
