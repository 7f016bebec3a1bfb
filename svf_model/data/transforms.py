"""Joint image + mask transforms for episodic training (torchvision.transforms.v2).

The augmentation follows PFENet/BAM's training pipeline: random scale 0.9-1.1, random rotation
+-10 degrees (p = 0.5; image padded with the mean colour, mask with 255), random crop to the train
size (padding the same way where the image is smaller), horizontal flip; plus optional colour
jitter. Before it, the longer side is fitted to the train size (as the test-time letterbox), so the
crop sees most of the object at the scale used in evaluation.

Every transform here takes ``uint8 [H, W, 3]`` and ``uint8 [H, W]`` (0/1/255) numpy arrays and
returns ``uint8 [3, S, S]`` and ``uint8 [S, S]`` tensors; :func:`collate_episodes` normalises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as TF
import torchvision.transforms.v2 as v2
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from .episodes import IGNORE

Pair = tuple[torch.Tensor, torch.Tensor]


def to_tv(image: np.ndarray, mask: np.ndarray) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """numpy ``[H, W, 3]`` / ``[H, W]`` -> torchvision ``Image [3, H, W]`` / ``Mask [H, W]``."""
    img = tv_tensors.Image(torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).permute(2, 0, 1))
    return img, tv_tensors.Mask(torch.from_numpy(np.require(mask, np.uint8, ["C", "W"])))


def mean_fill(mean: Sequence[float]) -> tuple[int, int, int]:
    """Backbone mean (RGB in [0, 1]) -> uint8 fill colour (0 after normalisation)."""
    return tuple(int(round(255 * m)) for m in mean)  # type: ignore[return-value]


def fit_longer_side(image: torch.Tensor, mask: torch.Tensor, size: int, scale: float = 1.0) -> Pair:
    """Resize so the longer side is ``size * scale`` (bilinear image, nearest mask)."""
    h, w = image.shape[-2:]
    factor = size * scale / max(h, w)
    new = [max(1, round(h * factor)), max(1, round(w * factor))]
    # nearest-exact samples pixel centres, as bilinear (align_corners=False) does: no half-pixel shift.
    return (F.resize(image, new, antialias=True),
            F.resize(mask, new, interpolation=v2.InterpolationMode.NEAREST_EXACT))


class Letterbox:
    """No augmentation: longer side to ``size``, pad bottom/right (mean colour / 255 ignore).

    Same geometry as the predictor's test-time letterbox (``svf_model.preprocess``).
    """

    def __init__(self, size: int, mean: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        self.size = size
        self.fill = mean_fill(mean)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> Pair:
        img, msk = fit_longer_side(*to_tv(image, mask), self.size)
        return pad_to(img, msk, self.size, self.fill)


def pad_to(image: torch.Tensor, mask: torch.Tensor, size: int, fill: Sequence[int]) -> Pair:
    """Pad bottom/right to ``size x size`` (image with ``fill``, mask with 255)."""
    h, w = image.shape[-2:]
    out_img = torch.empty(3, size, size, dtype=torch.uint8)
    out_img[:] = torch.tensor(fill, dtype=torch.uint8)[:, None, None]
    out_msk = torch.full((size, size), IGNORE, dtype=torch.uint8)
    out_img[:, :h, :w] = image.as_subclass(torch.Tensor)[:, :size, :size]
    out_msk[:h, :w] = mask.as_subclass(torch.Tensor)[:size, :size]
    return out_img, out_msk


class TrainAugment:
    """PFENet/BAM-style joint augmentation to ``size x size`` (see module docstring).

    Args:
        size: train size ``S``.
        mean: backbone mean (RGB in [0, 1]) used as the padding colour.
        scale: random scale range.
        rotate: maximum rotation in degrees.
        rotate_p: probability of rotating.
        hflip_p: probability of a horizontal flip.
        color_jitter: strength of brightness/contrast/saturation jitter (hue: a quarter of it,
            at most 0.1); 0 disables it. Applies to the image only.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        scale: tuple[float, float] = (0.9, 1.1),
        rotate: float = 10.0,
        rotate_p: float = 0.5,
        hflip_p: float = 0.5,
        color_jitter: float = 0.0,
    ) -> None:
        self.size = size
        self.scale = scale
        fill: dict[Any, Any] = {tv_tensors.Image: mean_fill(mean), tv_tensors.Mask: IGNORE}
        self.geometric = v2.Compose([
            v2.RandomApply([v2.RandomRotation(rotate, interpolation=v2.InterpolationMode.BILINEAR, fill=fill)],
                           p=rotate_p),
            v2.RandomCrop(size, pad_if_needed=True, fill=fill),
            v2.RandomHorizontalFlip(hflip_p),
        ])
        self.jitter = None
        if color_jitter > 0:
            self.jitter = v2.ColorJitter(color_jitter, color_jitter, color_jitter, min(0.1, color_jitter / 4))

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> Pair:
        img, msk = to_tv(image, mask)
        factor = float(torch.empty(()).uniform_(*self.scale))
        img, msk = fit_longer_side(img, msk, self.size, factor)
        img, msk = self.geometric(img, msk)
        if self.jitter is not None:
            img = self.jitter(img)
        return img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``uint8 [..., 3, H, W]`` -> float32 ``(x / 255 - mean) / std``."""
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (images.float() / 255.0 - m) / s


def _sized(image: torch.Tensor, mask: torch.Tensor, size: int, fill: Sequence[int]) -> Pair:
    if image.shape[-2:] == (size, size) and mask.shape[-2:] == (size, size):
        return image, mask
    img, msk = fit_longer_side(tv_tensors.Image(image), tv_tensors.Mask(mask), size)
    return pad_to(img, msk, size, fill)


def collate_episodes(
    batch: list[dict[str, Any]],
    size: int,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> dict[str, Any]:
    """Stack transformed episodes (see ``EpisodeDataset``) into a training batch.

    Items not yet at ``size x size`` are letterboxed to it.

    Returns:
        ``query [B, 3, S, S]`` and ``supports [B, K, 3, S, S]`` float32 normalised with the
        backbone's ``mean``/``std``; ``support_masks [B, K, S, S]`` float32 and
        ``query_mask [B, S, S]`` int64, both 1 = class, 0 = background, 255 = ignore;
        ``class_names``, ``query_paths``, ``support_paths`` lists.
    """
    fill = mean_fill(mean)
    queries, qmasks, supports, smasks = [], [], [], []
    for item in batch:
        q, qm = _sized(item["query"], item["query_mask"], size, fill)
        queries.append(q)
        qmasks.append(qm)
        pairs = [_sized(s, m, size, fill) for s, m in zip(item["supports"], item["support_masks"], strict=True)]
        supports.append(torch.stack([p[0] for p in pairs]))
        smasks.append(torch.stack([p[1] for p in pairs]))
    return {
        "query": normalize(torch.stack(queries), mean, std),
        "query_mask": torch.stack(qmasks).long(),
        "supports": normalize(torch.stack(supports), mean, std),
        "support_masks": torch.stack(smasks).float(),
        "class_names": [b["class_name"] for b in batch],
        "query_paths": [b["query_path"] for b in batch],
        "support_paths": [b["support_paths"] for b in batch],
    }


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, C, *size]`` bilinear (align_corners as the FSS repos)."""
    if logits.shape[-2:] == tuple(size):
        return logits
    return TF.interpolate(logits, size, mode="bilinear", align_corners=True)
