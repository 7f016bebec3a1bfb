"""Pictures for the page: mask overlays, probability and cue heat maps, the singular-value bar chart,
the adaptation progress bar. Pure functions of arrays; nothing here knows about Gradio."""

from __future__ import annotations

import html
from pathlib import Path

import cv2
import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from svf_model.cues import LayerChange

FOREGROUND = (255, 64, 32)
SUPPORT = (40, 200, 90)
PREVIEW_SIDE = 640


def preview(image: np.ndarray, max_side: int = PREVIEW_SIDE) -> np.ndarray:
    """Shrink ``[H, W(, C)]`` for display so galleries stay quick (the downloads keep full size)."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_NEAREST if image.dtype == bool else cv2.INTER_AREA
    out = cv2.resize(image.astype(np.uint8) if image.dtype == bool else image, size, interpolation=interp)
    return out.astype(bool) if image.dtype == bool else out


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """``bool [H, W]`` -> the mask's inner border ``width`` px wide."""
    m = mask.astype(np.uint8)
    return (m - cv2.erode(m, np.ones((3, 3), np.uint8), iterations=width)).astype(bool)


def overlay_mask(
    image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = FOREGROUND, alpha: float = 0.45
) -> np.ndarray:
    """``uint8 [H, W, 3]`` image with ``bool [H, W]`` mask tinted in ``color`` and outlined."""
    out = image.astype(np.float32).copy()
    tint = np.array(color, np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * tint
    out[outline(mask)] = tint
    return out.clip(0, 255).astype(np.uint8)


def heat_map(image: np.ndarray, values: np.ndarray, alpha: float = 0.6, cmap: str = "inferno") -> np.ndarray:
    """``float [H, W]`` values in [0, 1] coloured with ``cmap`` and blended over ``uint8 [H, W, 3]``."""
    colours = matplotlib.colormaps[cmap](np.clip(values, 0.0, 1.0))[..., :3] * 255.0
    grey = image.astype(np.float32).mean(axis=2, keepdims=True)
    return ((1 - alpha) * grey + alpha * colours).clip(0, 255).astype(np.uint8)


def save_mask_png(mask: np.ndarray, path: str | Path) -> Path:
    """Write ``bool [H, W]`` as an 8-bit PNG (255 = foreground, 0 = background)."""
    Image.fromarray(mask.astype(np.uint8) * 255).save(path, optimize=True)
    return Path(path)


def singular_value_figure(change: LayerChange, n: int = 30) -> Figure:
    """Grouped bars of the layer's top-``n`` singular values (by their pretrained size), before and after."""
    bars = change.bar_chart(n)
    index, before, after = bars["index"], np.array(bars["before"]), np.array(bars["after"])
    fig = Figure(figsize=(8.0, 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(index))
    ax.bar(x - 0.2, before, width=0.4, label="pretrained", color="#9aa5b1")
    ax.bar(x + 0.2, after, width=0.4, label="adapted", color="#e8590c")
    ax.set_xticks(x, [str(i) for i in index], fontsize=7, rotation=90)
    ax.set_xlabel("singular component (index in the layer)")
    ax.set_ylabel("singular value")
    ax.set_title(change.label, fontsize=10, loc="right")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return fig


def progress_html(step: int, steps: int, loss: float | None = None, seconds: float = 0.0, note: str = "") -> str:
    """A small self-contained progress bar (inline styles: no page CSS needed)."""
    frac = 0.0 if steps <= 0 else min(1.0, step / steps)
    parts = [f"step {step}/{steps}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    parts.append(f"{seconds:.1f} s")
    if note:
        parts.append(html.escape(note))
    text = " · ".join(parts)
    return (
        f'<div class="svf-progress" data-step="{step}" data-steps="{steps}" '
        'style="border:1px solid #ccc;border-radius:6px;overflow:hidden;position:relative;height:26px;">'
        f'<div style="width:{frac * 100:.1f}%;height:100%;background:#e8590c;opacity:0.75;"></div>'
        '<span style="position:absolute;left:8px;top:3px;font-size:13px;">'
        f"{text}</span></div>"
    )
