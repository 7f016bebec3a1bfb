"""Few-shot evaluation on seeded episodes (PFENet/BAM protocol, see :mod:`svf_model.metrics`).

Command line::

    python -m svf_model.evaluate --model prototype-lite2 --data ../shared/data/fss-dev \\
        --shots 1 --episodes 200 --seed 0 --size 417 --json results.json
    python -m svf_model.evaluate --checkpoint runs/x/model.safetensors --data pascal \\
        --data-root VOC2012 --fold 0 --shots 1 --episodes 1000 --adapt --json out.json

Predictions go through :class:`svf_model.predictor.Predictor` (letterboxed to ``--size``) and are
scored against the label at the query's original size. The JSON holds ``miou``/``fbiou`` (percent),
``per_class`` (percent), ``episodes`` (IoU 0..1 each; for a model with a low-shot fallback also
whether it was used and the supports' two cross-check IoUs), timings, the trivial floors and the
configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import Coco20i, Episode, EpisodeSource, FSSFolder, Pascal5i, make_episodes
from .metrics import FewShotMeter, trivial_meters
from .svf import GROUPED_FOLDS

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# predictors


class _LocalPredictor:
    """Minimal stand-in with the Predictor API, used only if ``svf_model.predictor`` cannot be
    imported: letterbox to ``image_size``, segment, resize back. No adaptation."""

    def __init__(self, model: torch.nn.Module, image_size: int = 473, device: str | None = None) -> None:
        from .preprocess import letterbox_image, letterbox_mask, unletterbox_logits

        self._lb_image, self._lb_mask, self._unlb = letterbox_image, letterbox_mask, unletterbox_logits
        self.device = torch.device(device or "cpu")
        self.model = model.to(self.device).eval()
        self.image_size = image_size
        self._cache = None

    def set_supports(self, images, masks, ignore=None) -> None:  # noqa: ANN001 - Predictor API
        bb = self.model.backbone
        xs = torch.stack([self._lb_image(i, self.image_size, bb.mean, bb.std) for i in images])
        ms = torch.stack([self._lb_mask(np.asarray(m).astype(bool), self.image_size,
                                        None if ignore is None else ignore[k]) for k, m in enumerate(masks)])
        with torch.no_grad():
            self._cache = self.model.encode_supports(xs[None].to(self.device), ms[None].to(self.device))

    def predict(self, image: np.ndarray):  # noqa: ANN201 - Prediction-like
        from types import SimpleNamespace

        h, w = image.shape[:2]
        x = self._lb_image(image, self.image_size, self.model.backbone.mean, self.model.backbone.std)
        with torch.no_grad():
            logits = self.model.segment(x[None].to(self.device), self._cache)
        prob = self._unlb(logits, h, w).softmax(1)[0, 1].cpu().numpy().astype(np.float32)
        return SimpleNamespace(mask=prob > 0.5, prob=prob)

    def adapt(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        raise NotImplementedError("adaptation needs svf_model.predictor.Predictor")

    def reset(self) -> None:
        pass


def make_predictor(model: torch.nn.Module, image_size: int = 473, device: str | None = None,  # noqa: ANN201
                   flip: bool = False):
    """A :class:`svf_model.predictor.Predictor` for ``model`` (or a minimal stand-in without it, which
    refuses ``flip``)."""
    try:
        from .predictor import Predictor
    except ImportError as exc:  # the predictor's own dependencies may be missing in a partial checkout
        if flip:
            raise SystemExit(f"--flip needs svf_model.predictor, which cannot be imported: {exc}") from exc
        logger.warning("svf_model.predictor unavailable (%s): using the minimal evaluation predictor", exc)
        return _LocalPredictor(model, image_size, device)
    return Predictor(model, image_size=image_size, device=device, flip=flip)


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model named by ``--model`` (registry, or a head name on ``--backbone``) or ``--checkpoint``
    -> ``(model, info)``; ``info`` may hold ``image_size``."""
    if args.checkpoint:
        from .checkpoint import load_checkpoint
        from .registry import grouped_fold_of

        fold = grouped_fold_of(getattr(args, "adapt_grouped", None) or "none")
        modules = parse_adapt_options(getattr(args, "adapt_set", [])).get("modules")
        if fold and not modules:
            raise SystemExit("--adapt-grouped with --checkpoint needs the modules that adapt: "
                             "--adapt-set modules=layer4.1")
        model, meta = load_checkpoint(args.checkpoint)
        if fold:
            from .svf import make_adaptable

            make_adaptable(model.backbone, modules, fold)
        return model, {"image_size": int(meta["image_size"]) if "image_size" in meta else None, "meta": meta}
    from .heads import build_head, list_heads

    name = args.model
    try:
        from .registry import adapt_fold, list_models, load_model

        if name is None or name in list_models():
            grouped = getattr(args, "adapt_grouped", None)
            model, entry = load_model(name, adapt_grouped=grouped)
            return model, {"image_size": entry.image_size, "name": entry.name,
                           "adapt_grouped": adapt_fold(entry, grouped) or False}
    except (ImportError, FileNotFoundError):
        pass
    if name in list_heads():
        from .backbones import build_backbone
        from .model import FewShotSegmenter

        backbone = build_backbone(args.backbone).eval()
        return FewShotSegmenter(backbone, build_head(name, backbone)), {"image_size": None}
    raise SystemExit(f"unknown model {name!r}: give a registered model name, a head name or --checkpoint")


def build_predictor(args: argparse.Namespace):  # noqa: ANN201
    """Model + predictor from the command-line arguments (``args.size`` filled in if unset; for a
    registered model ``args.model`` and ``args.adapt_grouped`` say what was loaded)."""
    model, info = build_model(args)
    if args.size is None:
        args.size = info.get("image_size") or 473
    if info.get("name"):
        args.model = info["name"]  # the registry default when --model was not given
        args.adapt_grouped = info["adapt_grouped"]  # the registry's fold when --adapt-grouped was not given
    return make_predictor(model, args.size, args.device, args.flip)


# ---------------------------------------------------------------------------------------------
# data


def build_source(args: argparse.Namespace) -> EpisodeSource:
    """``--data DIR|pascal|coco`` (+ ``--data-root``, ``--fold``, ``--classes``) -> episode source."""
    if args.data in ("pascal", "coco"):
        if not args.data_root:
            raise SystemExit(f"--data {args.data} needs --data-root")
        if args.data == "pascal":
            return Pascal5i(args.data_root, args.fold, "val", list_file=args.list_file, index_cache=args.index_cache)
        return Coco20i(args.data_root, args.fold, "val", class_split=args.coco_split, list_file=args.list_file,
                       index_cache=args.index_cache)
    return FSSFolder(args.data)


# ---------------------------------------------------------------------------------------------
# evaluation


def _adapt(predictor, steps: int | None, options: dict[str, Any] | None) -> Any:  # noqa: ANN001, ANN401
    params = inspect.signature(predictor.adapt).parameters
    if "config" in params:
        from .adapt import AdaptConfig

        kw = dict(options or {})
        if steps is not None:
            kw["steps"] = steps
        return predictor.adapt(AdaptConfig(**kw))
    return predictor.adapt(steps=steps, **(options or {}))


def gate_record(result: Any) -> dict[str, Any]:
    """The support gate's scores and decision from an ``AdaptResult`` (empty without a gate, or for a
    predictor whose ``adapt`` returns something else)."""
    if getattr(result, "support_iou_before", None) is None:
        return {}
    return result.gate_fields()


def parse_adapt_options(items: Sequence[str]) -> dict[str, Any]:
    """``--adapt-set`` items -> AdaptConfig keyword arguments (:func:`svf_model.adapt.parse_config_options`)."""
    from .adapt import parse_config_options

    try:
        return parse_config_options(items)
    except ValueError as exc:
        raise SystemExit(f"--adapt-set {exc}") from exc


def adaptation_change(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per-episode IoU change of adaptation, in points: ``{"mean", "std", "se", "share_losing_5pts",
    "share_gaining_5pts", "episodes"}`` from records holding ``iou_before`` and ``iou_after`` (0..1)."""
    d = np.array([r["iou_after"] - r["iou_before"] for r in records], dtype=np.float64) * 100
    n = len(d)
    std = float(d.std(ddof=1)) if n > 1 else 0.0
    return {"mean": float(d.mean()) if n else float("nan"), "std": std, "se": std / np.sqrt(n) if n else 0.0,
            "share_losing_5pts": float((d < -5).mean()) if n else 0.0,
            "share_gaining_5pts": float((d > 5).mean()) if n else 0.0, "episodes": n}


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": float("nan"), "p90": float("nan")}
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90))}


def evaluate(
    predictor_or_factory,  # noqa: ANN001 - a Predictor or a zero-argument callable returning one
    episodes: Sequence[Episode],
    adapt: bool = False,
    adapt_steps: int | None = None,
    adapt_options: dict[str, Any] | None = None,
    progress: bool = True,
    relpath: Callable[[str], str] | None = None,
    config: dict[str, Any] | None = None,
    memo_bytes: int = 2 << 30,
) -> dict[str, Any]:
    """Evaluate a predictor on episodes.

    Args:
        predictor_or_factory: an object with ``set_supports``/``predict`` (and ``adapt``/``reset``
            with ``adapt=True``), or a callable that returns one.
        episodes: loaded episodes (e.g. an ``EpisodeSet``).
        adapt: also adapt on each episode's supports; the scores are then those after adaptation,
            and ``iou_before``/``miou_before``/``fbiou_before`` those without; each episode also
            records the support gate's scores and decision and ``adapt_steps``, the steps that ran.
        adapt_steps, adapt_options: passed to the predictor's ``adapt`` (``AdaptConfig`` fields).
        relpath: maps paths for the report (e.g. ``source.relpath``).
        config: stored as ``result["config"]``.
        memo_bytes: budget of the backbone's feature memo (:mod:`svf_model.feature_memo`): an
            image used by several episodes is encoded once while the weights are unchanged
            (0 disables it; results are the same up to float rounding).

    Returns:
        ``{"miou", "fbiou", "per_class", "episodes", "seconds_per_episode", ["adapt_seconds",
        "adapt_change", "miou_before", "fbiou_before", "per_class_before"], "floors", "config"}`` (percentages
        except per-episode IoU in 0..1).
    """
    from tqdm.auto import tqdm

    predictor = predictor_or_factory if hasattr(predictor_or_factory, "predict") else predictor_or_factory()
    relpath = relpath or (lambda p: p)
    meter, before = FewShotMeter(), FewShotMeter()
    records: list[dict[str, Any]] = []
    labels: list[tuple[str, np.ndarray]] = []
    infer_seconds: list[float] = []
    adapt_seconds: list[float] = []
    bar = tqdm(range(len(episodes)), desc="episodes", disable=not progress, dynamic_ncols=True)
    backbone = getattr(getattr(predictor, "model", None), "backbone", None)
    memo_scope = contextlib.ExitStack()
    if memo_bytes and hasattr(backbone, "memoize"):
        memo_scope.enter_context(backbone.memoize(memo_bytes))
    with memo_scope:
        for i in bar:
            ep = episodes[i]
            start = time.perf_counter()
            fg, ignore = [m == 1 for m in ep.support_masks], [m == 255 for m in ep.support_masks]
            predictor.set_supports(ep.supports, fg, ignore)
            pred = predictor.predict(ep.query).mask
            record: dict[str, Any] = {
                "class": ep.class_name,
                "supports": [relpath(p) for p in ep.support_paths],
                "query": relpath(ep.query_path),
            }
            if getattr(predictor, "fallback_scores", None) is not None:  # the low-shot fallback's check
                record["low_shot_values"] = predictor.uses_low_shot_values
                record["fallback_scores"] = [round(x, 6) for x in predictor.fallback_scores]
            if adapt:
                record["iou_before"] = before.update(ep.class_name, pred, ep.query_mask)
                t0 = time.perf_counter()
                adaptation = _adapt(predictor, adapt_steps, adapt_options)
                record.update(gate_record(adaptation))
                if isinstance(getattr(adaptation, "steps", None), int):  # fewer than asked when time ran out
                    record["adapt_steps"] = adaptation.steps
                adapt_seconds.append(time.perf_counter() - t0)
                pred = predictor.predict(ep.query).mask
                predictor.reset()
            record["iou"] = meter.update(ep.class_name, pred, ep.query_mask)
            if adapt:
                record["iou_after"] = record["iou"]
            infer_seconds.append(time.perf_counter() - start)
            records.append(record)
            labels.append((ep.class_name, ep.query_mask))
            bar.set_postfix(mIoU=f"{100 * meter.miou:.1f}")
    result: dict[str, Any] = {
        **meter.summary(),
        "episodes": records,
        "seconds_per_episode": float(np.mean(infer_seconds)) if infer_seconds else float("nan"),
    }
    if adapt:
        b = before.summary()
        result.update(miou_before=b["miou"], fbiou_before=b["fbiou"], per_class_before=b["per_class"],
                      adapt_seconds=_quantiles(adapt_seconds), adapt_change=adaptation_change(records))
        gated = [r for r in records if "reverted" in r]
        if gated:
            result["adapt_change"]["share_reverted"] = float(np.mean([r["reverted"] for r in gated]))
    result["floors"] = {name: m.summary() for name, m in trivial_meters(labels).items()}
    result["config"] = dict(config or {})
    return result


def evaluate_trivial(episodes: Sequence[Episode]) -> dict[str, dict[str, Any]]:
    """Scores of the all-foreground and all-background predictors: ``{name: {"miou", "fbiou",
    "per_class"}}`` in percent (the floors a real model must beat)."""
    labels = [(ep.class_name, ep.query_mask) for ep in episodes]
    return {name: m.summary() for name, m in trivial_meters(labels).items()}


def format_table(result: dict[str, Any]) -> str:
    """Per-class IoU table with mIoU, FB-IoU, floors and timings."""
    counts: dict[str, int] = {}
    for r in result["episodes"]:
        counts[r["class"]] = counts.get(r["class"], 0) + 1
    width = max([len(c) for c in result["per_class"]] + [12])
    has_before = "per_class_before" in result
    head = f"{'class':<{width}}  {'episodes':>8}  {'IoU %':>7}" + (f"  {'before %':>8}" if has_before else "")
    lines = [head, "-" * len(head)]
    for c, v in sorted(result["per_class"].items()):
        row = f"{c:<{width}}  {counts.get(c, 0):>8}  {v:>7.2f}"
        if has_before:
            row += f"  {result['per_class_before'][c]:>8.2f}"
        lines.append(row)
    lines.append("-" * len(head))
    lines.append(f"{'mIoU':<{width}}  {len(result['episodes']):>8}  {result['miou']:>7.2f}"
                 + (f"  {result['miou_before']:>8.2f}" if has_before else ""))
    lines.append(f"{'FB-IoU':<{width}}  {'':>8}  {result['fbiou']:>7.2f}"
                 + (f"  {result['fbiou_before']:>8.2f}" if has_before else ""))
    for name, floor in result.get("floors", {}).items():
        lines.append(f"floor {name}: mIoU {floor['miou']:.2f}, FB-IoU {floor['fbiou']:.2f}")
    lines.append(f"seconds per episode: {result['seconds_per_episode']:.3f}")
    if "adapt_seconds" in result:
        a = result["adapt_seconds"]
        lines.append(f"adaptation seconds: median {a['median']:.2f}, p90 {a['p90']:.2f}")
    if "adapt_change" in result:
        c = result["adapt_change"]
        lines.append(f"IoU change per episode (pts): mean {c['mean']:+.2f}, s.d. {c['std']:.2f}, s.e. {c['se']:.2f}; "
                     f"{100 * c['share_losing_5pts']:.1f}% lose > 5 pts, "
                     f"{100 * c['share_gaining_5pts']:.1f}% gain > 5")
        if "share_reverted" in c:
            lines.append(f"support gate: {100 * c['share_reverted']:.1f}% of the adaptations rejected "
                         "(model unchanged)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line


def add_grouped_argument(parser: argparse.ArgumentParser, flag: str) -> None:
    """``flag [per-group|shared|kernel|none]``: the ``adapt_grouped`` of :func:`svf_model.registry.load_model`
    (``None`` when not given: the registry entry's; the bare flag: ``per-group``)."""
    parser.add_argument(flag, nargs="?", const="per-group", default=None, choices=(*GROUPED_FOLDS, "none"),
                        help="how the adapt modules' depthwise convs are decomposed (their "
                             "values adapt as AdaptConfig.grouped says): group by group, with 'shared' as one "
                             "filter bank (shared basis filters), with 'kernel' each depthwise filter as a kh x kw "
                             "matrix (its separable components' weights), or 'none' (not decomposed); default: "
                             "the registry entry's (with a checkpoint file: none)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m svf_model.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="registered model name (default: the registry default) or a head "
                                       "name (e.g. prototype) built on --backbone")
    which.add_argument("--checkpoint", help="a model.safetensors written by svf_model.train")
    p.add_argument("--backbone", default="efficientnet_lite2", help="backbone when --model is a head name")
    p.add_argument("--data", required=True, help="an FSS-1000-layout folder, or 'pascal' / 'coco'")
    p.add_argument("--data-root", help="dataset root for --data pascal/coco")
    p.add_argument("--fold", type=int, default=0, help="PASCAL-5i / COCO-20i fold (0..3)")
    p.add_argument("--coco-split", default="interleaved", choices=["interleaved", "contiguous"],
                   help="COCO-20i class split: interleaved = {4k+fold+1} (PFENet/BAM split COCO, HSNet); "
                        "contiguous = 20*fold+1..20*fold+20 (PANet)")
    p.add_argument("--list-file", help="explicit image list for pascal/coco")
    p.add_argument("--index-cache", help="JSON cache of the pascal/coco label index")
    p.add_argument("--classes", nargs="+", help="only these classes")
    p.add_argument("--sampling", choices=["balanced", "class", "image"],
                   help="episode sampling (default: balanced for folders, image for pascal/coco)")
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="letterbox size (default: the model's, else 473)")
    p.add_argument("--adapt", action="store_true", help="adapt the singular values on each episode's supports")
    add_grouped_argument(p, "--adapt-grouped")
    p.add_argument("--adapt-steps", type=int, default=None, help="adaptation steps (default: AdaptConfig's)")
    p.add_argument("--adapt-set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="other AdaptConfig fields, e.g. --adapt-set objective=head one_shot=views lr=0.01")
    p.add_argument("--flip", action="store_true",
                   help="also segment each query mirrored and average the probabilities (as the app does)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", required=True, help="output JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--memo-gb", type=float, default=2.0,
                   help="feature memo budget: images shared by episodes are encoded once (0: off)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    adapt_options = parse_adapt_options(args.adapt_set)  # refuse a bad option before loading anything
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    source = build_source(args)
    episodes = make_episodes(source, args.episodes, args.shots, args.seed, args.classes, args.sampling)
    predictor = build_predictor(args)
    config = {k: v for k, v in vars(args).items() if k not in ("quiet",)}
    config.update(sampling=args.sampling or source.default_mode, torch=torch.__version__,
                  device_used=str(getattr(predictor, "device", args.device)), data_root_resolved=str(source.root))
    if args.adapt:  # every AdaptConfig field (modules None: the registry's), so later defaults cannot relabel a run
        from .adapt import AdaptConfig

        steps = {} if args.adapt_steps is None else {"steps": args.adapt_steps}
        config["adapt_config"] = dataclasses.asdict(AdaptConfig(**{**adapt_options, **steps}).resolved(args.shots))
    result = evaluate(predictor, episodes, adapt=args.adapt, adapt_steps=args.adapt_steps,
                      adapt_options=adapt_options,
                      progress=not args.quiet, relpath=source.relpath, config=config,
                      memo_bytes=int(args.memo_gb * (1 << 30)))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    print(f"wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
