"""PFENet (Tian et al., TPAMI 2020): prior mask + Feature Enrichment Module (FEM).

Layers and key names follow dvlab-research/PFENet ``model/PFENet.py``: ``down_query``,
``down_supp``, ``init_merge.{i}``, ``alpha_conv.{i}``, ``beta_conv.{i}``, ``inner_cls.{i}``,
``res1``, ``res2``, ``cls``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from ..model import SupportCache
from . import register_head
from .blocks import PriorGuidedHead, classifier, conv_relu, double_conv3x3, resize

PYRAMID_BINS = (60, 30, 15, 8)


class PFENetHead(PriorGuidedHead):
    """PFENet's head. K shots: prototypes and priors are averaged over the shots (as official).

    Args:
        mid_channels: ``C(layer3) + C(layer2)``.
        reduce_dim: head width (256).
        classes: output classes (2).
        pyramid_bins: FEM scales; ints > 1 are absolute sizes (adaptive average pooling, which also
            up-samples feature maps smaller than the bin), floats <= 1 fractions of the feature size.
        shot: K the model was trained for (kept for checkpoints; any K works).
    """

    method = "pfenet"

    def __init__(
        self,
        mid_channels: int,
        reduce_dim: int = 256,
        classes: int = 2,
        pyramid_bins: tuple[float, ...] = PYRAMID_BINS,
        shot: int = 1,
    ) -> None:
        super().__init__(mid_channels, reduce_dim)
        self.pyramid_bins = tuple(pyramid_bins)
        self.shot = shot
        n = len(self.pyramid_bins)
        self.init_merge = nn.ModuleList(conv_relu(2 * reduce_dim + 1, reduce_dim) for _ in range(n))
        self.alpha_conv = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * reduce_dim, reduce_dim, 1, bias=False), nn.ReLU()) for _ in range(n - 1)
        )
        self.beta_conv = nn.ModuleList(double_conv3x3(reduce_dim) for _ in range(n))
        self.inner_cls = nn.ModuleList(classifier(reduce_dim, classes) for _ in range(n))
        self.res1 = conv_relu(reduce_dim * n, reduce_dim)
        self.res2 = double_conv3x3(reduce_dim)
        self.cls = classifier(reduce_dim, classes)

    def _bin_size(self, bin_: float, feat_size: int) -> int:
        return int(feat_size * bin_) if bin_ <= 1.0 else int(bin_)

    def enrich(self, query: torch.Tensor, proto: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, list]:
        """FEM + decoder.

        Args:
            query: ``[B, D, h, w]`` reduced query features.
            proto: ``[B, D]`` support prototype.
            prior: ``[B, 1, h, w]`` prior mask.

        Returns:
            ``(logits [B, classes, h, w], inner logits [B, classes, bin, bin] per scale)``.
        """
        size = query.shape[-2:]
        merged_list, inner = [], []
        for idx, bin_ in enumerate(self.pyramid_bins):
            n = self._bin_size(bin_, query.shape[2])
            q = F.adaptive_avg_pool2d(query, n)
            s = proto[:, :, None, None].expand(-1, -1, n, n)
            merged = self.init_merge[idx](torch.cat([q, s, resize(prior, (n, n))], dim=1))
            if idx >= 1:
                previous = resize(merged_list[idx - 1], (n, n))
                merged = self.alpha_conv[idx - 1](torch.cat([merged, previous], dim=1)) + merged
            merged = self.beta_conv[idx](merged) + merged
            inner.append(self.inner_cls[idx](merged))
            merged_list.append(resize(merged, size))
        feat = self.res1(torch.cat(merged_list, dim=1))
        feat = self.res2(feat) + feat
        return self.cls(feat), inner

    def segment(self, backbone: Backbone, query: torch.Tensor, cache: SupportCache, return_aux: bool = False):
        feats = self.query_features(backbone, query)
        prior = self.priors(feats, cache).mean(1, keepdim=True)
        logits, inner = self.enrich(feats["reduced"], cache["prototypes"].mean(1), prior)
        return (logits, inner) if return_aux else logits


@register_head("pfenet")
def build_pfenet(backbone: Backbone, **kwargs) -> PFENetHead:
    """PFENet head sized for ``backbone`` (``fea_dim = C(layer3) + C(layer2)``)."""
    return PFENetHead(backbone.channels["layer3"] + backbone.channels["layer2"], **kwargs)
