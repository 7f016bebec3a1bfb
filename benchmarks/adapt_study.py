"""Adaptation study: does SVF adaptation on the user's shots help, and does it beat the alternatives?

On the same seeded episodes of held-out fss-dev classes (the seeded 20% hold-out of
``svf_model.data.fss_folder.split_classes``, seed 0, or ``--classes``; the episodes are those of
``python -m svf_model.evaluate`` with the same classes, shots and seed), for each variant it records the query IoU
before and after adapting on the episode's supports:

* ``svf``: singular values of the registry model's adapt modules (the method);
* ``bn``: BatchNorm affine parameters of the same blocks;
* ``depthwise``: the filters of their depthwise convs (which SVF leaves whole);
* ``dense``: every weight of exactly the convs SVF decomposes, BatchNorm frozen (the paper's
  "fine-tune W" of the same layers);
* ``full``: every weight of the same blocks (the paper's claim: this overfits).

Usage::

    python benchmarks/adapt_study.py --shots 5 --episodes 100 --variants svf:lr=0.01 bn full \\
        --json benchmarks/results/adapt_5shot.json

A variant is ``target[:key=value,...]`` with ``AdaptConfig`` fields (``steps``, ``lr``, ...;
``modules=layer4+layer3.5`` lists module paths). ``--grouped`` says how the grouped (depthwise)
convs of the model's adapt modules are decomposed (``apply_svf(kinds={"grouped"})``: one singular
value per depthwise channel; ``--grouped shared``: the filter bank folded as one matrix, one singular
value per shared basis filter; ``--grouped kernel``: each channel's 3x3 filter decomposed as a 3x3
matrix, three singular values per channel; ``--grouped none``: not at all; default: the registry
entry's ``adapt_grouped``, with ``--checkpoint`` none), and ``svf`` variants train those values as
``AdaptConfig.grouped`` says (by default with one shot only; ``svf:grouped=always`` with any number).
Prints a table (mean IoU change with its standard deviation and standard error, share of episodes
that lose more than 5 IoU points, median/p90 adaptation seconds) and writes JSON after every episode;
``--resume`` continues a study whose JSON an interrupted run left (same arguments, more ``--episodes``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svf_model.adapt import AdaptConfig, adapt_svf, adapted_layers, parse_config_options  # noqa: E402
from svf_model.checkpoint import load_checkpoint  # noqa: E402
from svf_model.data.episodes import EpisodeSet, make_episodes  # noqa: E402
from svf_model.data.fss_folder import FSSFolder, list_classes, split_classes  # noqa: E402
from svf_model.evaluate import add_grouped_argument  # noqa: E402
from svf_model.imageio import load_image  # noqa: E402
from svf_model.predictor import Predictor  # noqa: E402
from svf_model.preprocess import letterbox_image, unletterbox_logits  # noqa: E402
from svf_model.registry import adapt_fold, grouped_fold_of, load_model  # noqa: E402
from svf_model.svf import make_adaptable  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fss-dev"


def parse_variant(text: str) -> tuple[str, AdaptConfig]:
    """``target[:key=value,...]`` -> ``(text, AdaptConfig)`` with no time budget."""
    target, _, opts = text.partition(":")
    options = parse_config_options(list(filter(None, opts.split(","))))
    return text, AdaptConfig(**{"target": target, "time_budget_s": None, **options})


def iou(pred: np.ndarray, label: np.ndarray) -> float:
    valid = label != 255
    fg = (label == 1) & valid
    p = pred & valid
    union = (p | fg).sum()
    return float((p & fg).sum() / union) if union else 1.0


def adapt_other_target(model, predictor: Predictor, config: AdaptConfig, query) -> tuple[np.ndarray, bool]:  # noqa: ANN001
    """Adapt ``config.target`` (``bn``/``full``) of the registry's adapt modules on the predictor's
    supports, segment ``query`` with the adapted model, then put the original blocks back.
    Returns the query's mask and whether the support gate undid the adaptation.

    It runs inside the predictor's ``_active()``, which loads the predictor's own singular values
    (the base ones after ``reset()``) into the shared model first: without it the model would still
    hold the values a preceding ``svf`` variant adapted and predicted with, and this variant would
    start from them."""
    config = dataclasses.replace(config, modules=config.modules or list(model.adapt_modules))
    paths = sorted({name.rsplit(".", 1)[0] for name, _ in adapted_layers(model, config.modules)})
    with predictor._active():
        originals = {p: copy.deepcopy(model.backbone.get_submodule(p)) for p in paths}
        try:
            result = adapt_svf(model, predictor._supports, predictor._support_masks, config)
            return query_mask(model, predictor, query), result.reverted
        finally:
            for path, block in originals.items():
                parent, _, child = path.rpartition(".")
                setattr(model.backbone.get_submodule(parent), child, block)


def query_mask(model, predictor: Predictor, query) -> np.ndarray:  # noqa: ANN001
    """``query``'s foreground mask ``[H, W]`` (bool, probability > 0.5) from ``model`` as it is now,
    with the predictor's supports; for weights the predictor does not hold (the comparison targets)."""
    img = load_image(query)
    x = letterbox_image(img, predictor.image_size, model.backbone.mean, model.backbone.std)
    with torch.no_grad():
        cache = model.encode_supports(predictor._supports[None], predictor._support_masks[None])
        logits = model.segment(x[None], cache)
    return unletterbox_logits(logits, *img.shape[:2]).softmax(1)[0, 1].numpy() > 0.5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, help="registry model (default: the registry default)")
    which.add_argument("--checkpoint", default=None,
                       help="a model file (svf_model.train or svf_model.compose) instead of a registry model")
    ap.add_argument("--adapt-modules", nargs="+", default=["layer4.1"],
                    help="with --checkpoint: the backbone modules that adapt (a registry model lists its own)")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=None, help="letterbox size (default: the model's)")
    ap.add_argument("--variants", nargs="+", default=["svf"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memo-gb", type=float, default=3.0, help="feature memo budget (see svf_model.feature_memo)")
    add_grouped_argument(ap, "--grouped")
    ap.add_argument("--classes", nargs="+", default=None,
                    help="classes to sample episodes from (default: the held-out 20%% of the training split)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--resume", action="store_true",
                    help="keep the episodes --json already holds and run the rest (the study must match)")
    args = ap.parse_args(argv)
    if args.resume and not args.json:
        ap.error("--resume needs --json")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.checkpoint:
        args.grouped = grouped_fold_of(args.grouped or "none") or False
        model, meta = load_checkpoint(args.checkpoint)
        make_adaptable(model.backbone, args.adapt_modules, args.grouped or None)
        model.adapt_modules = list(args.adapt_modules)
        model_name, size = Path(args.checkpoint).name, args.size or int(meta.get("image_size") or 321)
    else:
        model, entry = load_model(args.model, adapt_grouped=args.grouped)
        args.grouped = adapt_fold(entry, args.grouped) or False  # what the file records as svf_grouped
        model_name, size = entry.name, args.size or entry.image_size
    held_out = args.classes or split_classes(list_classes(args.data), 0.2, 0)[1]
    episodes = make_episodes(FSSFolder(args.data), args.episodes, args.shots, args.seed, classes=held_out)
    variants = [(name, config.resolved(args.shots)) for name, config in map(parse_variant, args.variants)]
    predictor = Predictor(model, image_size=size, model_name=model_name)
    rows: dict[str, list[dict]] = {name: [] for name, _ in variants}
    if args.resume and Path(args.json).exists():
        rows = resumed_rows(args.json, args, variants, episodes, model_name, size, held_out)
        print(f"resuming {args.json} after {len(rows[variants[0][0]])} episodes", file=sys.stderr)
    start = time.perf_counter()
    # one model for every variant; the memo re-uses the frozen blocks' features of images seen before
    with model.backbone.memoize(int(args.memo_gb * (1 << 30))):
        for i in range(len(rows[variants[0][0]]), len(episodes)):
            ep = episodes[i]
            predictor.set_supports(ep.supports, [m == 1 for m in ep.support_masks],
                                   [m == 255 for m in ep.support_masks])
            before = iou(predictor.predict(ep.query).mask, ep.query_mask)
            for name, config in variants:
                t0 = time.perf_counter()
                if config.target == "svf":
                    reverted = predictor.adapt(config).reverted
                    after = iou(predictor.predict(ep.query).mask, ep.query_mask)
                    predictor.reset()
                else:
                    mask, reverted = adapt_other_target(model, predictor, config, ep.query)
                    after = iou(mask, ep.query_mask)
                rows[name].append({"class": ep.class_name, "query": os.path.relpath(ep.query_path, args.data),
                                   "iou_before": before, "iou_after": after,
                                   "reverted": reverted, "seconds": time.perf_counter() - t0})
            means = "  ".join(f"{n}: {np.mean([r['iou_after'] - r['iou_before'] for r in rows[n]]) * 100:+.2f}"
                              for n, _ in variants)
            print(f"[{i + 1}/{len(episodes)}] {time.perf_counter() - start:.0f}s  {means}", file=sys.stderr,
                  flush=True)
            if args.json:  # after every episode, so an interrupted study keeps what it measured
                write_json(args.json, summarize(variants, rows), args, i + 1, model_name, size, held_out)

    summary = summarize(variants, rows)
    print(f"\n{args.shots}-shot, {len(episodes)} episodes of {len(held_out)} held-out classes, model "
          f"{model_name}, size {size}\n")
    print("| variant | mean IoU before | mean IoU after | change (pts) | std | s.e. | episodes losing >5 pts "
          "| median s | p90 s |\n|---|---|---|---|---|---|---|---|---|")
    for name, _ in variants:
        s = summary[name]
        print(f"| {name} | {s['mean_before']:.1f} | {s['mean_after']:.1f} | {s['mean_change']:+.2f} | "
              f"{s['std_change']:.2f} | {s['se_change']:.2f} | {100 * s['share_losing_5pts']:.1f}% | "
              f"{s['seconds']['median']:.1f} | {s['seconds']['p90']:.1f} |")
    if args.json:
        write_json(args.json, summary, args, len(episodes), model_name, size, held_out)
    return 0


def resumed_rows(path: str, args: argparse.Namespace, variants: list[tuple[str, AdaptConfig]],
                 episodes: EpisodeSet, model: str, size: int, held_out: list[str]) -> dict[str, list[dict]]:
    """The per-variant episode rows of the study in ``path``, after checking that it is this study:
    same shots, seed, model, decomposition, size, classes and variants, and the same query images
    in the same order. Raises ``SystemExit`` with what differs otherwise."""
    old = json.loads(Path(path).read_text())
    expected = {"shots": args.shots, "seed": args.seed, "model": model, "svf_grouped": args.grouped,
                "image_size": size, "held_out": held_out}
    differ = [f"{k}: file {old.get(k)!r}, asked {v!r}" for k, v in expected.items() if old.get(k) != v]
    names = [name for name, _ in variants]
    if sorted(old["variants"]) != sorted(names):
        differ.append(f"variants: file {sorted(old['variants'])}, asked {sorted(names)}")
    else:
        differ += [f"{name}: the file's config differs" for name, config in variants
                   if old["variants"][name]["config"] != json.loads(json.dumps(config.__dict__))]
    if differ:
        raise SystemExit(f"--resume: {path} holds another study ({'; '.join(differ)})")
    rows = {name: old["variants"][name]["episodes"] for name in names}
    done = min(len(r) for r in rows.values())
    if done > len(episodes):
        raise SystemExit(f"--resume: {path} already holds {done} episodes; ask for more with --episodes")
    for k in range(done):
        query = os.path.relpath(episodes[k].query_path, args.data)
        if any(r[k]["query"] != query for r in rows.values()):
            raise SystemExit(f"--resume: episode {k + 1} of {path} is not this study's ({query})")
    return {name: r[:done] for name, r in rows.items()}


def summarize(variants: list[tuple[str, AdaptConfig]], rows: dict[str, list[dict]]) -> dict[str, dict]:
    """Per variant: its config, mean IoU before/after and change (points) with spread, shares of
    episodes losing/gaining more than 5 points or undone by the gate, seconds, and the episodes."""
    summary = {}
    for name, config in variants:
        r = rows[name]
        delta = np.array([x["iou_after"] - x["iou_before"] for x in r]) * 100
        secs = np.array([x["seconds"] for x in r])
        summary[name] = {
            "config": config.__dict__, "mean_before": float(np.mean([x["iou_before"] for x in r]) * 100),
            "mean_after": float(np.mean([x["iou_after"] for x in r]) * 100), "mean_change": float(delta.mean()),
            "std_change": float(delta.std(ddof=1)) if len(delta) > 1 else 0.0,
            "se_change": float(delta.std(ddof=1) / np.sqrt(len(delta))) if len(delta) > 1 else 0.0,
            "share_losing_5pts": float((delta < -5).mean()), "share_gaining_5pts": float((delta > 5).mean()),
            "share_reverted": float(np.mean([x["reverted"] for x in r])),
            "seconds": {"median": float(np.median(secs)), "p90": float(np.percentile(secs, 90))},
            "episodes": r,
        }
    return summary


def write_json(path: str, summary: dict[str, dict], args: argparse.Namespace, done: int, model: str, size: int,
               held_out: list[str]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"shots": args.shots, "episodes": done, "seed": args.seed, "model": model,
                                      "svf_grouped": args.grouped, "image_size": size, "held_out": held_out,
                                      # bn/full variants start from the base singular values (see
                                      # adapt_other_target); files without this key predate that fix
                                      "comparison_targets_from_base": True,
                                      "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                                      "torch": torch.__version__,
                                      "variants": summary}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
