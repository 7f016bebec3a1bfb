"""Print the README's result tables from the JSON files in ``benchmarks/results/``.

    python benchmarks/summarize.py            # markdown on stdout
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def accuracy_table() -> str:
    rows = ["| shots | episodes | model | mIoU | FB-IoU | paired change vs prototype-lite2 (pts, mean +- s.e.) |",
            "|---|---|---|---|---|---|"]
    for shots in (1, 5):
        base = _load(f"eval_prototype_{shots}shot.json")
        svf = _load(f"eval_proto_svf_{shots}shot.json")
        if base is None:
            continue
        n = len(base["episodes"])
        for label, floor in (("all-foreground floor", "all_foreground"), ("all-background floor", "all_background")):
            f = base["floors"][floor]
            rows.append(f"| {shots} | {n} | {label} | {f['miou']:.1f} | {f['fbiou']:.1f} | |")
        rows.append(f"| {shots} | {n} | `prototype-lite2` (training-free) | {base['miou']:.1f} | {base['fbiou']:.1f} | |")
        if svf is not None:
            same = [a["query"] for a in base["episodes"]] == [b["query"] for b in svf["episodes"]]
            d = np.array([b["iou"] - a["iou"] for a, b in zip(base["episodes"], svf["episodes"], strict=True)]) * 100
            paired = f"{d.mean():+.2f} +- {d.std(ddof=1) / np.sqrt(len(d)):.2f} ({(d > 0).sum()} better, " \
                     f"{(d < 0).sum()} worse)" if same else "episodes differ"
            rows.append(f"| {shots} | {n} | **`prototype-svf-lite2`** (SVF-trained, shipped) | **{svf['miou']:.1f}** | "
                        f"**{svf['fbiou']:.1f}** | {paired} |")
    return "\n".join(rows)


def adaptation_table() -> str:
    rows = ["| shots | model | variant | episodes | IoU before | IoU after | change (pts) | s.d. | s.e. | "
            "episodes losing > 5 pts | median s | p90 s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(RESULTS.glob("adapt_study_*.json")):
        data = json.loads(name.read_text())
        for variant, v in data["variants"].items():
            rows.append(f"| {data['shots']} | {data['model']} | `{variant}` | {data['episodes']} | {v['mean_before']:.1f} | "
                        f"{v['mean_after']:.1f} | {v['mean_change']:+.2f} | {v['std_change']:.2f} | {v['se_change']:.2f} | "
                        f"{100 * v['share_losing_5pts']:.0f}% | {v['seconds']['median']:.1f} | {v['seconds']['p90']:.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print("### Accuracy\n")
    print(accuracy_table())
    print("\n### Adaptation\n")
    print(adaptation_table())
