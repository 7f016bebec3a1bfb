"""Query latency of :class:`svf_model.predictor.Predictor` on real photos, and what bf16 costs in accuracy.

For a registered model (default: the registry's default) on CPU (and CUDA when present), letterboxed
to ``--size`` (473 as in PFENet/BAM), 1-shot and 5-shot, fp32 and bf16 autocast:

* ``cached``: ``set_supports`` once (timed separately as ``set_supports``), then ``predict`` on each
  query: the latency of one more query in an app session;
* ``uncached``: ``set_supports`` + ``predict`` for every query: the latency when the supports
  change between queries (or are never cached).

Every round takes one real fss-dev episode (the classes rotate: first ``K`` photos of the class are
the supports, the next ``--queries`` the queries; the uncached mode, which re-encodes the supports
for every query, takes the first ``--uncached-queries`` of them) and runs every variant on it, in an
order that rotates every round; one untimed warm-up pass per input shape comes first. Latencies include decoding
nothing (photos are read beforehand) but do include letterboxing, the model, and resizing the
probabilities back to the photo's size. The tables report medians over all timed queries of wall
time and of process CPU time (with one torch thread on a shared CPU, CPU time is the steadier).

Accuracy of bf16: on the cached runs, per query, mean ``|p_bf16 - p_fp32|`` of the foreground
probability at the photo's size, the IoU between the bf16 and fp32 masks (threshold 0.5), and both
masks' IoU against the ground truth.

Usage: ``HF_HUB_OFFLINE=1 python benchmarks/predictor_latency.py [--model NAME] [--size 473]
[--rounds 3] [--queries 2] [--uncached-queries 1] [--threads 1] [--devices cpu cuda] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from svf_model.predictor import Predictor  # noqa: E402
from svf_model.registry import load_model  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("FSS_DEV", REPO.parent / "shared" / "data" / "fss-dev"))
DEFAULT_CLASSES = ("horse", "street_car", "video_camel", "street_pedestrian", "video_goat")


@dataclass(frozen=True)
class Variant:
    device: str
    shots: int
    precision: str
    mode: str  # "cached" or "uncached"

    def label(self) -> str:
        return f"{self.device}/{self.shots}-shot/{self.precision}/{self.mode}"


@dataclass
class Episode:
    cls: str
    supports: list[np.ndarray]  # uint8 [H, W, 3]
    masks: list[np.ndarray]  # bool [H, W]
    queries: list[np.ndarray]
    truths: list[np.ndarray]


def read_episode(root: Path, cls: str, shots: int, queries: int) -> Episode:
    photos = sorted((root / cls).glob("*.jpg"))
    if len(photos) < shots + queries:
        raise SystemExit(f"class {cls} has {len(photos)} photos; {shots + queries} needed")
    pairs = [(np.asarray(Image.open(p).convert("RGB")), np.asarray(Image.open(p.with_suffix(".png"))) > 127)
             for p in photos[: shots + queries]]
    return Episode(cls, [p[0] for p in pairs[:shots]], [p[1] for p in pairs[:shots]],
                   [p[0] for p in pairs[shots:]], [p[1] for p in pairs[shots:]])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


class Clock:
    """Wall and process CPU seconds of a block (CUDA synchronised at both ends)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __enter__(self) -> Clock:
        if self.cuda:
            torch.cuda.synchronize()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_variant(predictor: Predictor, v: Variant, ep: Episode, timings: dict, probs: dict | None,
                uncached_queries: int) -> None:
    """One variant on one episode; appends ``(wall, cpu)`` seconds to ``timings[v]`` (and
    ``timings[(v, "set_supports")]``); stores cached probabilities in ``probs`` when given. The
    uncached mode runs the first ``uncached_queries`` queries only."""
    sup, msk = ep.supports[: v.shots], ep.masks[: v.shots]
    if v.mode == "cached":
        with Clock(v.device) as c:
            predictor.set_supports(sup, msk)
        timings[(v, "set_supports")].append((c.wall, c.cpu))
        for i, q in enumerate(ep.queries):
            with Clock(v.device) as c:
                pred = predictor.predict(q)
            timings[v].append((c.wall, c.cpu))
            if probs is not None:
                probs[(v.device, v.shots, v.precision, ep.cls, i)] = pred.prob
    else:
        for q in ep.queries[:uncached_queries]:
            with Clock(v.device) as c:
                predictor.set_supports(sup, msk)
                predictor.predict(q)
            timings[v].append((c.wall, c.cpu))


def bf16_accuracy(probs: dict, episodes: dict[str, Episode], devices: list[str], shots: list[int]) -> list[dict]:
    rows = []
    for device in devices:
        for k in shots:
            diffs, maxes, agree, gt32, gt16 = [], [], [], [], []
            for (d, kk, prec, cls, i), p32 in probs.items():
                if d != device or kk != k or prec != "fp32" or (d, k, "bf16", cls, i) not in probs:
                    continue
                p16, truth = probs[(d, k, "bf16", cls, i)], episodes[cls].truths[i]
                diffs.append(float(np.abs(p16 - p32).mean()))
                maxes.append(float(np.abs(p16 - p32).max()))
                agree.append(iou(p16 > 0.5, p32 > 0.5))
                gt32.append(iou(p32 > 0.5, truth))
                gt16.append(iou(p16 > 0.5, truth))
            if diffs:
                rows.append({"device": device, "shots": k, "queries": len(diffs),
                             "mean_abs_prob_diff": float(np.mean(diffs)), "max_abs_prob_diff": max(maxes),
                             "mask_iou_bf16_vs_fp32_mean": float(np.mean(agree)),
                             "mask_iou_bf16_vs_fp32_min": min(agree),
                             "iou_vs_truth_fp32": float(np.mean(gt32)), "iou_vs_truth_bf16": float(np.mean(gt16))})
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_ms(samples: list[tuple[float, float]], which: int) -> float:
    return 1000.0 * statistics.median(s[which] for s in samples)


def latency_rows(timings: dict, variants: list[Variant]) -> list[dict]:
    rows = []
    keys = sorted({(v.device, v.shots, v.precision) for v in variants}, key=lambda t: (t[0], t[1], t[2] != "fp32"))
    for device, k, prec in keys:
        cached, uncached = Variant(device, k, prec, "cached"), Variant(device, k, prec, "uncached")
        row = {"device": device, "shots": k, "precision": prec}
        for name, key in (("cached", cached), ("uncached", uncached), ("set_supports", (cached, "set_supports"))):
            samples = timings.get(key, [])
            if samples:
                row[f"{name}_ms"] = median_ms(samples, 0)
                row[f"{name}_cpu_ms"] = median_ms(samples, 1)
                row[f"{name}_n"] = len(samples)
        rows.append(row)
    return rows


def markdown(latency: list[dict], accuracy: list[dict]) -> str:
    def cell(row: dict, name: str) -> str:
        return f"{row[f'{name}_ms']:.0f} ({row[f'{name}_cpu_ms']:.0f})" if f"{name}_ms" in row else "-"

    lines = ["| device | shots | precision | query, supports cached: ms (CPU ms) | "
             "query, not cached (set_supports + predict): ms (CPU ms) | set_supports alone: ms (CPU ms) |",
             "|---|---|---|---|---|---|"]
    for r in latency:
        lines.append(f"| {r['device']} | {r['shots']} | {r['precision']} | {cell(r, 'cached')} | "
                     f"{cell(r, 'uncached')} | {cell(r, 'set_supports')} |")
    if accuracy:
        lines += ["", "| device | shots | queries | mean abs(p_bf16 - p_fp32) | max | mask IoU bf16 vs fp32 "
                  "(mean / min) | IoU vs truth fp32 / bf16 |", "|---|---|---|---|---|---|---|"]
        for a in accuracy:
            lines.append(f"| {a['device']} | {a['shots']} | {a['queries']} | {a['mean_abs_prob_diff']:.4f} | "
                         f"{a['max_abs_prob_diff']:.3f} | {a['mask_iou_bf16_vs_fp32_mean']:.4f} / "
                         f"{a['mask_iou_bf16_vs_fp32_min']:.4f} | {a['iou_vs_truth_fp32']:.3f} / "
                         f"{a['iou_vs_truth_bf16']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="registered model (default: the registry's default)")
    ap.add_argument("--size", type=int, default=473, help="letterbox size (default: %(default)s)")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when present")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (one episode each)")
    ap.add_argument("--queries", type=int, default=2, help="queries per episode (cached mode)")
    ap.add_argument("--uncached-queries", type=int, default=1,
                    help="queries per episode in the uncached mode (each re-encodes the supports)")
    ap.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES), help="episode classes, in rotation")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="fss-dev folder")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "predictor_latency.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if not (args.data / "classes.json").is_file():
        raise SystemExit(f"fss-dev data not found at {args.data} (pass --data or set FSS_DEV)")
    episodes = {cls: read_episode(args.data, cls, max(args.shots), args.queries) for cls in args.classes}

    started = time.perf_counter()
    load_before = os.getloadavg()
    variants, predictors, entry = [], {}, None
    for device in devices:
        model, entry = load_model(args.model, device=device)  # one model per device: predictors move it
        for prec in args.precisions:
            if prec == "fp16" and device == "cpu":
                continue
            pred = Predictor(model, image_size=args.size, device=device, precision=prec, model_name=entry.name)
            for k in args.shots:
                for mode in ("cached", "uncached"):
                    v = Variant(device, k, prec, mode)
                    variants.append(v)
                    predictors[v] = pred

    warm = read_episode(args.data, args.classes[0], max(args.shots), 1)
    for v in variants:  # every input shape once (the uncached mode has the cached mode's shapes)
        if v.mode == "cached":
            run_variant(predictors[v], v, warm, defaultdict(list), None, 0)
    print(f"warm-up done in {time.perf_counter() - started:.0f}s", file=sys.stderr)

    timings: dict = defaultdict(list)
    probs: dict = {}
    used: dict[str, Episode] = {}
    for r in range(args.rounds):
        ep = episodes[args.classes[r % len(args.classes)]]
        used[ep.cls] = ep
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            run_variant(predictors[v], v, ep, timings, probs, args.uncached_queries)
        print(f"round {r + 1}/{args.rounds} ({ep.cls}) done at {time.perf_counter() - started:.0f}s", file=sys.stderr)

    latency = latency_rows(timings, variants)
    accuracy = bf16_accuracy(probs, used, devices, args.shots) if {"fp32", "bf16"} <= set(args.precisions) else []
    table = markdown(latency, accuracy)
    print(table)
    result = {
        "model": entry.name, "size": args.size, "threads": args.threads, "rounds": args.rounds,
        "queries_per_round": args.queries, "uncached_queries_per_round": args.uncached_queries, "classes": list(used),
        "devices": {d: torch.cuda.get_device_name(0) if d.startswith("cuda") else cpu_name() for d in devices},
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "seconds": time.perf_counter() - started, "latency": latency, "bf16_accuracy": accuracy, "markdown": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
