"""Do the components an adaptation turns up respond on the object, and those it turns down on the background?

The SVF paper (Figs. 4-6) reads the components whose singular values an adaptation raised most as
*foreground cues* and those it lowered most as *background cues*. This checks that reading on
labelled photos the adaptation never saw (it did not hold up: the app's panel says "Rose most" and
"Fell most" instead).

On seeded episodes of held-out fss-dev classes (the episodes of ``python -m svf_model.evaluate``
with the same classes, shots and seed) it adapts the registry model with its defaults, exactly as the
app's *Adapt* (``Predictor.adapt``), and for every layer whose values moved draws the panel's cue
maps (:func:`svf_model.cue_report.component_maps`, ``k`` components each way, maps in [0, 1] as drawn)
on the episode's query and on its first support. A map's **foreground contrast** is its mean on the
labelled object minus its mean on the background (ignored pixels left out): positive where the
component responds on the object. For reference, ``k`` components drawn at random (seeded) from the
same layer are scored the same way. Adaptations the support gate undid change nothing and are
counted, not scored.

Usage::

    python benchmarks/cue_foreground.py --shots 1 --episodes 100 --seed 21 --threads 1 \\
        --json benchmarks/results/cue_foreground_1shot.json

Prints, per layer (and for the layer the panel opens on, the one that changed most), the mean
contrast of the rising, falling and random components with their standard errors, rising minus
falling paired per episode, and the share of episodes where the rising cues are the more
object-centred; writes every episode's figures to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svf_model.cue_report import component_maps, layer_changes  # noqa: E402
from svf_model.data.episodes import IGNORE, Episode, make_episodes  # noqa: E402
from svf_model.data.fss_folder import FSSFolder, list_classes, split_classes  # noqa: E402
from svf_model.predictor import Predictor  # noqa: E402
from svf_model.registry import load_model  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fss-dev"
PANEL_LAYER = "panel default (most changed)"


def foreground_contrast(heat: np.ndarray, label: np.ndarray) -> float:
    """Mean of ``heat [H, W]`` on the object (``label == 1``) minus its mean on the background
    (``label == 0``); ``nan`` when the label has no object or no background."""
    fg, bg = label == 1, label == 0
    if not fg.any() or not bg.any():
        return float("nan")
    return float(heat[fg].mean() - heat[bg].mean())


def score_episode(predictor: Predictor, ep: Episode, k: int, rng: np.random.Generator) -> dict[str, dict]:
    """``{layer label: {"query"|"support": {"rising", "falling", "random": mean contrast}}}`` of an
    adapted predictor, plus the panel's default layer under :data:`PANEL_LAYER`. ``random`` scores
    ``k`` components of the same layer drawn at random (the reference)."""
    changes = [c for c in layer_changes(predictor) if c.changed]
    out: dict[str, dict] = {}
    for change in changes:
        rising = [i for i, _ in change.top(k, rising=True)]
        falling = [i for i, _ in change.top(k, rising=False)]
        per_image = {}
        images = (("query", ep.query, ep.query_mask), ("support", ep.supports[0], ep.support_masks[0]))
        for where, image, label in images:
            drawn = rng.choice(len(change.after), size=min(k, len(change.after)), replace=False)
            groups = {"rising": rising, "falling": falling, "random": sorted(drawn.tolist())}
            maps = iter(component_maps(predictor, image, change.name, [i for g in groups.values() for i in g]))
            per_image[where] = {kind: float(np.mean([foreground_contrast(next(maps), label) for _ in group]))
                                if group else float("nan") for kind, group in groups.items()}
        out[change.label] = per_image
    if changes:
        out[PANEL_LAYER] = dict(out[changes[0].label], layer=changes[0].label)
    return out


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per layer and image: mean +- s.e. of each contrast (x100), rising minus falling paired, and
    the share of episodes where the rising cues have the larger contrast."""
    scored = [r for r in rows if not r["reverted"]]
    layers = sorted({name for r in scored for name in r["layers"]}, key=lambda n: (n != PANEL_LAYER, n))
    summary: dict[str, dict] = {}
    for name in layers:
        for where in ("query", "support"):
            cells = [r["layers"][name][where] for r in scored if name in r["layers"]]
            entry = {"episodes": len(cells)}
            for kind in ("rising", "falling", "random"):
                v = 100 * np.array([c[kind] for c in cells], dtype=float)
                v = v[np.isfinite(v)]
                entry[kind] = _mean_se(v)
            pairs = 100 * np.array([c["rising"] - c["falling"] for c in cells], dtype=float)
            pairs = pairs[np.isfinite(pairs)]
            entry["rising_minus_falling"] = _mean_se(pairs)
            entry["share_rising_larger"] = float((pairs > 0).mean()) if len(pairs) else float("nan")
            summary[f"{name} | {where}"] = entry
    return summary


def _mean_se(v: np.ndarray) -> dict[str, float]:
    if len(v) == 0:
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "se": se, "n": int(len(v))}


def table(summary: dict[str, dict]) -> str:
    lines = ["| layer | image | episodes | rising cues | falling cues | random components | rising minus falling, "
             "paired | episodes with rising > falling |", "|---|---|---|---|---|---|---|---|"]

    def cell(d: dict) -> str:
        return f"{d['mean']:+.1f} +- {d['se']:.1f}"

    for key, e in summary.items():
        name, where = key.split(" | ")
        lines.append(f"| {name} | {where} | {e['episodes']} | {cell(e['rising'])} | {cell(e['falling'])} | "
                     f"{cell(e['random'])} | {cell(e['rising_minus_falling'])} | "
                     f"{100 * e['share_rising_larger']:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--model", default=None, help="registry model (default: the registry default)")
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--k", type=int, default=4, help="components each way (the app shows 4)")
    ap.add_argument("--classes", nargs="+", default=None,
                    help="classes to sample episodes from (default: the held-out 20%% of the training split)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memo-gb", type=float, default=3.0, help="feature memo budget (see svf_model.feature_memo)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, entry = load_model(args.model)
    held_out = args.classes or split_classes(list_classes(args.data), 0.2, 0)[1]
    episodes = make_episodes(FSSFolder(args.data), args.episodes, args.shots, args.seed, classes=held_out)
    predictor = Predictor(model, image_size=entry.image_size, model_name=entry.name)
    rng = np.random.default_rng(args.seed)
    rows: list[dict] = []
    start = time.perf_counter()
    with model.backbone.memoize(int(args.memo_gb * (1 << 30))):
        for i in range(len(episodes)):
            ep = episodes[i]
            predictor.set_supports(ep.supports, [m == 1 for m in ep.support_masks],
                                   [m == IGNORE for m in ep.support_masks])
            result = predictor.adapt()
            reverted = bool(result.reverted or result.skipped or result.cancelled)
            layers = {} if reverted else score_episode(predictor, ep, args.k, rng)
            predictor.reset()
            rows.append({"class": ep.class_name, "query": os.path.relpath(ep.query_path, args.data),
                         "reverted": reverted, "layers": layers})
            print(f"[{i + 1}/{len(episodes)}] {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
            if args.json and ((i + 1) % 10 == 0 or i + 1 == len(episodes)):
                write_json(args.json, args, entry.name, held_out, rows)

    summary = summarize(rows)
    undone = sum(r["reverted"] for r in rows)
    print(f"\n{args.shots}-shot, {len(rows)} episodes ({undone} undone by the support gate, not scored), "
          f"{entry.name}, k={args.k}; contrast = mean map value on the object minus on the background, x100\n")
    print(table(summary))
    if args.json:
        write_json(args.json, args, entry.name, held_out, rows)
    return 0


def write_json(path: str, args: argparse.Namespace, model: str, held_out: list[str], rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"model": model, "shots": args.shots, "seed": args.seed, "k": args.k,
                                      "held_out": held_out, "episodes_run": len(rows),
                                      "summary": summarize(rows), "episodes": rows}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
