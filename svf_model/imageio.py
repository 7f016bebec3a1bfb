"""Reading and validating user images and masks: every bad input becomes an :class:`InputError`
with a message a person can act on."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Larger inputs are refused outright (decompression bombs); see ``downscale`` for the soft limit.
MAX_PIXELS = 64_000_000
#: Images whose longer side exceeds this are downscaled before use (the app's documented limit).
MAX_SIDE = 2048

ImageLike = np.ndarray | Image.Image | str | os.PathLike


class InputError(ValueError):
    """A user input (image, mask, shot count) cannot be used; the message says why and what to do."""


def _open(source: str | os.PathLike) -> Image.Image:
    path = Path(source)
    if not path.is_file():
        raise InputError(f"file not found: {path.name}")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path.name} is not a readable image ({exc.__class__.__name__})") from exc
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path.name} is too large (over {MAX_PIXELS // 1_000_000} megapixels)") from exc
    return img


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        hi = 1.0 if np.nanmax(arr, initial=0) <= 1.0 else 255.0
        return np.clip(np.nan_to_num(arr) / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        hi = 255 if arr.max(initial=0) <= 255 else (65535 if arr.max() <= 65535 else int(arr.max()))
        return (arr.astype(np.float64) / hi * 255.0 + 0.5).astype(np.uint8)
    raise InputError(f"unsupported pixel type {arr.dtype}")


def load_image(source: ImageLike) -> np.ndarray:
    """Any image (path, PIL, array; grey, RGBA, palette, 16-bit, float) -> ``uint8 [H, W, 3]`` RGB.

    RGBA is composited on white; 16-bit and float images are rescaled to 8 bits.
    """
    if isinstance(source, (str, os.PathLike)):
        source = _open(source)
    if isinstance(source, Image.Image):
        img = source
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, rgba)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(img)
            arr = _to_uint8(arr.astype(np.int64) if arr.dtype.kind in "iu" else arr)
        else:
            arr = np.asarray(img.convert("RGB"))
    elif isinstance(source, np.ndarray):
        arr = source
    else:
        raise InputError(f"expected an image file, PIL image or array, got {type(source).__name__}")
    arr = _to_uint8(np.asarray(arr))
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.float32) / 255.0
        arr = (arr[:, :, :3] * alpha + 255.0 * (1 - alpha) + 0.5).astype(np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"expected an RGB or grey image, got an array of shape {arr.shape}")
    if min(arr.shape[:2]) < 8:
        raise InputError(f"image is too small ({arr.shape[1]}x{arr.shape[0]}); at least 8x8 pixels")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise InputError(f"image is too large ({arr.shape[1]}x{arr.shape[0]})")
    return np.ascontiguousarray(arr)


def load_mask(source: ImageLike) -> np.ndarray:
    """Mask (path, PIL, array) -> ``bool [H, W]``, True = foreground.

    Grey masks: nonzero is foreground. Colour masks (e.g. a painted layer): any non-black, opaque
    pixel is foreground; RGBA layers use the alpha channel when the colour channels are empty.
    """
    if isinstance(source, (str, os.PathLike)):
        source = _open(source)
    if isinstance(source, Image.Image):
        source = np.asarray(source.convert("RGBA") if source.mode in ("P", "PA", "LA") else source)
    if not isinstance(source, np.ndarray):
        raise InputError(f"expected a mask file, PIL image or array, got {type(source).__name__}")
    arr = np.asarray(source)
    if arr.ndim == 3 and arr.shape[2] == 4:
        colour = arr[:, :, :3].max(axis=2) > 0
        alpha = arr[:, :, 3] > 0
        arr = (colour & alpha) if colour.any() else alpha
    elif arr.ndim == 3:
        arr = arr.max(axis=2) > 0
    elif arr.ndim != 2:
        raise InputError(f"expected a 2-D mask, got an array of shape {arr.shape}")
    return arr.astype(bool) if arr.dtype != bool else arr


def check_mask(mask: np.ndarray, image: np.ndarray, what: str = "mask", ignore: np.ndarray | None = None) -> None:
    """Raise :class:`InputError` if ``mask`` does not fit ``image`` or is empty/full."""
    if mask.shape != image.shape[:2]:
        raise InputError(
            f"{what} is {mask.shape[1]}x{mask.shape[0]} but its image is {image.shape[1]}x{image.shape[0]}: "
            "they must have the same size"
        )
    valid = np.ones_like(mask) if ignore is None else ~ignore.astype(bool)
    fg = int((mask & valid).sum())
    if fg == 0:
        raise InputError(f"{what} is empty: paint the object you want to segment")
    if fg == int(valid.sum()):
        raise InputError(f"{what} covers the whole image: paint only the object, leave some background")


def downscale(image: np.ndarray, max_side: int = MAX_SIDE, nearest: bool = False) -> np.ndarray:
    """Downscale ``[H, W(, C)]`` so its longer side is at most ``max_side`` (no-op otherwise)."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    pil = Image.fromarray(image.astype(np.uint8) * (255 if image.dtype == bool else 1))
    out = np.asarray(pil.resize(size, Image.NEAREST if nearest else Image.BILINEAR))
    return out > 127 if image.dtype == bool else out
