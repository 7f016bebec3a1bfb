"""The SVF paper's baseline: PFENet with the Feature Enrichment Module replaced by ASPP.

The SVF repositories (syp2ysy/SVF, zechao-li/SVF-pytorch) publish only the SVD layer code, not the
baseline's model file. Its architecture is the one BAM uses as its meta learner (PFENet's prior
mask and prototype, ``init_merge`` -> ASPP -> ``res1`` -> ``res2`` -> classifier), so this head takes
BAM's layer layout and key names for it (chunbolang/BAM ``model/BAM.py``): ``down_query``,
``down_supp``, ``init_merge``, ``ASPP_meta``, ``res1_meta``, ``res2_meta``, ``cls_meta``.
"""

from __future__ import annotations

import torch

from ..backbones import Backbone
from ..model import SupportCache
from . import register_head
from .blocks import ASPP, PriorGuidedHead, classifier, conv_relu, double_conv3x3


class MetaLearner(PriorGuidedHead):
    """Prior-guided head with an ASPP decoder; BAM's meta learner and the SVF baseline."""

    def __init__(self, mid_channels: int, reduce_dim: int = 256, classes: int = 2) -> None:
        super().__init__(mid_channels, reduce_dim)
        self.init_merge = conv_relu(2 * reduce_dim + 1, reduce_dim)
        self.ASPP_meta = ASPP(reduce_dim)
        self.res1_meta = conv_relu(5 * reduce_dim, reduce_dim)
        self.res2_meta = double_conv3x3(reduce_dim)
        self.cls_meta = classifier(reduce_dim, classes)

    def decode(self, query: torch.Tensor, proto: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """``query [B, D, h, w]``, ``proto [B, D]``, ``prior [B, 1, h, w]`` -> logits ``[B, 2, h, w]``."""
        merged = torch.cat([query, proto[:, :, None, None].expand_as(query), prior], dim=1)
        feat = self.res1_meta(self.ASPP_meta(self.init_merge(merged)))
        feat = self.res2_meta(feat) + feat
        return self.cls_meta(feat)


class BaselineHead(MetaLearner):
    """SVF baseline. K shots: prototypes and priors averaged (PFENet's rule). Main loss only, so
    ``return_aux`` gives an empty list.

    Args:
        mid_channels: ``C(layer3) + C(layer2)``.
        reduce_dim: head width (256).
        classes: output classes (2).
        shot: K the model was trained for (kept for checkpoints; any K works).
    """

    method = "baseline"

    def __init__(self, mid_channels: int, reduce_dim: int = 256, classes: int = 2, shot: int = 1) -> None:
        super().__init__(mid_channels, reduce_dim, classes)
        self.shot = shot

    def segment(self, backbone: Backbone, query: torch.Tensor, cache: SupportCache, return_aux: bool = False):
        feats = self.query_features(backbone, query)
        prior = self.priors(feats, cache).mean(1, keepdim=True)
        logits = self.decode(feats["reduced"], cache["prototypes"].mean(1), prior)
        return (logits, []) if return_aux else logits


@register_head("baseline")
def build_baseline(backbone: Backbone, **kwargs) -> BaselineHead:
    """SVF baseline head sized for ``backbone``."""
    return BaselineHead(backbone.channels["layer3"] + backbone.channels["layer2"], **kwargs)
