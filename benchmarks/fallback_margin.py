"""How the shipped model's 2-shot fallback margin was chosen, and what its check costs.

``--shots K --episodes N --seed S``: on seeded held-out fss-dev episodes, every query is segmented
with the learned head on its own values (``refine-svf-lite2``, refinement from one shot on) and with
the prototype logits on the prototype-trained values (``prototype-svf-lite2``), and so is every
support from the others (leave-one-out). The table then picks, per episode, the prototypes when
their leave-one-out IoU beats the head's by more than each margin, and scores that choice.
``--from-json`` re-prints the table from a saved run. ``--cost`` times setting 5 horse shots on the
registry default with and without the check (interleaved rounds, one thread).

    HF_HUB_OFFLINE=1 python benchmarks/fallback_margin.py --shots 2 --episodes 300 --seed 0 \\
        --json benchmarks/results/fallback_margin_2shot.json
    python benchmarks/fallback_margin.py --from-json benchmarks/results/fallback_margin_2shot.json
    HF_HUB_OFFLINE=1 python benchmarks/fallback_margin.py --cost
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from svf_model.data import FSSFolder, make_episodes  # noqa: E402
from svf_model.predictor import Predictor  # noqa: E402
from svf_model.registry import load_model  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "fss-dev"
HELD_OUT = ["clothing_bodysuit", "clothing_cardigan", "clothing_jeans", "clothing_jumper", "clothing_scarf",
            "clothing_sneakers", "clothing_sweater", "horse", "street_car", "street_fence", "street_pedestrian",
            "street_road", "video_car-roundabout", "video_cows", "video_drift-chicane"]
MARGINS = (-0.05, 0.0, 0.05, 0.1, 0.15, 0.2)


def _inter_union(pred: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    valid, truth = label != 255, label == 1
    return float((pred & truth & valid).sum()), float(((pred | truth) & valid).sum())


def run(shots: int, episodes: int, seed: int, size: int) -> list[dict]:
    """Per episode: class, query intersection/union and pooled leave-one-out IoU for both ways."""
    torch.set_num_threads(1)
    head_model, _ = load_model("refine-svf-lite2")
    head_model.head.min_shots = 1  # the leave-one-out episodes of 2 shots have a single support
    plain_model, _ = load_model("prototype-svf-lite2")
    ways = {"head": Predictor(head_model, image_size=size, device="cpu"),
            "plain": Predictor(plain_model, image_size=size, device="cpu")}
    rows = []
    with contextlib.ExitStack() as stack:
        for predictor in ways.values():
            stack.enter_context(predictor.model.backbone.memoize(2 << 30))
        for ep in make_episodes(FSSFolder(DATA), episodes, shots, seed, HELD_OUT, None):
            fg, ignore = [m == 1 for m in ep.support_masks], [m == 255 for m in ep.support_masks]
            row = {"class": ep.class_name}
            for name, p in ways.items():
                p.set_supports(ep.supports, fg, ignore)
                row[name] = _inter_union(p.predict(ep.query).mask, ep.query_mask)
                inter = union = 0.0
                for i in range(shots):
                    others = [j for j in range(shots) if j != i]
                    p.set_supports([ep.supports[j] for j in others], [fg[j] for j in others],
                                   [ignore[j] for j in others])
                    a, b = _inter_union(p.predict(ep.supports[i]).mask, ep.support_masks[i])
                    inter, union = inter + a, union + b
                row[name + "_loo"] = inter / union if union else 1.0
            rows.append(row)
    return rows


def margin_table(rows: list[dict]) -> str:
    def miou(choose) -> float:  # noqa: ANN001 - row -> "head" | "plain"
        per_class: dict[str, list[float]] = {}
        for r in rows:
            a, b = r[choose(r)]
            acc = per_class.setdefault(r["class"], [0.0, 0.0])
            acc[0], acc[1] = acc[0] + a, acc[1] + b
        return 100 * float(np.mean([a / b for a, b in per_class.values()]))

    def iou(r: dict, way: str) -> float:
        a, b = r[way]
        return a / b if b else 1.0

    lines = [f"{len(rows)} episodes; mIoU always the head {miou(lambda r: 'head'):.2f}, always the prototypes "
             f"{miou(lambda r: 'plain'):.2f}", "",
             "| margin | mIoU | fallback taken | change per episode vs the head (pts, mean +- s.e.) |",
             "|---|---|---|---|"]
    for m in MARGINS:
        def choose(r: dict, m: float = m) -> str:
            return "plain" if r["plain_loo"] > r["head_loo"] + m else "head"
        d = np.array([iou(r, choose(r)) - iou(r, "head") for r in rows]) * 100
        taken = np.mean([choose(r) == "plain" for r in rows])
        lines.append(f"| {m:g} | {miou(choose):.2f} | {100 * taken:.1f}% | "
                     f"{d.mean():+.2f} +- {d.std(ddof=1) / np.sqrt(len(d)):.2f} |")
    return "\n".join(lines)


def check_cost(rounds: int = 3) -> dict[str, float]:
    """Median seconds of ``set_supports`` with 5 horse shots on the registry default, with the check
    forced on (no shot limit) and off."""
    from tests.helpers import fss_pairs

    torch.set_num_threads(1)
    model, entry = load_model()
    low = model.low_shot_values
    shots = fss_pairs(DATA, "horse", 5)
    variants = {"with the check": dataclasses.replace(low, fallback_up_to=None),
                "without": dataclasses.replace(low, fallback_margin=None)}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, values in variants.items():
            model.low_shot_values = values
            p = Predictor(model, image_size=entry.image_size, device="cpu")
            start = time.perf_counter()
            p.set_supports([im for im, _ in shots], [m for _, m in shots])
            seconds[name].append(time.perf_counter() - start)
    model.low_shot_values = low
    result = {name: statistics.median(v) for name, v in seconds.items()}
    result["ratio"] = result["with the check"] / result["without"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=321)
    ap.add_argument("--json", default=None)
    ap.add_argument("--from-json", default=None, help="re-print the table of a saved run")
    ap.add_argument("--cost", action="store_true", help="time the check instead")
    args = ap.parse_args()
    if args.cost:
        print(json.dumps(check_cost()))
        return
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())["episodes"]
    else:
        rows = run(args.shots, args.episodes, args.seed, args.size)
        if args.json:
            Path(args.json).write_text(json.dumps({"shots": args.shots, "seed": args.seed, "size": args.size,
                                                   "episodes": rows}))
    print(margin_table(rows))


if __name__ == "__main__":
    main()
