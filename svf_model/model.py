"""Few-shot segmenter = backbone (``layer0..layer4``) + head, with a support cache.

The split follows segment-anything's predictor: supports are encoded once
(:meth:`FewShotSegmenter.encode_supports`), then any number of queries are segmented against the
cache (:meth:`FewShotSegmenter.segment`). ``forward`` does both, as the official FSS models do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone

SupportCache = dict[str, Any]
"""What a head keeps from the supports (tensors with batch ``B`` first), opaque to callers."""


class FewShotHead(nn.Module):
    """Interface of every head. Subclasses implement the two methods below.

    Heads read the backbone's stages themselves because some (PFENet, BAM) run ``layer4`` on
    masked ``layer3`` support features.
    """

    #: Name used by the registry and checkpoints ("prototype", "baseline", "pfenet", "bam").
    method: str = ""

    def encode_supports(self, backbone: Backbone, supports: torch.Tensor, masks: torch.Tensor) -> SupportCache:
        """Encode supports.

        Args:
            backbone: the shared backbone.
            supports: ``[B, K, 3, H, W]`` normalised images.
            masks: ``[B, K, H, W]`` float, 1 = foreground, 0 = background, 255 = ignore.
        """
        raise NotImplementedError

    def segment(
        self, backbone: Backbone, query: torch.Tensor, cache: SupportCache, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Segment ``query [B, 3, H, W]`` -> logits ``[B, 2, h, w]`` (background, foreground) at
        feature resolution or above; with ``return_aux`` also the auxiliary logits used in training."""
        raise NotImplementedError


    def leave_one_out_logits(self, backbone: Backbone, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Each of ``K >= 2`` shots segmented as the query of the other ``K - 1``.

        Args:
            images: ``[K, 3, H, W]`` normalised; masks: ``[K, H, W]`` (1 fg, 0 bg, 255 ignore).

        Returns:
            logits ``[K, 2, h, w]``. Heads may override this with a cheaper exact version.
        """
        others = leave_one_out_index(images.shape[0])
        cache = self.encode_supports(backbone, images[others], masks[others])
        return self.segment(backbone, images, cache)

    def cross_logits(
        self, backbone: Backbone, supports: torch.Tensor, masks: torch.Tensor, queries: torch.Tensor
    ) -> torch.Tensor:
        """Every query against the same supports: ``supports [K,3,H,W]``, ``masks [K,H,W]``,
        ``queries [Q,3,H,W]`` -> logits ``[Q, 2, h, w]``."""
        q = queries.shape[0]
        cache = self.encode_supports(backbone, supports[None].expand(q, *supports.shape),
                                     masks[None].expand(q, *masks.shape))
        return self.segment(backbone, queries, cache)


@dataclass(frozen=True)
class LowShotValues:
    """A second set of singular values, used instead of the model's own with the head's prototype
    logits (values trained for those logits, which a head falls back to below its ``min_shots``).

    :class:`svf_model.predictor.Predictor` uses them for fewer than ``below`` shots, and from ``below``
    up to ``fallback_up_to`` shots (no limit: ``None``) when ``fallback_margin`` is set and, segmenting
    each support from the others, they beat the model's own values and whole head by more than
    ``fallback_margin`` IoU (0..1). ``state`` has :func:`svf_model.svf_state` keys (``"<layer>.d"``).
    """

    below: int
    state: dict[str, torch.Tensor]
    fallback_margin: float | None = None
    fallback_up_to: int | None = None


@dataclass(frozen=True)
class TunedWeights:
    """Backbone weights a *comparison* model trained instead of singular values (the SVF paper's
    ablation): ``kind`` ``"full"`` (every parameter of ``stages``: conv weights and BatchNorm's affine)
    or ``"bn"`` (BatchNorm's affine only). Running statistics stay frozen. Such a model file stores
    these tensors too (see :mod:`svf_model.checkpoint`)."""

    kind: str
    stages: tuple[str, ...]

    KINDS: ClassVar[tuple[str, ...]] = ("full", "bn")

    def tensors(self, backbone: nn.Module) -> dict[str, torch.Tensor]:
        """``{backbone-relative name: tensor}`` of what this tunes (the live tensors)."""
        out = {}
        for stage in self.stages:
            for name, module in backbone.get_submodule(stage).named_modules():
                if self.kind == "bn" and not isinstance(module, nn.modules.batchnorm._BatchNorm):
                    continue
                prefix = f"{stage}.{name}." if name else f"{stage}."
                for key, param in module.named_parameters(recurse=False):
                    out[prefix + key] = param
        return out


class FewShotSegmenter(nn.Module):
    """``backbone`` + ``head``. State-dict keys: ``backbone.layerN.*`` and ``head.*``.

    ``low_shot_values`` (optional, from the model file) holds singular values for the prototype
    logits; :class:`svf_model.predictor.Predictor` decides when to use them (:class:`LowShotValues`).
    ``tuned_weights`` is set on comparison models whose backbone weights were trained (:class:`TunedWeights`).
    """

    def __init__(self, backbone: Backbone, head: FewShotHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.low_shot_values: LowShotValues | None = None
        self.tuned_weights: TunedWeights | None = None

    @property
    def method(self) -> str:
        return self.head.method

    def encode_supports(self, supports: torch.Tensor, masks: torch.Tensor) -> SupportCache:
        """``supports [B, K, 3, H, W]``, ``masks [B, K, H, W]`` -> cache for :meth:`segment`."""
        if supports.dim() != 5 or masks.dim() != 4:
            raise ValueError(f"supports must be [B,K,3,H,W] and masks [B,K,H,W], got "
                             f"{tuple(supports.shape)} and {tuple(masks.shape)}")
        return self.head.encode_supports(self.backbone, supports, masks.float())

    def segment(self, query: torch.Tensor, cache: SupportCache, return_aux: bool = False):
        """``query [B, 3, H, W]`` -> logits ``[B, 2, H, W]`` upsampled (bilinear) to the query size.

        With ``return_aux`` returns ``(logits, aux_logits)``, the auxiliary logits also upsampled.
        """
        out = self.head.segment(self.backbone, query, cache, return_aux=return_aux)
        logits, aux = out if return_aux else (out, [])
        size = query.shape[-2:]
        up = lambda t: t if t.shape[-2:] == size else F.interpolate(t, size, mode="bilinear", align_corners=True)  # noqa: E731
        return (up(logits), [up(a) for a in aux]) if return_aux else up(logits)

    def forward(self, query: torch.Tensor, supports: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``query [B,3,H,W]``, ``supports [B,K,3,H,W]``, ``masks [B,K,H,W]`` -> logits ``[B,2,H,W]``."""
        return self.segment(query, self.encode_supports(supports, masks))


def leave_one_out_index(k: int) -> torch.Tensor:
    """``[k, k - 1]`` long: row ``i`` lists every shot but ``i`` (in order)."""
    return torch.stack([torch.cat([torch.arange(i), torch.arange(i + 1, k)]) for i in range(k)])


def masked_average_pool(feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PFENet's ``Weighted_GAP``: ``feat [N, C, h, w]``, ``mask [N, 1, h, w]`` -> ``[N, C, 1, 1]``."""
    area = F.avg_pool2d(mask, feat.shape[-2:]) * feat.shape[-2] * feat.shape[-1] + 0.0005
    return F.avg_pool2d(feat * mask, feat.shape[-2:]) * feat.shape[-2] * feat.shape[-1] / area


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask [N, H, W]`` (1 fg, 0 bg, 255 ignore) -> ``(fg, bg)`` each ``[N, 1, h, w]`` in ``[0, 1]``
    by bilinear resizing (align_corners as the FSS repos); ignored pixels count as neither."""
    fg = (mask == 1).float().unsqueeze(1)
    bg = (mask == 0).float().unsqueeze(1)
    fg = F.interpolate(fg, size, mode="bilinear", align_corners=True)
    bg = F.interpolate(bg, size, mode="bilinear", align_corners=True)
    return fg, bg
