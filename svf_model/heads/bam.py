"""BAM (Lang et al., CVPR 2022): meta learner + base learner ensembled with a Gram-matrix
adjustment factor.

Key names follow chunbolang/BAM ``model/BAM.py``: the meta learner (see :mod:`.baseline`),
``learner_base.0`` (PSPNet PPM) and ``learner_base.1`` (PSPNet classifier), ``gram_merge``,
``cls_merge`` and, for ``shot > 1``, ``kshot_rw``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbones import Backbone
from ..model import SupportCache
from ..svf import freeze_batchnorm
from . import register_head
from .baseline import MetaLearner
from .blocks import PPM, gram_matrix, psp_classifier, resize

PPM_BINS = (1, 2, 3, 6)


def _merge_conv() -> nn.Conv2d:
    """``1x1 conv 2 -> 1`` without bias, initialised to pass its first input through."""
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0]).view_as(conv.weight))
    return conv


class BAMHead(MetaLearner):
    """BAM's head.

    Args:
        mid_channels: ``C(layer3) + C(layer2)`` (meta learner input).
        high_channels: ``C(layer4)`` (base learner input: PSPNet PPM + classifier).
        base_classes: base-learner outputs including background: 16 for PASCAL-5i, 61 for COCO-20i.
        shot: K the model was trained for; ``shot > 1`` adds the learned K-shot re-weighting
            ``kshot_rw``, used when exactly ``shot`` supports are given (other K: uniform weights).
        kshot_trans_dim: hidden width of ``kshot_rw`` (official config: 2; 0 = one ``shot x shot``
            conv initialised to ``1/shot``).
        low_fea: stage whose Gram matrices give the adjustment factor (official: ``"layer2"``).
        reduce_dim: meta-learner width (256).

    ``learner_base`` is built frozen (parameters and BatchNorm statistics): BAM trains it
    separately as a PSPNet and keeps it fixed. In training mode the base map excludes the
    episode's own class when the cache holds ``"base_class_index"`` (``[B]`` long, 0-based among
    the base classes). ``return_aux`` gives ``[meta logits [B, 2, h, w], base logits
    [B, base_classes, h, w]]`` (the latter is supervised with base-class labels).
    """

    method = "bam"

    def __init__(
        self,
        mid_channels: int,
        high_channels: int,
        base_classes: int = 16,
        shot: int = 1,
        kshot_trans_dim: int = 2,
        low_fea: str = "layer2",
        reduce_dim: int = 256,
    ) -> None:
        super().__init__(mid_channels, reduce_dim, classes=2)
        self.shot = shot
        self.base_classes = base_classes
        self.low_fea = low_fea
        self.learner_base = nn.Sequential(
            PPM(high_channels, high_channels // len(PPM_BINS), PPM_BINS),
            psp_classifier(2 * high_channels, base_classes),
        )
        # A pretrained PSPNet, frozen in BAM's training (excluded from the optimiser; BatchNorms eval).
        self.learner_base.requires_grad_(False)
        freeze_batchnorm(self.learner_base)
        self.gram_merge = _merge_conv()
        self.cls_merge = _merge_conv()
        if shot > 1:
            if kshot_trans_dim == 0:
                self.kshot_rw = nn.Conv2d(shot, shot, 1, bias=False)
                nn.init.constant_(self.kshot_rw.weight, 1.0 / shot)
            else:
                self.kshot_rw = nn.Sequential(
                    nn.Conv2d(shot, kshot_trans_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(kshot_trans_dim, shot, 1)
                )

    def _low_level(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        f = feats[self.low_fea]
        # Official VGG path: layer2 is resized to layer3's size before the Gram matrix.
        return resize(f, feats["layer3"].shape[-2:]) if self.low_fea == "layer2" else f

    def encode_supports(self, backbone: Backbone, supports: torch.Tensor, masks: torch.Tensor) -> SupportCache:
        """Cache: ``prototypes [B, K, D]``, ``supp_feat4 [B, K, C4, h, w]``, ``supp_gram [B, K, C, C]``."""
        b, k = supports.shape[:2]
        feats, prototypes = self.support_features(backbone, supports.flatten(0, 1), masks.flatten(0, 1))
        f4 = feats["layer4"]
        gram = gram_matrix(self._low_level(feats))
        return {
            "prototypes": prototypes.view(b, k, -1),
            "supp_feat4": f4.view(b, k, *f4.shape[1:]),
            "supp_gram": gram.view(b, k, *gram.shape[1:]),
        }

    def shot_weights(self, est: torch.Tensor) -> torch.Tensor:
        """``est [B, K]`` Gram distances -> weights ``[B, K]`` summing to 1 (``K == 1``: ones)."""
        k = est.shape[1]
        if self.shot == 1 or k != self.shot:
            return torch.full_like(est, 1.0 / k)
        val, order = est.sort(1)
        rank = order.sort(1)[1]
        weight = self.kshot_rw(val[:, :, None, None])[:, :, 0, 0].gather(1, rank)
        return weight.softmax(1)

    def segment(self, backbone: Backbone, query: torch.Tensor, cache: SupportCache, return_aux: bool = False):
        feats = self.query_features(backbone, query)
        que_gram = gram_matrix(self._low_level(feats))  # [B, C, C]
        c = que_gram.shape[-1]
        est = (que_gram[:, None] - cache["supp_gram"]).flatten(2).norm(dim=2) / c  # [B, K]
        weights = self.shot_weights(est)
        est_val = (weights * est).sum(1)  # [B]

        prior = (weights[:, :, None, None] * self.priors(feats, cache)).sum(1, keepdim=True)
        proto = (weights[:, :, None] * cache["prototypes"]).sum(1)
        meta_out = self.decode(feats["reduced"], proto, prior)
        base_out = resize(self.learner_base(feats["layer4"]), meta_out.shape[-2:])

        meta_soft, base_soft = meta_out.softmax(1), base_out.softmax(1)
        base_map = base_soft[:, 1:].sum(1, keepdim=True)
        if self.training and "base_class_index" in cache:
            own = (cache["base_class_index"].long() + 1).view(-1, 1, 1, 1).expand_as(base_map)
            base_map = base_map - base_soft.gather(1, own)
        est_map = est_val.view(-1, 1, 1, 1).expand_as(base_map)
        meta_bg = self.gram_merge(torch.cat([meta_soft[:, 0:1], est_map], dim=1))
        meta_fg = self.gram_merge(torch.cat([meta_soft[:, 1:], est_map], dim=1))
        merge_bg = self.cls_merge(torch.cat([meta_bg, base_map], dim=1))
        final = torch.cat([merge_bg, meta_fg], dim=1)
        return (final, [meta_out, base_out]) if return_aux else final


@register_head("bam")
def build_bam(backbone: Backbone, **kwargs) -> BAMHead:
    """BAM head sized for ``backbone`` (meta learner on layer2+layer3, base learner on layer4)."""
    return BAMHead(backbone.channels["layer3"] + backbone.channels["layer2"], backbone.channels["layer4"], **kwargs)
