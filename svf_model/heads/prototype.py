"""Training-free prototype head: masked-average-pooled foreground/background prototypes and
cosine similarity (in the spirit of PANet without its alignment loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbones import Backbone
from ..model import FewShotHead, SupportCache, masked_average_pool, resize_mask


class PrototypeHead(FewShotHead):
    """No learned weights. Features: the channel-wise concatenation of the L2-normalised outputs of
    ``stages`` (all at output stride 8). Logits = ``temperature * cos(feature, prototype)`` for the
    background and foreground prototypes, each averaged over the shots.

    Args:
        stages: backbone stages whose features are used.
        temperature: scale of the cosine similarities (softmax sharpness).
    """

    method = "prototype"

    def __init__(self, stages: tuple[str, ...] = ("layer3", "layer4"), temperature: float = 20.0) -> None:
        super().__init__()
        self.stages = tuple(stages)
        self.temperature = temperature

    def features(self, backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
        """``images [N, 3, H, W]`` -> ``[N, C, H/8, W/8]`` concatenated normalised stage features."""
        feats = backbone(images)
        size = feats[self.stages[0]].shape[-2:]
        parts = []
        for name in self.stages:
            f = feats[name]
            if f.shape[-2:] != size:
                f = F.interpolate(f, size, mode="bilinear", align_corners=True)
            parts.append(F.normalize(f, dim=1))
        return torch.cat(parts, dim=1)

    def encode_supports(self, backbone: Backbone, supports: torch.Tensor, masks: torch.Tensor) -> SupportCache:
        b, k = supports.shape[:2]
        feat = self.features(backbone, supports.flatten(0, 1))
        fg, bg = resize_mask(masks.flatten(0, 1), feat.shape[-2:])
        fg_proto = masked_average_pool(feat, fg).view(b, k, -1).mean(1)
        bg_proto = masked_average_pool(feat, bg).view(b, k, -1).mean(1)
        return {"prototypes": torch.stack([bg_proto, fg_proto], dim=1)}  # [B, 2, C]

    def segment(self, backbone: Backbone, query: torch.Tensor, cache: SupportCache, return_aux: bool = False):
        feat = F.normalize(self.features(backbone, query), dim=1)  # [B, C, h, w]
        protos = F.normalize(cache["prototypes"], dim=-1)  # [B, 2, C]
        logits = self.temperature * torch.einsum("bchw,bkc->bkhw", feat, protos)
        return (logits, []) if return_aux else logits
