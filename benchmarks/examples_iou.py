"""IoU of registry models on the app's example photos: everyday objects that are not in fss-dev.

The bundled examples (``assets/``, scikit-image and matplotlib photos with hand-made masks) hold three
photos of people, two of a motorcycle and two of coins. Every photo of a group is segmented from the
others: 1 shot (each photo as the support of each other one: 10 episodes) and, for the people,
2 shots (two photos as supports of the third: 3 episodes). Far too few episodes for a mean to mean
much; it is a check that a model still segments everyday objects, run in seconds. With ``--adapt``
each episode is also scored after adapting on its shots with the defaults (then reset), and
``--adapt-grouped`` says how a registry model's depthwise convs are decomposed (as in
``svf_model.evaluate``).

    HF_HUB_OFFLINE=1 python benchmarks/examples_iou.py [--models NAME|FILE.safetensors ...] [--size 321] \
        [--adapt [--adapt-grouped none|kernel|...]] [--flip] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from svf_model.adapt import AdaptConfig  # noqa: E402
from svf_model.checkpoint import load_checkpoint  # noqa: E402
from svf_model.evaluate import add_grouped_argument  # noqa: E402
from svf_model.predictor import Predictor  # noqa: E402
from svf_model.registry import list_models, load_model  # noqa: E402

GROUPS = {
    "person": ["astronaut.jpg", "grace_hopper.jpg", "camera.png"],
    "motorcycle": ["motorcycle_left.jpg", "motorcycle_right.jpg"],
    "coins": ["coins_top.png", "coins_bottom.png"],
}


def _pair(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(image [H, W, 3] uint8, mask [H, W] bool)`` of an asset photo."""
    image = np.asarray(Image.open(REPO / "assets" / "photos" / name).convert("RGB"))
    mask = np.asarray(Image.open(REPO / "assets" / "masks" / f"{Path(name).stem}.png")) > 127
    return image, mask


def episodes() -> list[tuple[str, list[str], str]]:
    """``(group, support photos, query photo)``: 1-shot pairs in both directions, 2-shot for people."""
    out = []
    for group, photos in GROUPS.items():
        for support, query in itertools.permutations(photos, 2):
            out.append((group, [support], query))
        if len(photos) >= 3:
            for query in photos:
                out.append((group, [p for p in photos if p != query], query))
    return out


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def run(model_name: str, size: int | None, adapt: bool = False, grouped: str | None = None,
        flip: bool = False) -> list[dict]:
    """``model_name``: a registry name or a model file (``.safetensors``, e.g. a training run's); with
    ``adapt`` each row also holds ``iou_after`` (adapted with the defaults on the episode's shots);
    ``flip``: each query also segmented mirrored (``Predictor.flip``, as the app does)."""
    if model_name.endswith(".safetensors"):
        model, meta = load_checkpoint(model_name)
        default_size, name = meta.get("image_size", 321), Path(model_name).name
    else:
        model, entry = load_model(model_name, adapt_grouped=grouped)
        default_size, name = entry.image_size, entry.name
    predictor = Predictor(model, image_size=size or default_size, device="cpu", model_name=name, flip=flip)
    rows = []
    for group, supports, query in episodes():
        pairs = [_pair(s) for s in supports]
        predictor.set_supports([im for im, _ in pairs], [m for _, m in pairs])
        image, gt = _pair(query)
        rows.append({"group": group, "supports": supports, "query": query,
                     "iou": iou(predictor.predict(image).mask, gt)})
        if adapt:
            result = predictor.adapt(AdaptConfig(time_budget_s=None))
            rows[-1].update(iou_after=iou(predictor.predict(image).mask, gt), reverted=result.reverted,
                            adapt_seconds=result.seconds)
            predictor.reset()
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=None,
                    help="registry names or model files (default: every local registry model)")
    ap.add_argument("--size", type=int, default=None, help="letterbox size (default: each model's)")
    ap.add_argument("--adapt", action="store_true", help="also score each episode after adapting on its shots")
    add_grouped_argument(ap, "--adapt-grouped")
    ap.add_argument("--flip", action="store_true", help="also segment each query mirrored, as the app does")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    names = args.models or list_models()
    suffix = " (`--flip`)" if args.flip else ""
    results = {name + suffix: run(name, args.size, args.adapt, args.adapt_grouped, args.flip) for name in names}
    print("| model | 1 shot: mean IoU (10 episodes) | 2 shots: mean IoU (3 episodes) "
          "| person / motorcycle / coins, 1 shot |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        one = [r for r in rows if len(r["supports"]) == 1]
        two = [r for r in rows if len(r["supports"]) == 2]
        by_group = " / ".join(f"{100 * np.mean([r['iou'] for r in one if r['group'] == g]):.1f}" for g in GROUPS)
        print(f"| {name} | {100 * np.mean([r['iou'] for r in one]):.1f} | {100 * np.mean([r['iou'] for r in two]):.1f} "
              f"| {by_group} |")
    if args.adapt:
        print("\n| model | shots | episodes | mean IoU before -> after adapting | change per episode (pts) | undone |")
        print("|---|---|---|---|---|---|")
        for name, rows in results.items():
            for k in (1, 2):
                chosen = [r for r in rows if len(r["supports"]) == k]
                before, after = (np.array([r[key] for r in chosen]) * 100 for key in ("iou", "iou_after"))
                changes = " ".join(f"{d:+.1f}" for d in after - before)
                print(f"| {name} | {k} | {len(chosen)} | {before.mean():.1f} -> {after.mean():.1f} | {changes} | "
                      f"{sum(r['reverted'] for r in chosen)} |")
    report = {"size": args.size, "adapt": args.adapt, "adapt_grouped": args.adapt_grouped, "flip": args.flip,
              "models": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
