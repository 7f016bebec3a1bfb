"""Segmentation losses shared by meta-training and adaptation (labels: 0 bg, 1 fg, 255 ignore)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = 255
LOSSES = ("ce", "balanced")


def balanced_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of the background pixels' and the foreground pixels' mean cross-entropy, pooled over the
    batch, so a small object weighs as much as its background.

    Args:
        logits: ``[N, 2, H, W]``; target: ``[N, H, W]`` (0, 1, 255 = ignored).
    """
    pixel = F.cross_entropy(logits, target.long(), ignore_index=IGNORE, reduction="none")
    parts = [pixel[target == c].mean() for c in (0, 1) if (target == c).any()]
    return torch.stack(parts).mean() if parts else logits.sum() * 0.0


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "ce",
                      per_sample: bool = False) -> torch.Tensor:
    """``kind`` = ``"ce"`` (pixel cross-entropy, 255 ignored) or ``"balanced"``
    (:func:`balanced_cross_entropy`; with ``per_sample`` balanced within each sample, then averaged
    over the samples that have labelled pixels).

    Args:
        logits: ``[N, 2, H, W]`` at the target's size; target: ``[N, H, W]``.
    """
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    if not (target != IGNORE).any():
        return logits.sum() * 0.0
    if kind == "ce":
        return F.cross_entropy(logits, target.long(), ignore_index=IGNORE)
    if not per_sample:
        return balanced_cross_entropy(logits, target)
    keep = [i for i in range(target.shape[0]) if (target[i] != IGNORE).any()]
    return torch.stack([balanced_cross_entropy(logits[i:i + 1], target[i:i + 1]) for i in keep]).mean()
