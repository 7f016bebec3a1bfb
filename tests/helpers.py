"""Small shared test utilities: real fss-dev pairs and IoU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def fss_pairs(root: Path, cls: str, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first ``n`` (image uint8 [H,W,3], mask bool [H,W]) pairs of class ``cls`` (sorted by stem)."""
    stems = sorted(p for p in (root / cls).glob("*.jpg"))[:n]
    return [(np.asarray(Image.open(p).convert("RGB")), np.asarray(Image.open(p.with_suffix(".png"))) > 127)
            for p in stems]


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0
