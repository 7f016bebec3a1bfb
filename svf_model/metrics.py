"""Few-shot segmentation metrics, PFENet/BAM protocol.

* mIoU: for each class, the foreground intersections summed over its episodes divided by the
  foreground unions summed over its episodes; then the mean over classes.
* FB-IoU: foreground and background IoU, each accumulated over all episodes (intersections summed
  / unions summed), then their mean.
* Pixels labelled 255 are excluded from every count.

Per-episode IoU is the foreground IoU of that episode alone, in 0..1 (1.0 when prediction and
label are both empty on the valid pixels).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

IGNORE = 255


@dataclass(frozen=True)
class Counts:
    """Pixel counts of one episode: foreground and background intersection/union."""

    fg_inter: int
    fg_union: int
    bg_inter: int
    bg_union: int

    @property
    def iou(self) -> float:
        """Foreground IoU in 0..1 (1.0 when the union is empty)."""
        return self.fg_inter / self.fg_union if self.fg_union else 1.0


def episode_counts(pred: np.ndarray, target: np.ndarray) -> Counts:
    """Counts of one prediction.

    Args:
        pred: ``[H, W]`` bool (or 0/1) foreground prediction.
        target: ``[H, W]`` uint8 label: 1 foreground, 0 background, 255 ignore.
    """
    pred = np.asarray(pred).astype(bool)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and label {target.shape} differ in size")
    valid = target != IGNORE
    fg = (target == 1) & valid
    bg = (target == 0) & valid
    p_fg = pred & valid
    p_bg = ~pred & valid
    return Counts(
        fg_inter=int((p_fg & fg).sum()),
        fg_union=int((p_fg | fg).sum()),
        bg_inter=int((p_bg & bg).sum()),
        bg_union=int((p_bg | bg).sum()),
    )


@dataclass
class FewShotMeter:
    """Accumulates episodes and reports the PFENet/BAM metrics.

    Example::

        meter = FewShotMeter()
        for ep in episodes:
            meter.update(ep.class_name, pred_mask, ep.query_mask)
        meter.miou, meter.fbiou, meter.per_class()
    """

    inter: dict[str, int] = field(default_factory=dict)
    union: dict[str, int] = field(default_factory=dict)
    bg_inter: int = 0
    bg_union: int = 0
    fg_inter: int = 0
    fg_union: int = 0
    episodes: int = 0

    def update(self, class_name: str, pred: np.ndarray, target: np.ndarray) -> float:
        """Add one episode; returns its foreground IoU (0..1)."""
        return self.add(class_name, episode_counts(pred, target))

    def add(self, class_name: str, c: Counts) -> float:
        """Add the counts of one episode; returns its foreground IoU (0..1)."""
        self.inter[class_name] = self.inter.get(class_name, 0) + c.fg_inter
        self.union[class_name] = self.union.get(class_name, 0) + c.fg_union
        self.fg_inter += c.fg_inter
        self.fg_union += c.fg_union
        self.bg_inter += c.bg_inter
        self.bg_union += c.bg_union
        self.episodes += 1
        return c.iou

    def per_class(self) -> dict[str, float]:
        """Class -> IoU in 0..1 (sum of intersections / sum of unions over its episodes)."""
        return {c: (self.inter[c] / self.union[c] if self.union[c] else 1.0) for c in self.inter}

    @property
    def miou(self) -> float:
        """Mean over classes of the per-class IoU, in 0..1 (nan before any update)."""
        values = list(self.per_class().values())
        return float(np.mean(values)) if values else float("nan")

    @property
    def fg_iou(self) -> float:
        return self.fg_inter / self.fg_union if self.fg_union else 1.0

    @property
    def bg_iou(self) -> float:
        return self.bg_inter / self.bg_union if self.bg_union else 1.0

    @property
    def fbiou(self) -> float:
        """Mean of the accumulated foreground and background IoU, in 0..1."""
        if not self.episodes:
            return float("nan")
        return (self.fg_iou + self.bg_iou) / 2

    def summary(self) -> dict[str, object]:
        """``{"miou", "fbiou"}`` in percent and ``per_class`` in percent."""
        return {
            "miou": 100 * self.miou,
            "fbiou": 100 * self.fbiou,
            "per_class": {c: 100 * v for c, v in self.per_class().items()},
        }


def trivial_meters(labels: Iterable[tuple[str, np.ndarray]]) -> dict[str, FewShotMeter]:
    """Scores of the trivial predictors (every pixel foreground / every pixel background) on
    ``(class_name, query_mask)`` pairs: the floors any real model must beat."""
    meters = {"all_foreground": FewShotMeter(), "all_background": FewShotMeter()}
    for class_name, target in labels:
        meters["all_foreground"].update(class_name, np.ones(target.shape, bool), target)
        meters["all_background"].update(class_name, np.zeros(target.shape, bool), target)
    return meters
