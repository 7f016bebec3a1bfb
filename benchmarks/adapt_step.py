"""Cost of one adaptation run per objective on the default model, measured in one interleaved run.

Five support shots of one held-out fss-dev class, the default model, ``AdaptConfig`` defaults
without the gate (the gate adds two no-grad scorings, the same for every objective), timed for:

* ``prototype``: the loss on the head's prototype logits (``objective="prototype"``, the default);
* ``head``: the loss on the whole head, priors and refinement included (``objective="head"``);
* ``head, indexed prior (before)``: the same with ``region_prior`` as it was written before (same
  values; ``support[i, j]`` per support/query pair instead of ``unbind``).

Variants are interleaved (the order rotates every round) after one warm-up round; the table gives
medians of wall and process CPU time and each variant's median per-round ratio to ``prototype``.

Usage: ``HF_HUB_OFFLINE=1 python benchmarks/adapt_step.py [--rounds 3] [--steps 10] [--json PATH]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from svf_model.adapt import AdaptConfig  # noqa: E402
from svf_model.heads import refine  # noqa: E402
from svf_model.imageio import load_image, load_mask  # noqa: E402
from svf_model.predictor import Predictor  # noqa: E402
from svf_model.registry import load_model  # noqa: E402

FSS_DEV = Path(os.environ.get("FSS_DEV", REPO.parent / "shared" / "data" / "fss-dev"))


def indexed_region_prior(query: torch.Tensor, support: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``region_prior`` as it was written before (same values): ``support[i, j]`` per pair, whose
    backward fills a zero gradient of the whole ``support`` tensor for every pair."""
    b, k = support.shape[:2]
    q = query.flatten(2)
    q = q / (q.norm(dim=1, keepdim=True) + refine.COSINE_EPS)
    maps = []
    for i in range(b):
        for j in range(k):
            w = weight[i, j].flatten()
            keep = (w > 0).nonzero().squeeze(1)
            if keep.numel() == 0:
                maps.append(q.new_zeros(q.shape[-1]))
                continue
            s = support[i, j].flatten(1)[:, keep] * w[keep]
            s = s / (s.norm(dim=0, keepdim=True) + refine.COSINE_EPS)
            sim = (s.T @ q[i]).max(0)[0]
            maps.append(sim.clamp(min=0) if keep.numel() < w.numel() else sim)
    sim = torch.stack(maps).view(b, k, -1)
    lo, hi = sim.min(2, keepdim=True)[0], sim.max(2, keepdim=True)[0]
    return ((sim - lo) / (hi - lo + refine.COSINE_EPS)).view(b, k, *query.shape[-2:])


@contextlib.contextmanager
def indexed_prior() -> Iterator[None]:
    original = refine.region_prior
    refine.region_prior = indexed_region_prior
    try:
        yield
    finally:
        refine.region_prior = original


VARIANTS = {
    "prototype": ("prototype", contextlib.nullcontext),
    "head": ("head", contextlib.nullcontext),
    "head, indexed prior (before)": ("head", indexed_prior),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(FSS_DEV))
    ap.add_argument("--class-name", default="horse")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, entry = load_model(None)
    predictor = Predictor(model, model_name=entry.name)
    photos = sorted((Path(args.data) / args.class_name).glob("*.jpg"))[:5]
    predictor.set_supports([load_image(p) for p in photos], [load_mask(p.with_suffix(".png")) for p in photos])
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for round_ in range(args.rounds + 1):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            objective, patch = VARIANTS[name]
            config = AdaptConfig(steps=args.steps, objective=objective, gate="off", time_budget_s=None)
            with patch():
                wall, cpu = time.perf_counter(), time.process_time()
                result = predictor.adapt(config)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            predictor.reset()
            assert result.steps == args.steps
            if round_:  # round 0 warms up
                times[name].append((wall, cpu))
            print(f"round {round_} {name}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr, flush=True)

    base = times["prototype"]
    rows = {}
    print(f"\n{entry.name}, 5 shots of {args.class_name}, {args.steps} steps, {args.threads} thread(s), "
          f"{args.rounds} rounds\n")
    print("| objective | wall s (median) | CPU s (median) | CPU time / prototype |\n|---|---|---|---|")
    for name, t in times.items():
        ratio = statistics.median(c / b[1] for (_, c), b in zip(t, base, strict=True))
        rows[name] = {"wall_s": statistics.median(w for w, _ in t), "cpu_s": statistics.median(c for _, c in t),
                      "cpu_ratio_to_prototype": ratio}
        print(f"| {name} | {rows[name]['wall_s']:.1f} | {rows[name]['cpu_s']:.1f} | {ratio:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": entry.name, "class": args.class_name, "steps": args.steps,
                                               "threads": args.threads, "rounds": args.rounds,
                                               "load_average": os.getloadavg(), "variants": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
