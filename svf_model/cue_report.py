"""Cue report of one :class:`~svf_model.predictor.Predictor`: how its adaptation changed each SVF
layer's singular values, and where the components that rose or fell most respond on an image."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .cues import LayerChange, cue_maps, singular_value_changes
from .imageio import ImageLike, load_image
from .predictor import Predictor
from .preprocess import fitted_size, letterbox_image


@dataclass
class Cue:
    """One singular component: its index in the layer, relative change, response map ``[h, w]`` in [0, 1]."""

    index: int
    change: float
    heat: np.ndarray

    @property
    def caption(self) -> str:
        return f"#{self.index}  {self.change * 100:+.1f}%"


@dataclass
class CueReport:
    layer: LayerChange
    rising: list[Cue] = field(default_factory=list)  # largest rise first
    falling: list[Cue] = field(default_factory=list)  # largest fall first


def layer_changes(predictor: Predictor) -> list[LayerChange]:
    """Per-layer singular-value changes of the predictor against its model's own values, most-changed
    first: the layers whose values moved (layers that were not adapted, such as other stages or frozen
    depthwise values, are left out), or every SVF layer when none moved."""
    changes = singular_value_changes(predictor.model.backbone, predictor.base_values(), predictor.svf_values())
    return [c for c in changes if c.changed] or changes


def cue_report(
    predictor: Predictor,
    image: ImageLike,
    layer: str | LayerChange | None = None,
    k: int = 4,
    changes: list[LayerChange] | None = None,
) -> CueReport:
    """Cue maps of the ``k`` most-risen and ``k`` most-fallen components of ``layer`` on ``image``.

    Args:
        predictor: an (adapted) predictor; its singular values are the ones visualised.
        image: the image to look at (path, PIL or ``[H, W(, C)]`` array).
        layer: module path, label or :class:`LayerChange` (``None``: the layer that changed most).
        k: components per direction (only those that actually moved that way are returned).
        changes: precomputed :func:`layer_changes` (saves recomputing them).

    Returns:
        a :class:`CueReport` whose maps have the image's original ``(H, W)``.
    """
    changes = changes if changes is not None else layer_changes(predictor)
    if not changes:
        raise ValueError("the predictor's model has no SVF layers")
    if layer is None:
        chosen = changes[0]
    elif isinstance(layer, LayerChange):
        chosen = layer
    else:
        matches = [c for c in changes if layer in (c.name, c.label)]
        if not matches:
            raise KeyError(f"no SVF layer named {layer!r}")
        chosen = matches[0]
    rising, falling = chosen.top(k, rising=True), chosen.top(k, rising=False)
    report = CueReport(chosen)
    picked = rising + falling
    if not picked:
        return report
    maps = component_maps(predictor, image, chosen.name, [i for i, _ in picked])
    cues = [Cue(i, c, m) for (i, c), m in zip(picked, maps, strict=True)]
    report.rising, report.falling = cues[: len(rising)], cues[len(rising):]
    return report


def component_maps(predictor: Predictor, image: ImageLike, layer: str, components: list[int]) -> np.ndarray:
    """Cue maps of ``components`` of the SVF layer ``layer`` (module path or label) on ``image``,
    with the predictor's own singular values, as the panel draws them.

    Returns:
        ``float32 [len(components), H, W]`` in ``[0, 1]``, ``(H, W)`` the image's original size.
    """
    img = load_image(image)
    h, w = img.shape[:2]
    size = predictor.image_size
    backbone = predictor.model.backbone
    x = letterbox_image(img, size, backbone.mean, backbone.std)[None].to(predictor.device)
    with predictor._active(), torch.no_grad():
        return cue_maps(backbone, layer, x, components, (h, w), fitted_size(h, w, size))
