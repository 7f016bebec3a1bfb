"""Cost of one adaptation with the depthwise filters decomposed too, against without, in one run.

The default model as the app runs it (``AdaptConfig`` defaults, support gate included) on 1 and on 5
shots of one fss-dev class, with only the adapt block's dense convs decomposed (``plain``:
``load_model(adapt_grouped="none")``, 560 values of ``layer4.1``) and with its depthwise conv
decomposed kernel by kernel too, those values training at every shot count (``kernel``:
``load_model(adapt_grouped="kernel")``, the registry's setting, with ``AdaptConfig(grouped="always")``;
560 + 3,744 values; the default trains them with 1 shot only, so with 5 shots it runs as ``plain``).
Variants are interleaved (the order rotates every round) after one warm-up round; the table gives
medians of wall and process CPU time and each variant's median per-round CPU-time ratio to ``plain``.

Usage: ``HF_HUB_OFFLINE=1 python benchmarks/adapt_fold_time.py [--rounds 3] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from svf_model.adapt import AdaptConfig  # noqa: E402
from svf_model.imageio import load_image, load_mask  # noqa: E402
from svf_model.predictor import Predictor  # noqa: E402
from svf_model.registry import load_model  # noqa: E402

FSS_DEV = Path(os.environ.get("FSS_DEV", REPO.parent / "shared" / "data" / "fss-dev"))
FOLDS = {"plain": "none", "kernel": "kernel"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(FSS_DEV))
    ap.add_argument("--class-name", default="horse")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    photos = sorted((Path(args.data) / args.class_name).glob("*.jpg"))[:max(args.shots)]
    images = [load_image(p) for p in photos]
    masks = [load_mask(p.with_suffix(".png")) for p in photos]
    predictors = {}
    for name, fold in FOLDS.items():
        model, entry = load_model(None, adapt_grouped=fold)
        predictors[name] = Predictor(model, model_name=entry.name)
    times: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for shots in args.shots:
        for p in predictors.values():
            p.set_supports(images[:shots], masks[:shots])
        names = list(FOLDS)
        for round_ in range(args.rounds + 1):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                wall, cpu = time.perf_counter(), time.process_time()
                predictors[name].adapt(AdaptConfig(time_budget_s=None, grouped="always"))
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                predictors[name].reset()
                if round_:  # round 0 warms up
                    times.setdefault((shots, name), []).append((wall, cpu))
                print(f"{shots} shot(s), round {round_}, {name}: {wall:.1f} s wall, {cpu:.1f} s CPU",
                      file=sys.stderr, flush=True)

    rows = []
    print(f"\n{entry.name}, {args.class_name}, {args.threads} thread(s), {args.rounds} rounds\n")
    print("| shots | depthwise conv | wall s (median) | CPU s (median) | CPU time / plain |\n|---|---|---|---|---|")
    for shots, name in ((s, n) for s in args.shots for n in FOLDS):
        t, base = times[shots, name], times[shots, "plain"]
        ratio = statistics.median(c / b[1] for (_, c), b in zip(t, base, strict=True))
        row = {"shots": shots, "fold": name, "wall_s": statistics.median(w for w, _ in t),
               "cpu_s": statistics.median(c for _, c in t), "cpu_ratio_to_plain": ratio}
        rows.append(row)
        label = "whole" if name == "plain" else "decomposed kernel by kernel"
        print(f"| {shots} | {label} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | {ratio:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": entry.name, "class": args.class_name, "threads": args.threads,
                                               "rounds": args.rounds, "load_average": os.getloadavg(),
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
