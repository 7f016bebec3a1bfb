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

from .adapt import default_step_text
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
    p.add_argument("--adapt-lr", type=float, default=None,
                   help=f"adaptation learning rate (default: {default_step_text()})")
    p.add_argument("--no-gate", action="store_true",
                   help="keep the adaptation even when it does not improve the shots' cross-check "
                        "(each shot segmented from the others); by default such an adaptation is undone")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--flip", action="store_true",
                   help="also segment each query mirrored and average the two (as the app does; twice the time)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast precision (bf16 on CPU or GPU, fp16 on GPU)")
    p.add_argument("--save-svf", default=None, metavar="PATH",
                   help="write the adapted singular values (safetensors) here")
    return p


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments before any model is loaded (``None``: nothing)."""
    if not args.support or not args.query:
        return "give at least one --support IMG:MASK and one --query IMG"
    if args.size is not None and args.size < 32:
        return f"--size {args.size} is too small (at least 32)"
    if args.save_svf and args.adapt_steps <= 0:
        return "--save-svf writes adapted singular values: give --adapt-steps N with N > 0"
    files = [f for pair in args.support for f in pair] + list(args.query)
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        return f"file not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    if args.device and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return f"--device {args.device}: no CUDA GPU is available here (use --device cpu)"
    return None


def _output_stem(query: str, taken: set[str]) -> str:
    """The query's file stem, made unique among the outputs written so far (``x``, ``x-2``, ...)."""
    stem, n = Path(query).stem, 1
    unique = stem
    while unique in taken:
        n += 1
        unique = f"{stem}-{n}"
    taken.add(unique)
    return unique


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .registry import list_models, load_model

    if args.list_models:
        print("\n".join(list_models()))
        return 0
    problem = _usage_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
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
                              precision=args.precision, model_name=name, flip=args.flip)
        predictor.set_supports([s[0] for s in args.support], [s[1] for s in args.support])
        report: dict = {"model": name, "image_size": predictor.image_size, "flip": args.flip, "queries": []}
        if args.adapt_steps > 0:
            config = AdaptConfig(steps=args.adapt_steps, gate="off" if args.no_gate else "support")
            if config.image_size is not None:  # never upsample the letterboxed supports to adapt
                config.image_size = min(config.image_size, predictor.image_size)
            if args.adapt_lr is not None:
                config.lr = args.adapt_lr
            result = predictor.adapt(config, progress=lambda p: print(
                f"adapt step {p.step}/{p.steps} loss {p.loss:.4f} {p.seconds:.1f}s", file=sys.stderr))
            report["adapt"] = {"steps": result.steps, "seconds": result.seconds, "skipped": result.skipped,
                               **result.gate_fields()}
            if result.gate_message:
                print(result.gate_message, file=sys.stderr)
            if args.save_svf:
                predictor.export_svf(args.save_svf)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        taken: set[str] = set()
        for query in args.query:
            image = load_image(query)
            pred = predictor.predict(image, threshold=args.threshold)
            stem = _output_stem(query, taken)
            Image.fromarray(pred.mask.astype(np.uint8) * 255).save(out / f"{stem}_mask.png")
            Image.fromarray((pred.prob * 255 + 0.5).astype(np.uint8)).save(out / f"{stem}_prob.png")
            Image.fromarray(overlay(image, pred.mask)).save(out / f"{stem}_overlay.jpg", quality=92)
            report["queries"].append({"query": query, "mask": str(out / f"{stem}_mask.png"),
                                      "foreground_fraction": float(pred.mask.mean()),
                                      "seconds": pred.seconds})
        print(json.dumps(report, indent=2))
    except (InputError, CheckpointError, OSError) as exc:  # OSError: an output that cannot be written
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
