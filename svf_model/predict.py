"""Command line: segment query photos from 1-5 (or more) annotated support photos.

Example::

    python -m svf_model.predict --support cat1.jpg:cat1_mask.png --support cat2.jpg:cat2_mask.png \\
        --query street.jpg --query sofa.jpg --out results/ [--adapt-steps 10]

For every query it writes ``<stem>_mask.png`` (white = foreground), ``<stem>_overlay.jpg`` and
``<stem>_prob.png`` (foreground probability, 0-255) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .imageio import InputError, load_image
from .weights import CheckpointError


def overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (255, 40, 40),
            alpha: float = 0.5) -> np.ndarray:
    """``uint8 [H, W, 3]`` image with ``bool [H, W]`` mask tinted in ``colour``."""
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
    return out.clip(0, 255).astype(np.uint8)


def _parse_support(text: str) -> tuple[str, str]:
    image, sep, mask = text.rpartition(":")
    if not sep or not image or not mask:
        raise argparse.ArgumentTypeError(f"--support expects IMAGE:MASK, got {text!r}")
    return image, mask


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m svf_model.predict",
        description="Few-shot segmentation: paint the object on 1-5 support photos (mask files, "
                    "white = foreground), get it segmented on query photos.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="registered model name (default: the registry's default; "
                                     "see --list-models)")
    src.add_argument("--checkpoint", help="path to a model.safetensors written by svf_model.train")
    p.add_argument("--list-models", action="store_true", help="print the registered models and exit")
    p.add_argument("--support", action="append", type=_parse_support, default=[], metavar="IMG:MASK",
                   help="a support photo and its mask (nonzero = foreground); repeat for more shots")
    p.add_argument("--query", action="append", default=[], metavar="IMG", help="a query photo; repeatable")
    p.add_argument("--out", default="predictions", help="output folder (created; default: %(default)s)")
    p.add_argument("--size", type=int, default=None, help="letterbox size (default: the model's)")
    p.add_argument("--threshold", type=float, default=0.5, help="foreground probability threshold")
    p.add_argument("--adapt-steps", type=int, default=0,
                   help="SVF adaptation steps on the supports before predicting (0: none)")
    p.add_argument("--adapt-lr", type=float, default=None, help="adaptation learning rate (default: measured)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast precision (bf16 on CPU or GPU, fp16 on GPU)")
    p.add_argument("--save-svf", default=None, metavar="PATH",
                   help="write the adapted singular values (safetensors) here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .registry import list_models, load_model

    if args.list_models:
        print("\n".join(list_models()))
        return 0
    if not args.support or not args.query:
        print("error: give at least one --support IMG:MASK and one --query IMG", file=sys.stderr)
        return 2
    from .adapt import AdaptConfig
    from .predictor import Predictor

    try:
        if args.checkpoint:
            from .checkpoint import load_checkpoint

            model, meta = load_checkpoint(args.checkpoint)
            size, name = int(meta.get("image_size", 473)), Path(args.checkpoint).stem
        else:
            model, entry = load_model(args.model)
            size, name = entry.image_size, entry.name
        predictor = Predictor(model, image_size=args.size or size, device=args.device,
                              precision=args.precision, model_name=name)
        predictor.set_supports([s[0] for s in args.support], [s[1] for s in args.support])
        report: dict = {"model": name, "image_size": predictor.image_size, "queries": []}
        if args.adapt_steps > 0:
            config = AdaptConfig(steps=args.adapt_steps)
            if args.adapt_lr is not None:
                config.lr = args.adapt_lr
            result = predictor.adapt(config, progress=lambda p: print(
                f"adapt step {p.step}/{p.steps} loss {p.loss:.4f} {p.seconds:.1f}s", file=sys.stderr))
            report["adapt"] = {"steps": result.steps, "seconds": result.seconds, "skipped": result.skipped}
            if args.save_svf:
                predictor.export_svf(args.save_svf)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for query in args.query:
            image = load_image(query)
            pred = predictor.predict(image, threshold=args.threshold)
            stem = Path(query).stem
            Image.fromarray(pred.mask.astype(np.uint8) * 255).save(out / f"{stem}_mask.png")
            Image.fromarray((pred.prob * 255 + 0.5).astype(np.uint8)).save(out / f"{stem}_prob.png")
            Image.fromarray(overlay(image, pred.mask)).save(out / f"{stem}_overlay.jpg", quality=92)
            report["queries"].append({"query": query, "foreground_fraction": float(pred.mask.mean()),
                                      "seconds": pred.seconds})
        print(json.dumps(report, indent=2))
    except (InputError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
