"""Training-free prototype head: masked-average-pooled foreground/background prototypes and
cosine similarity (in the spirit of PANet without its alignment loss)."""

from __future__ import annotations

import contextlib

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

    def prototype_only(self) -> contextlib.AbstractContextManager:
        """Its logits are prototype logits already (see ``PrototypeRefineHead.prototype_only``)."""
        return contextlib.nullcontext()

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
        return {"prototypes": self._prototypes(feat, fg, bg).view(b, k, 2, -1)}  # per shot [B, K, 2, C]

    @staticmethod
    def _prototypes(feat: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
        """``feat [N, C, h, w]``, masks ``[N, 1, h, w]`` -> ``[N, 2, C]`` (background, foreground)."""
        return torch.stack([masked_average_pool(feat, bg).flatten(1), masked_average_pool(feat, fg).flatten(1)], 1)

    def _logits(self, feat: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        """``feat [B, C, h, w]``, ``protos [B, 2, C]`` -> ``[B, 2, h, w]`` scaled cosine similarity."""
        return self.temperature * torch.einsum(
            "bchw,bkc->bkhw", F.normalize(feat, dim=1), F.normalize(protos, dim=-1)
        )

    def leave_one_out_logits(self, backbone: Backbone, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One backbone pass for all ``K`` leave-one-out episodes (same result as the generic one)."""
        feat = self.features(backbone, images)
        fg, bg = resize_mask(masks, feat.shape[-2:])
        protos = self._prototypes(feat, fg, bg)  # [K, 2, C]
        k = protos.shape[0]
        others = (protos.sum(0, keepdim=True) - protos) / (k - 1)
        return self._logits(feat, others)

    def cross_logits(
        self, backbone: Backbone, supports: torch.Tensor, masks: torch.Tensor, queries: torch.Tensor
    ) -> torch.Tensor:
        support_feat = self.features(backbone, supports)
        fg, bg = resize_mask(masks, support_feat.shape[-2:])
        protos = self._prototypes(support_feat, fg, bg).mean(0, keepdim=True)
        return self._logits(self.features(backbone, queries), protos.expand(queries.shape[0], -1, -1))

    def segment(self, backbone: Backbone, query: torch.Tensor, cache: SupportCache, return_aux: bool = False):
        logits = self._logits(self.features(backbone, query), cache["prototypes"].mean(1))
        return (logits, []) if return_aux else logits
