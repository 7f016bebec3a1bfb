"""Pieces shared by the PFENet-family heads (PFENet, the SVF baseline, BAM).

Module layouts (``nn.Sequential`` indices, bias flags) follow dvlab-research/PFENet
``model/PFENet.py`` and chunbolang/BAM ``model/{BAM,ASPP,PPM}.py`` so that the heads' state-dict
keys are the official ones (``down_query.0.weight``, ``ASPP_meta.layer6_2.0.bias``, ...).

Feature conventions, for any backbone: "mid-level" features are ``cat(layer3, layer2)`` (layer2
resized to layer3's size when they differ, as the official VGG path does), reduced to
``reduce_dim`` channels; "high-level" features are ``layer4``, used parameter-free for the prior
mask. Supports run ``layer4`` on ``layer3 * mask`` as the official code does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from ..model import FewShotHead, SupportCache, masked_average_pool

COSINE_EPS = 1e-7


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True`` (the FSS repos' convention); no-op at equal size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def conv_relu(cin: int, cout: int, kernel_size: int = 1, dropout: float = 0.0) -> nn.Sequential:
    """``Conv2d(bias=False) -> ReLU [-> Dropout2d]`` (keys ``0.weight``)."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
                               nn.ReLU(inplace=True)]
    if dropout:
        layers.append(nn.Dropout2d(p=dropout))
    return nn.Sequential(*layers)


def double_conv3x3(dim: int) -> nn.Sequential:
    """Two ``3x3`` convs without bias, each followed by ReLU (keys ``0.weight``, ``2.weight``):
    PFENet's ``beta_conv``/``res2``, BAM's ``res2_meta``."""
    return nn.Sequential(
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True),
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True),
    )


def classifier(dim: int, classes: int = 2) -> nn.Sequential:
    """``3x3 conv -> ReLU -> Dropout2d(0.1) -> 1x1 conv with bias`` (keys ``0.weight``, ``3.weight``,
    ``3.bias``): PFENet's ``cls``/``inner_cls``, BAM's ``cls_meta``."""
    return nn.Sequential(
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(p=0.1),
        nn.Conv2d(dim, classes, 1),
    )


class ASPP(nn.Module):
    """BAM's ASPP: a global-pooling branch and four conv branches (1x1, 3x3 at dilation 6/12/18), all
    with bias and ReLU. ``[N, C, h, w] -> [N, 5C, h, w]`` ordered (global, 1x1, d6, d12, d18).

    Keys ``layer6_{0..4}.0.{weight,bias}``.
    """

    def __init__(self, dim: int = 256) -> None:
        super().__init__()

        def branch(kernel_size: int, dilation: int) -> nn.Sequential:
            pad = dilation if kernel_size == 3 else 0
            return nn.Sequential(nn.Conv2d(dim, dim, kernel_size, padding=pad, dilation=dilation, bias=True), nn.ReLU())

        self.layer6_0 = branch(1, 1)
        self.layer6_1 = branch(1, 1)
        self.layer6_2 = branch(3, 6)
        self.layer6_3 = branch(3, 12)
        self.layer6_4 = branch(3, 18)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pooled = self.layer6_0(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, h, w)
        return torch.cat([pooled, self.layer6_1(x), self.layer6_2(x), self.layer6_3(x), self.layer6_4(x)], dim=1)


class PPM(nn.Module):
    """PSPNet's pyramid pooling module: ``[N, C, h, w] -> [N, C + len(bins) * reduction, h, w]``.

    Keys ``features.{i}.1.weight`` (1x1 conv) and ``features.{i}.2.*`` (BatchNorm).
    """

    def __init__(self, in_dim: int, reduction_dim: int, bins: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.features = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),
                nn.Conv2d(in_dim, reduction_dim, 1, bias=False),
                nn.BatchNorm2d(reduction_dim),
                nn.ReLU(inplace=True),
            )
            for b in bins
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [resize(f(x), x.shape[-2:]) for f in self.features], dim=1)


def psp_classifier(in_dim: int, classes: int) -> nn.Sequential:
    """PSPNet's ``cls``: ``3x3 conv(2C -> 512) -> BN -> ReLU -> Dropout2d(0.1) -> 1x1 conv`` (keys
    ``0.weight``, ``1.*``, ``4.weight``, ``4.bias``)."""
    return nn.Sequential(
        nn.Conv2d(in_dim, 512, 3, padding=1, bias=False), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
        nn.Dropout2d(p=0.1), nn.Conv2d(512, classes, 1),
    )


def gram_matrix(feat: torch.Tensor) -> torch.Tensor:
    """BAM's normalised Gram matrix: ``[N, C, h, w] -> [N, C, C]``, entries cosine similarities of
    channel maps."""
    f = feat.flatten(2)
    norm = f.norm(2, dim=2, keepdim=True)
    return torch.bmm(f, f.transpose(1, 2)) / (torch.bmm(norm, norm.transpose(1, 2)) + COSINE_EPS)


def prior_mask(query_feat: torch.Tensor, supp_feat: torch.Tensor) -> torch.Tensor:
    """PFENet's training-free prior: for each query position, the highest cosine similarity to any
    (masked) support position, min-max normalised over the query image.

    Args:
        query_feat: ``[B, C, h, w]`` query ``layer4`` features.
        supp_feat: ``[B, K, C, h', w']`` support ``layer4`` features, already multiplied by the mask.

    Returns:
        ``[B, K, h, w]`` in ``[0, 1]``, one prior per shot.
    """
    b, k = supp_feat.shape[:2]
    h, w = query_feat.shape[-2:]
    q = query_feat.flatten(2).unsqueeze(1)  # [B, 1, C, hw]
    s = supp_feat.flatten(3).transpose(2, 3)  # [B, K, h'w', C]
    norms = torch.matmul(s.norm(2, dim=3, keepdim=True), q.norm(2, dim=2, keepdim=True))
    sim = (torch.matmul(s, q) / (norms + COSINE_EPS)).max(2)[0]  # [B, K, hw]
    lo, hi = sim.min(2, keepdim=True)[0], sim.max(2, keepdim=True)[0]
    return ((sim - lo) / (hi - lo + COSINE_EPS)).view(b, k, h, w)


class PriorGuidedHead(FewShotHead):
    """Common part of PFENet, the SVF baseline and BAM: reduced mid-level features of query
    (``down_query``) and supports (``down_supp``), per-shot masked-average prototypes, and the
    per-shot ``layer4`` prior mask.

    Args:
        mid_channels: ``C(layer3) + C(layer2)`` (``fea_dim``: 1536 ResNet-50, 768 VGG-16).
        reduce_dim: width of the head (256 in all official models).
    """

    def __init__(self, mid_channels: int, reduce_dim: int = 256) -> None:
        super().__init__()
        self.reduce_dim = reduce_dim
        self.down_query = conv_relu(mid_channels, reduce_dim, dropout=0.5)
        self.down_supp = conv_relu(mid_channels, reduce_dim, dropout=0.5)

    @staticmethod
    def mid_level(feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """``cat(layer3, layer2)`` at layer3's resolution: ``[N, C3 + C2, h, w]``."""
        f3 = feats["layer3"]
        return torch.cat([f3, resize(feats["layer2"], f3.shape[-2:])], dim=1)

    def query_features(self, backbone: Backbone, query: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backbone stages of ``query [B, 3, H, W]`` plus ``"reduced"`` (``down_query`` output,
        ``[B, reduce_dim, h, w]``)."""
        feats = backbone(query)
        feats["reduced"] = self.down_query(self.mid_level(feats))
        return feats

    def support_features(
        self, backbone: Backbone, supports: torch.Tensor, masks: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Run the supports through the backbone as the official code does.

        Args:
            supports: ``[N, 3, H, W]`` (shots flattened into the batch).
            masks: ``[N, H, W]``; only pixels equal to 1 are foreground (ignore counts as background).

        Returns:
            ``(feats, prototypes)``: stage features (``layer4`` computed on ``layer3 * fg``, then
            multiplied by the mask resized to its own size) and the masked-average prototypes of
            the reduced features, ``[N, reduce_dim]``.
        """
        fg = (masks == 1).float().unsqueeze(1)
        x = supports
        feats: dict[str, torch.Tensor] = {}
        for name in ("layer0", "layer1", "layer2", "layer3"):
            x = getattr(backbone, name)(x)
            feats[name] = x
        fg3 = resize(fg, x.shape[-2:])
        f4 = backbone.layer4(x * fg3)
        feats["layer4"] = f4 * resize(fg, f4.shape[-2:])
        reduced = self.down_supp(self.mid_level(feats))
        return feats, masked_average_pool(reduced, fg3).flatten(1)

    def encode_supports(self, backbone: Backbone, supports: torch.Tensor, masks: torch.Tensor) -> SupportCache:
        """Cache: ``prototypes [B, K, reduce_dim]`` and masked ``supp_feat4 [B, K, C4, h4, w4]``."""
        b, k = supports.shape[:2]
        feats, prototypes = self.support_features(backbone, supports.flatten(0, 1), masks.flatten(0, 1))
        f4 = feats["layer4"]
        return {
            "prototypes": prototypes.view(b, k, -1),
            "supp_feat4": f4.view(b, k, *f4.shape[1:]),
        }

    @staticmethod
    def priors(query_feats: dict[str, torch.Tensor], cache: SupportCache) -> torch.Tensor:
        """Per-shot prior masks at the reduced features' size: ``[B, K, h, w]``."""
        prior = prior_mask(query_feats["layer4"], cache["supp_feat4"])
        return resize(prior, query_feats["reduced"].shape[-2:])
