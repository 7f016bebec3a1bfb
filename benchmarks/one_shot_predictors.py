"""Can the shot alone tell when 1-shot adaptation will hurt the query?

For ``evaluate --adapt`` runs with the support gate, relates each episode's query IoU change to what
is known before the query is seen: the support mask's area (share of the photo), the gate's score of
the unadapted model on the shot's views, and the gate's gain (score after minus before). Prints the
correlations (kept adaptations only: an undone one changes nothing) and the mean change per bin.

Usage::

    python benchmarks/one_shot_predictors.py --data ../shared/data/fss-dev \
        eval_adapt_dual_1shot.json eval_adapt_dual_1shot_seed4.json far_adapt_dual_svf_1shot.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from svf_model.data.episodes import Item  # noqa: E402
from svf_model.data.fss_folder import FSSFolder  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
AREA_BINS = (0.0, 0.1, 0.25, 0.5, 1.01)
SCORE_BINS = (0.0, 0.3, 0.5, 0.7, 1.01)


def _mask_area(folder: FSSFolder, image: str) -> float:
    """Share of the photo covered by the object in ``image``'s mask (``class/stem.png``)."""
    path = folder.root / image
    return float(folder.load_mask(Item(path, path.with_suffix(".png")), path.parent.name).mean())


def _binned(values: np.ndarray, change: np.ndarray, bins: tuple[float, ...], name: str) -> list[str]:
    rows = []
    for lo, hi in zip(bins[:-1], bins[1:], strict=True):
        sel = (values >= lo) & (values < hi)
        if sel.sum() > 1:
            c = change[sel]
            rows.append(f"|  | {name} {lo:g}-{min(hi, 1):g} | {sel.sum()} | "
                        f"{c.mean():+.2f} +- {c.std(ddof=1) / np.sqrt(sel.sum()):.2f} |")
    return rows


def predictors_table(data: Path, names: list[str]) -> str:
    folder = FSSFolder(data)
    rows = ["| run | episodes / bin | n | query change (pts, mean +- s.e.) or correlation |", "|---|---|---|---|"]
    for name in names:
        episodes = json.loads((RESULTS / name).read_text())["episodes"]
        if "support_iou_before" not in episodes[0] or len(episodes[0]["supports"]) != 1:
            raise SystemExit(f"{name}: not a gated 1-shot evaluate --adapt run")
        area = np.array([_mask_area(folder, e["supports"][0]) for e in episodes])
        before = np.array([e["support_iou_before"] for e in episodes])
        gain = np.array([e["support_iou_after"] - e["support_iou_before"] for e in episodes])
        change = np.array([e["iou_after"] - e["iou_before"] for e in episodes]) * 100
        kept = ~np.array([e["reverted"] for e in episodes])
        corr = {label: np.corrcoef(x[kept], change[kept])[0, 1]
                for label, x in (("area", area), ("gate score before", before), ("gate gain", gain))}
        rows.append(f"| `{name}` | all | {len(episodes)} | correlation (kept): " +
                    ", ".join(f"{k} {v:+.2f}" for k, v in corr.items()) + " |")
        rows += _binned(area, change, AREA_BINS, "mask area")
        rows += _binned(before, change, SCORE_BINS, "gate score before")
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="the fss-dev folder the runs sampled")
    ap.add_argument("runs", nargs="+", help="results/ file names of gated 1-shot evaluate --adapt runs")
    args = ap.parse_args()
    print(predictors_table(args.data, args.runs))
