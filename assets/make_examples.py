"""Rebuild the example photos and masks in ``assets/`` from scikit-image's and matplotlib's bundled data.

Run once (offline): ``python assets/make_examples.py``. Masks come from hand-drawn polygons refined
by OpenCV GrabCut in a narrow band around each polygon (coins: background-subtracted threshold);
``--preview DIR`` also writes overlays to check them by eye. Sources and licences: ``assets/README.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import cv2
import matplotlib.cbook
import numpy as np
import skimage.data
from PIL import Image
from scipy import ndimage as ndi
from skimage.filters import gaussian, threshold_otsu
from skimage.morphology import disk, white_tophat

ASSETS = Path(__file__).resolve().parent

PERSON_ASTRONAUT = [(150, 60), (175, 25), (230, 15), (280, 30), (300, 70), (296, 112), (266, 130), (282, 152),
                    (305, 175), (310, 200), (330, 250), (355, 290), (360, 335), (340, 350), (300, 380), (280, 420),
                    (275, 511), (20, 511), (15, 400), (30, 300), (60, 240), (110, 210), (120, 175), (140, 150),
                    (180, 140), (160, 115), (150, 100)]
PERSON_GRACE = [(150, 150), (160, 60), (200, 35), (260, 25), (320, 40), (360, 80), (370, 140), (360, 200),
                (350, 260), (340, 300), (380, 330), (440, 360), (490, 395), (505, 450), (511, 599), (10, 599),
                (20, 450), (35, 380), (100, 340), (160, 320), (165, 260), (150, 200)]
PERSON_CAMERA = [(0, 235), (40, 170), (100, 125), (150, 100), (170, 70), (205, 58), (235, 70), (252, 100),
                 (258, 140), (270, 150), (300, 190), (310, 235), (290, 265), (250, 300), (200, 312), (170, 330),
                 (150, 380), (150, 511), (0, 511)]
MOTO_LEFT = [(90, 200), (140, 165), (200, 165), (300, 180), (380, 160), (470, 150), (460, 110), (490, 75),
             (560, 95), (580, 140), (555, 175), (575, 265), (640, 290), (680, 340), (690, 400), (650, 445),
             (590, 450), (540, 400), (520, 320), (470, 330), (460, 370), (400, 385), (330, 385), (280, 400),
             (220, 405), (160, 385), (125, 330), (120, 250), (95, 235)]
MOTO_RIGHT = [(x - 50, y) for x, y in MOTO_LEFT]
MOTO_RIGHT[8:12] = [(505, 95), (525, 140), (500, 175), (520, 265)]


def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = ndi.sum(mask, lab, range(1, n + 1))
    return lab == 1 + int(np.argmax(sizes))


def band_grabcut(image: np.ndarray, polygon: list[tuple[int, int]], band: int = 12,
                 fg: tuple = (), bg: tuple = ()) -> np.ndarray:
    """GrabCut restricted to a band of ``band`` px around a hand-drawn polygon -> ``bool [H, W]``."""
    poly = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(poly, [np.array(polygon, np.int32)], 1)
    poly = poly.astype(bool)
    state = np.full(image.shape[:2], cv2.GC_BGD, np.uint8)
    if band > 0:  # scipy treats iterations=0 as "until nothing changes"
        state[ndi.binary_dilation(poly, iterations=band)] = cv2.GC_PR_BGD
    state[poly] = cv2.GC_PR_FGD
    if band > 0:
        state[ndi.binary_erosion(poly, iterations=band)] = cv2.GC_FGD
    for x0, y0, x1, y1 in bg:
        state[y0:y1, x0:x1] = cv2.GC_BGD
    for x0, y0, x1, y1 in fg:
        state[y0:y1, x0:x1] = cv2.GC_FGD
    models = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.grabCut(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), state, None, *models, 8, cv2.GC_INIT_WITH_MASK)
    out = (state == cv2.GC_FGD) | (state == cv2.GC_PR_FGD)
    return ndi.binary_fill_holes(_largest(ndi.binary_opening(out, iterations=2)))


def coin_mask(grey: np.ndarray) -> np.ndarray:
    """Coins on the darker, unevenly lit background: white top-hat, Otsu, fill, open."""
    tophat = white_tophat(gaussian(grey, 1.0, preserve_range=True), disk(45))
    mask = tophat > 0.8 * threshold_otsu(tophat)
    mask = ndi.binary_opening(ndi.binary_fill_holes(ndi.binary_closing(mask, iterations=3)), iterations=3)
    lab, n = ndi.label(mask)
    sizes = ndi.sum(mask, lab, range(1, n + 1))
    return np.isin(lab, 1 + np.where(sizes > 300)[0])


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = 0.5 * out[mask] + 0.5 * np.array([255.0, 0.0, 0.0])
    out[mask ^ ndi.binary_erosion(mask, iterations=2)] = (255, 255, 0)
    return out.astype(np.uint8)


def build(preview: Path | None = None) -> dict:
    photos, masks = ASSETS / "photos", ASSETS / "masks"
    photos.mkdir(exist_ok=True)
    masks.mkdir(exist_ok=True)
    grace_path = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    grace = np.asarray(Image.open(grace_path).convert("RGB"))
    astronaut = skimage.data.astronaut()
    camera = np.repeat(skimage.data.camera()[:, :, None], 3, axis=2)
    left, right, _ = skimage.data.stereo_motorcycle()
    coins = skimage.data.coins()

    items = {
        "astronaut": (astronaut, band_grabcut(astronaut, PERSON_ASTRONAUT)),
        "grace_hopper": (grace, band_grabcut(grace, PERSON_GRACE)),
        "camera": (camera, band_grabcut(camera, PERSON_CAMERA)),
        "motorcycle_left": (left, band_grabcut(left, MOTO_LEFT)),
        "motorcycle_right": (right, band_grabcut(right, MOTO_RIGHT)),
        "coins_top": (np.repeat(coins[:145, :, None], 3, 2), coin_mask(coins)[:145]),
        "coins_bottom": (np.repeat(coins[145:, :, None], 3, 2), coin_mask(coins)[145:]),
    }
    files = {}
    for name, (image, mask) in items.items():
        if name == "grace_hopper":
            shutil.copyfile(grace_path, photos / "grace_hopper.jpg")
            photo = "photos/grace_hopper.jpg"
        elif name in ("camera", "coins_top", "coins_bottom"):
            photo = f"photos/{name}.png"
            Image.fromarray(image[:, :, 0]).save(ASSETS / photo, optimize=True)
        else:
            photo = f"photos/{name}.jpg"
            Image.fromarray(image).save(ASSETS / photo, quality=92)
        Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"{name}.png", optimize=True)
        files[name] = {"photo": photo, "mask": f"masks/{name}.png"}
        if preview is not None:
            preview.mkdir(parents=True, exist_ok=True)
            Image.fromarray(overlay(image, mask)).save(preview / f"{name}.png")

    def pair(name: str) -> dict:
        return dict(files[name])

    examples = {"examples": [
        {"name": "person", "title": "Person: 1 shot (astronaut) -> Grace Hopper, cameraman",
         "supports": [pair("astronaut")], "queries": [pair("grace_hopper"), pair("camera")]},
        {"name": "motorcycle", "title": "Motorcycle: left stereo view -> right view",
         "supports": [pair("motorcycle_left")], "queries": [pair("motorcycle_right")]},
        {"name": "coins", "title": "Coins: top rows -> bottom rows",
         "supports": [pair("coins_top")], "queries": [pair("coins_bottom")]},
    ]}
    (ASSETS / "examples.json").write_text(json.dumps(examples, indent=2) + "\n")
    return examples


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preview", type=Path, default=None, help="also write mask overlays here")
    args = parser.parse_args()
    print(json.dumps(build(args.preview), indent=1))
