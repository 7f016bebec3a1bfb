"""Prototype head with a small learned refinement: a head light enough to meta-train on a CPU.

The logits are the training-free prototype head's (``temperature x cos(feature, prototype)``) plus
a correction computed from four class-agnostic maps only: the two cosine similarities to the
background/foreground prototypes and PFENet's two priors (the best cosine match of each query
position among the support's foreground, and among its background, ``layer4`` positions). The
refinement never sees appearance features, so what it learns (how to sharpen, fill and clean the
similarity maps) does not depend on the training classes. Its last layer starts at zero: before
training the head is exactly the prototype head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from ..model import FewShotHead, SupportCache, leave_one_out_index, resize_mask
from . import register_head
from .blocks import COSINE_EPS, resize
from .prototype import PrototypeHead

CUE_MAPS = 4  # cos(bg), cos(fg), prior(fg), prior(bg)


def region_prior(query: torch.Tensor, support: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """PFENet's prior restricted to a support region: for each query position, the best cosine
    similarity to the support's features multiplied by ``weight``, min-max normalised per map.

    Same values as :func:`svf_model.heads.blocks.prior_mask` on ``support * weight``, computed only
    over the positions where ``weight > 0`` (masked-out positions have zero features, i.e. cosine 0):
    the foreground and background priors together cost one similarity matrix instead of two, and
    letterbox padding costs nothing.

    Args:
        query: ``[B, C, h, w]``; support: ``[B, K, C, h', w']``; weight: ``[B, K, 1, h', w']`` >= 0.

    Returns:
        ``[B, K, h, w]`` in ``[0, 1]``.
    """
    b, k = support.shape[:2]
    q = query.flatten(2)  # [B, C, hw]
    q = q / (q.norm(dim=1, keepdim=True) + COSINE_EPS)
    maps = []
    # unbind, not support[i, j]: under autograd each such index's backward fills a zero gradient of
    # the whole support tensor (benchmarks/adapt_step.py: 1.7x the time of adapting through the whole head).
    for q_i, support_i, weight_i in zip(q.unbind(0), support.flatten(3).unbind(0), weight.flatten(2).unbind(0),
                                        strict=True):
        for s, w in zip(support_i.unbind(0), weight_i.unbind(0), strict=True):  # [C, h'w'], [h'w']
            keep = (w > 0).nonzero().squeeze(1)
            if keep.numel() == 0:
                maps.append(q.new_zeros(q.shape[-1]))
                continue
            s = s[:, keep] * w[keep]
            s = s / (s.norm(dim=0, keepdim=True) + COSINE_EPS)
            sim = (s.T @ q_i).max(0)[0]
            maps.append(sim.clamp(min=0) if keep.numel() < w.numel() else sim)
    sim = torch.stack(maps).view(b, k, -1)
    lo, hi = sim.min(2, keepdim=True)[0], sim.max(2, keepdim=True)[0]
    return ((sim - lo) / (hi - lo + COSINE_EPS)).view(b, k, *query.shape[-2:])


def refinement(width: int, dilations: tuple[int, ...]) -> nn.Sequential:
    """``[N, 4, h, w] -> [N, 2, h, w]``: 3x3 convs (with the given dilations) and ReLUs, then a
    zero-initialised 1x1 conv."""
    layers: list[nn.Module] = []
    cin = CUE_MAPS
    for d in dilations:
        layers += [nn.Conv2d(cin, width, 3, padding=d, dilation=d), nn.ReLU(inplace=True)]
        cin = width
    last = nn.Conv2d(cin, 2, 1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class PrototypeRefineHead(FewShotHead):
    """Prototypes + priors + a learned refinement (about ``10 * width**2`` weights).

    Args:
        stages: backbone stages whose L2-normalised features are concatenated for the prototypes.
        temperature: scale of the cosine similarities.
        prior_stage: stage whose features give the priors (PFENet: the last stage).
        width: channels of the refinement convs.
        dilations: one 3x3 conv per entry, with that dilation.
        min_shots: the refinement applies from this many shots on; with fewer the logits are the
            prototype head's (on fss-dev a single shot's prior was too noisy: README, "Accuracy").
        min_feature_size: the refinement applies only when the feature map's shorter side is at
            least this (the training size: 33 for 257 px at stride 8); on smaller maps, outside what
            it was trained on, the logits are the prototype head's.
    """

    method = "prototype_refine"

    def __init__(self, stages: tuple[str, ...] = ("layer2", "layer3", "layer4"), temperature: float = 20.0,
                 prior_stage: str = "layer4", width: int = 32, dilations: tuple[int, ...] = (1, 2, 4),
                 min_shots: int = 1, min_feature_size: int = 0) -> None:
        super().__init__()
        self.min_shots = min_shots
        self.min_feature_size = min_feature_size
        self.stages = tuple(stages)
        self.temperature = temperature
        self.prior_stage = prior_stage
        self.refine = refinement(width, tuple(dilations))
        self._prototype_only = False
        self._any_shots = False

    @contextlib.contextmanager
    def prototype_only(self) -> Iterator[None]:
        """Inside the block the logits are the prototype head's (no priors, no refinement): the
        cheap objective that adaptation (:mod:`svf_model.adapt`, ``objective="prototype"``) minimises."""
        previous, self._prototype_only = self._prototype_only, True
        try:
            yield
        finally:
            self._prototype_only = previous

    @contextlib.contextmanager
    def refined_from_one_shot(self) -> Iterator[None]:
        """Inside the block the refinement applies from 1 shot on (``min_shots`` ignored): leave-one-out
        checks of few supports (:mod:`svf_model.predictor`) then see the whole head."""
        previous, self._any_shots = self._any_shots, True
        try:
            yield
        finally:
            self._any_shots = previous

    def features(self, backbone: Backbone, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images [N, 3, H, W]`` -> (concatenated normalised stage features ``[N, C, h, w]``,
        prior-stage features ``[N, C4, h, w]``), both at the first stage's resolution."""
        feats = backbone(images)
        size = feats[self.stages[0]].shape[-2:]
        cat = torch.cat([F.normalize(resize(feats[s], size), dim=1) for s in self.stages], dim=1)
        return cat, resize(feats[self.prior_stage], size)

    @staticmethod
    def cache_from_features(feat: torch.Tensor, feat_prior: torch.Tensor, masks: torch.Tensor) -> SupportCache:
        """Support cache from per-shot features ``[N, C, h, w]``, ``[N, C4, h, w]`` and masks
        ``[N, H, W]``: ``prototypes [N, 2, C]``, prior-stage features ``prior_feat [N, C4, h, w]`` and
        the resized masks ``fg``/``bg [N, 1, h, w]``."""
        fg, bg = resize_mask(masks, feat.shape[-2:])
        return {"prototypes": PrototypeHead._prototypes(feat, fg, bg), "prior_feat": feat_prior, "fg": fg, "bg": bg}

    def encode_supports(self, backbone: Backbone, supports: torch.Tensor, masks: torch.Tensor) -> SupportCache:
        """Cache: ``prototypes [B, K, 2, C]``, ``prior_feat [B, K, C4, h, w]``, ``fg``/``bg [B, K, 1, h, w]``."""
        b, k = supports.shape[:2]
        cache = self.cache_from_features(*self.features(backbone, supports.flatten(0, 1)), masks.flatten(0, 1))
        return {name: t.view(b, k, *t.shape[1:]) for name, t in cache.items()}

    def logits_from_features(self, feat: torch.Tensor, feat_prior: torch.Tensor, cache: SupportCache) -> torch.Tensor:
        """Query features ``[B, C, h, w]``, ``[B, C4, h, w]`` + cache (``[B, K, ...]``) -> ``[B, 2, h, w]``."""
        protos = F.normalize(cache["prototypes"].mean(1), dim=-1)  # [B, 2, C]
        cos = torch.einsum("bchw,bkc->bkhw", F.normalize(feat, dim=1), protos)
        if (self._prototype_only or cache["prototypes"].shape[1] < (1 if self._any_shots else self.min_shots)
                or min(feat.shape[-2:]) < self.min_feature_size):
            return self.temperature * cos
        prior_fg = region_prior(feat_prior, cache["prior_feat"], cache["fg"]).mean(1, keepdim=True)
        prior_bg = region_prior(feat_prior, cache["prior_feat"], cache["bg"]).mean(1, keepdim=True)
        cues = torch.cat([cos, prior_fg, prior_bg], dim=1)
        return self.temperature * cos + self.refine(cues)

    def segment(self, backbone: Backbone, query: torch.Tensor, cache: SupportCache, return_aux: bool = False):
        logits = self.logits_from_features(*self.features(backbone, query), cache)
        return (logits, []) if return_aux else logits

    def leave_one_out_logits(self, backbone: Backbone, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One backbone pass for all ``K`` leave-one-out episodes (same result as the generic one)."""
        feat, feat_prior = self.features(backbone, images)
        per_shot = self.cache_from_features(feat, feat_prior, masks)  # [K, ...]
        others = leave_one_out_index(images.shape[0])
        cache = {name: t[others] for name, t in per_shot.items()}  # [K, K-1, ...]
        return self.logits_from_features(feat, feat_prior, cache)

    def cross_logits(
        self, backbone: Backbone, supports: torch.Tensor, masks: torch.Tensor, queries: torch.Tensor
    ) -> torch.Tensor:
        per_shot = self.cache_from_features(*self.features(backbone, supports), masks)
        q = queries.shape[0]
        cache = {name: t[None].expand(q, *t.shape) for name, t in per_shot.items()}
        return self.logits_from_features(*self.features(backbone, queries), cache)


@register_head("prototype_refine")
def build_prototype_refine(backbone: Backbone, **kwargs) -> PrototypeRefineHead:
    return PrototypeRefineHead(**kwargs)
