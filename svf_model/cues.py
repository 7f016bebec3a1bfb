"""Singular-value cue analysis (SVF paper, Figs. 4-6): which backbone components an adaptation
turned up and down (the paper's foreground and background cues; benchmarks/cue_foreground.py checks
that reading on labelled photos), and where on an image they respond."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import Backbone
from .svf import SVFLayer, svf_layers


@dataclass
class LayerChange:
    """Singular values of one SVF layer before and after an adaptation.

    ``name`` is the module path in the backbone, ``label`` what a person reads,
    e.g. ``"layer3.5.conv2 (3x3)"``.
    """

    name: str
    label: str
    before: np.ndarray  # [R]
    after: np.ndarray  # [R]

    @property
    def absolute(self) -> np.ndarray:
        return self.after - self.before

    @property
    def relative(self) -> np.ndarray:
        return self.absolute / np.maximum(np.abs(self.before), 1e-12)

    @property
    def changed(self) -> bool:
        """Whether any singular value of the layer moved."""
        return bool(np.any(self.after != self.before))

    @property
    def score(self) -> float:
        """How much the layer changed: mean absolute relative change."""
        return float(np.abs(self.relative).mean())

    def top(self, k: int = 8, rising: bool = True) -> list[tuple[int, float]]:
        """Components that rose (``rising``) or fell most, by relative change: ``[(index, change)]``
        sorted from the largest change down (only components that moved that way)."""
        rel = self.relative
        order = np.argsort(-rel if rising else rel, kind="stable")[:k]
        return [(int(i), float(rel[i])) for i in order if (rel[i] > 0 if rising else rel[i] < 0)]

    def bar_chart(self, n: int = 30) -> dict[str, list]:
        """The layer's top-``n`` singular values (by their value before): indices, before, after."""
        order = np.argsort(-self.before, kind="stable")[:n]
        return {"index": order.tolist(), "before": self.before[order].tolist(), "after": self.after[order].tolist()}


def _singular_values(layer: SVFLayer, state: dict[str, torch.Tensor], name: str) -> np.ndarray | None:
    """Singular values ``[R]`` of layer ``name`` in an SVF state (keys ``<layer>.s`` or ``<layer>.d``)."""
    if f"{name}.s" in state:
        return state[f"{name}.s"].detach().double().cpu().numpy()
    if f"{name}.d" in state:
        return (layer.sv.s0.detach().double().cpu() * torch.exp(state[f"{name}.d"].detach().double().cpu())).numpy()
    return None


def layer_label(name: str, layer: SVFLayer) -> str:
    return f"{name} ({layer.kind})"


def singular_value_changes(
    backbone: Backbone, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
) -> list[LayerChange]:
    """Per-layer changes between two SVF states (as from :func:`svf_model.delta.svf_state`),
    sorted from the layer that changed most."""
    changes = []
    for name, layer in svf_layers(backbone):
        s_before, s_after = _singular_values(layer, before, name), _singular_values(layer, after, name)
        if s_before is not None and s_after is not None:
            changes.append(LayerChange(name, layer_label(name, layer), s_before, s_after))
    return sorted(changes, key=lambda c: c.score, reverse=True)


def find_layer(backbone: Backbone, name_or_label: str) -> tuple[str, SVFLayer]:
    for name, layer in svf_layers(backbone):
        if name_or_label in (name, layer_label(name, layer)):
            return name, layer
    raise KeyError(f"no SVF layer named {name_or_label!r}")


@torch.no_grad()
def cue_maps(
    backbone: Backbone,
    layer_name: str,
    image: torch.Tensor,
    components: list[int],
    out_size: tuple[int, int],
    valid_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Response maps of chosen components of one SVF layer on one image.

    The response of component ``r`` is the rank-R intermediate channel ``s_r (V^T x)_r`` of the
    layer's input ``x``; its magnitude is upsampled to the image and min-max normalised.

    Args:
        backbone: the backbone holding the layer, with the singular values to visualise loaded.
        layer_name: module path (or label) of the SVF layer.
        image: ``[1, 3, S, S]`` normalised (letterboxed) input.
        components: component indices.
        out_size: ``(h, w)`` of the returned maps (the original image size).
        valid_size: ``(h', w')`` of the image content inside the letterboxed input (cropped first).

    Returns:
        ``float32 [len(components), h, w]`` in ``[0, 1]``.
    """
    name, layer = find_layer(backbone, layer_name)
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, inputs):  # noqa: ANN001, ANN202 - forward pre-hook signature
        captured["x"] = inputs[0]

    handle = layer.register_forward_pre_hook(hook)
    try:
        backbone(image)
    finally:
        handle.remove()
    resp = layer.components(captured["x"])[:, components].abs().float()  # [1, k, h8, w8]
    size = image.shape[-1]
    if valid_size is not None:
        fh = max(1, round(resp.shape[-2] * valid_size[0] / size))
        fw = max(1, round(resp.shape[-1] * valid_size[1] / size))
        resp = resp[..., :fh, :fw]
    resp = F.interpolate(resp, out_size, mode="bilinear", align_corners=False)[0]
    flat = resp.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return ((resp - lo) / (hi - lo).clamp_min(1e-12)).cpu().numpy().astype(np.float32)
