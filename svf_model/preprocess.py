"""The official FSS test-time resizing: longer side to ``size`` (bilinear), pad bottom/right to
``size x size`` (image with the mean, i.e. 0 after normalisation; mask with 255 = ignore); logits
are resized back to ``longer x longer`` and cropped, so predictions are scored at the original size."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = 255


def fitted_size(h: int, w: int, size: int) -> tuple[int, int]:
    """``(h', w')`` with the longer side equal to ``size`` and the aspect ratio kept."""
    scale = size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def letterbox_image(image: np.ndarray, size: int, mean: tuple, std: tuple) -> torch.Tensor:
    """``uint8 [H, W, 3]`` -> normalised ``float32 [3, size, size]`` (content top-left, zero padding)."""
    h, w = image.shape[:2]
    nh, nw = fitted_size(h, w, size)
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, (nh, nw), mode="bilinear", align_corners=False, antialias=max(h, w) > size)
    x = (x[0] - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    out = torch.zeros(3, size, size)
    out[:, :nh, :nw] = x
    return out


def letterbox_mask(mask: np.ndarray, size: int, ignore: np.ndarray | None = None) -> torch.Tensor:
    """``bool [H, W]`` foreground (+ optional ignore) -> ``float32 [size, size]`` in {0, 1, 255}."""
    h, w = mask.shape
    nh, nw = fitted_size(h, w, size)
    label = mask.astype(np.float32)
    if ignore is not None:
        label[ignore.astype(bool)] = IGNORE
    t = torch.from_numpy(label)[None, None]
    t = F.interpolate(t, (nh, nw), mode="nearest-exact")[0, 0]
    out = torch.full((size, size), float(IGNORE))
    out[:nh, :nw] = t
    return out


def unletterbox_logits(logits: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[B, C, size, size]`` logits of a letterboxed input -> ``[B, C, h, w]`` at the original size."""
    longer = max(h, w)
    up = F.interpolate(logits.float(), (longer, longer), mode="bilinear", align_corners=True)
    return up[:, :, :h, :w]
