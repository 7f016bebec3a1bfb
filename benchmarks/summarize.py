"""Print the result tables of the README and docs/adaptation.md from the JSON files in ``benchmarks/results/``.

    python benchmarks/summarize.py                    # markdown on stdout
    python benchmarks/summarize.py --min-episodes 30  # also pair runs sharing only 30+ episodes
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from svf_model.adapt import AdaptConfig  # noqa: E402
from svf_model.registry import adapt_fold, grouped_fold_of, read_registry  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


# (file key, label): benchmarks/results/eval_{key}_{shots}shot.json, all on the same seeded episodes.
MODELS = [
    ("prototype", "`prototype-lite2`: prototypes, frozen backbone (training-free)"),
    ("proto_svf", "`prototype-svf-lite2`: prototypes + SVF layer4, no augmentation"),
    ("aug_proto_svf", "prototypes + SVF layer4, augmentation"),
    ("aug_proto_svf34", "prototypes + SVF layer3-4, augmentation"),
    ("refine_frozen", "learned head, frozen backbone"),
    ("refine_frozen_bal", "learned head, frozen backbone, balanced loss"),
    ("refine_svf", "learned head + SVF layer4, trained together"),
    ("shipped", "`refine-svf-lite2`: learned head (from 2 shots) + SVF layer4 (previous default)"),
    ("refine_on_proto_svf", "learned head trained on the fixed SVF values of `prototype-svf-lite2`"),
    ("refine_on_proto_svf_6ep", "the same, 6 epochs instead of 3"),
    ("refine_on_proto_svf_2shot", "the same, 2-shot training episodes"),
    ("dual", "`refine-dual-svf-lite2`: `refine-svf-lite2` + the values of `prototype-svf-lite2` for 1 shot and as "
             "the 2-shot fallback"),
    ("dual_flip", "`refine-dual-svf-lite2`, each query also segmented mirrored and the two averaged (`--flip`, "
                  "as the app segments)"),
]
# The SVF paper's ablation on this data: what meta-trains in layer4 under the prototype head, same
# recipe otherwise (configs/default_lite2_prototype_svf.yaml, configs/lite2_prototype_{bn,full}.yaml):
# (file key, what trained, epochs, trained weights, the run it is paired with).
ABLATION = [("prototype", "nothing (training-free)", 0, 0, "proto_svf"),
            ("proto_svf", "singular values (SVF), lr 0.01", 3, 2552, None),
            ("proto_bn", "BatchNorm affine, lr 0.01", 3, 30624, "proto_svf"),
            ("proto_bn_lr0.1", "BatchNorm affine, lr 0.1", 3, 30624, "proto_svf"),
            ("proto_full", "every weight, lr 0.01", 3, 3196368, "proto_svf"),
            ("proto_full_lr0.001", "every weight, lr 0.001", 3, 3196368, "proto_svf"),
            ("proto_svf_10ep", "singular values (SVF), lr 0.01", 10, 2552, "proto_svf"),
            ("proto_full_10ep", "every weight, lr 0.01", 10, 3196368, "proto_svf_10ep")]
SHIPPED = "dual"


def _iou_difference(run: dict, ref: dict) -> np.ndarray | None:
    """Per-episode IoU of ``run`` minus that of ``ref`` in points, or ``None`` when the two files do
    not hold the same episodes (queries in the same order)."""
    if [e["query"] for e in run["episodes"]] != [e["query"] for e in ref["episodes"]]:
        return None
    return np.array([a["iou"] - b["iou"] for a, b in zip(run["episodes"], ref["episodes"], strict=True)]) * 100


def _classes_better(run: dict, ref: dict) -> str:
    """``"k of n"``: classes whose IoU in ``run`` beats that in ``ref``."""
    return f"{sum(run['per_class'][c] > v for c, v in ref['per_class'].items())} of {len(ref['per_class'])}"


def _paired_cells(run: dict, base: dict) -> tuple[str, str]:
    """The accuracy tables' comparison cells of ``run`` against the training-free ``base`` on the same
    episodes: the per-episode change with the counts of better and worse episodes, and the classes improved."""
    d = _iou_difference(run, base)
    paired = "episodes differ" if d is None else f"{_mean_se(d)} ({(d > 0).sum()} better, {(d < 0).sum()} worse)"
    return paired, _classes_better(run, base)


def accuracy_table() -> str:
    rows = ["| shots | episodes | model | mIoU | FB-IoU | paired change vs training-free (pts, mean +- s.e.) "
            "| classes improved |", "|---|---|---|---|---|---|---|"]
    for shots in (1, 2, 5):
        base = _load(f"eval_prototype_{shots}shot.json")
        if base is None:
            continue
        n = len(base["episodes"])
        for label, floor in (("all-foreground floor", "all_foreground"), ("all-background floor", "all_background")):
            f = base["floors"][floor]
            rows.append(f"| {shots} | {n} | {label} | {f['miou']:.1f} | {f['fbiou']:.1f} | | |")
        for key, label in MODELS:
            r = _load(f"eval_{key}_{shots}shot.json")
            if r is None:
                continue
            paired, better = ("", "") if key == "prototype" else _paired_cells(r, base)
            miou, fb = f"{r['miou']:.1f}", f"{r['fbiou']:.1f}"
            if key == SHIPPED:
                label, miou, fb = f"**{label} (shipped)**", f"**{miou}**", f"**{fb}**"
            rows.append(f"| {shots} | {len(r['episodes'])} | {label} | {miou} | {fb} | {paired} | {better} |")
    return "\n".join(rows)


def flip_table() -> str:
    """The shipped model with each query also segmented mirrored (``evaluate --flip``) against the same
    model without, on the same episodes: mIoU, FB-IoU and the paired per-episode change, overall and on
    the everyday-kind classes."""
    rows = ["| shots | episodes | classes | mIoU: plain -> with the mirror | FB-IoU: plain -> with the mirror "
            "| paired change (pts, mean +- s.e.) | classes improved |", "|---|---|---|---|---|---|---|"]
    for shots in (1, 2, 5):
        plain, flip = _load(f"eval_{SHIPPED}_{shots}shot.json"), _load(f"eval_{SHIPPED}_flip_{shots}shot.json")
        if plain is None or flip is None:
            continue
        d = _iou_difference(flip, plain)
        if d is None:
            continue
        everyday = np.array([e["class"] in EVERYDAY_KINDS for e in plain["episodes"]])
        kinds = [("all 15", np.ones_like(everyday)), ("everyday kinds (animals, vehicles, people)", everyday)]
        for label, m in kinds:
            cls = sorted({e["class"] for e, k in zip(plain["episodes"], m, strict=True) if k})
            a = np.mean([plain["per_class"][c] for c in cls])
            b = np.mean([flip["per_class"][c] for c in cls])
            better = sum(flip["per_class"][c] > plain["per_class"][c] for c in cls)
            fb = f"{plain['fbiou']:.1f} -> {flip['fbiou']:.1f}" if m.all() else ""
            rows.append(f"| {shots} | {m.sum()} | {label} | {a:.1f} -> {b:.1f} | {fb} | {_mean_se(d[m])} "
                        f"| {better} of {len(cls)} |")
    return "\n".join(rows)


# held-out fss-dev classes of the kinds the app is judged on beyond fss-dev (animals, vehicles, people)
EVERYDAY_KINDS = {"horse": "animal", "video_cows": "animal", "street_car": "vehicle",
                  "video_car-roundabout": "vehicle", "video_drift-chicane": "vehicle", "street_pedestrian": "person"}
EVERYDAY_MODELS = ("prototype", "proto_svf", "refine_frozen", "shipped", "dual", "dual_flip")


def everyday_table() -> str:
    """Per-class IoU on the held-out classes of everyday kinds (``EVERYDAY_KINDS``), their mean, and
    the per-episode change over the training-free prototypes on those classes' episodes."""
    classes = list(EVERYDAY_KINDS)
    rows = ["| shots | model | " + " | ".join(f"{c} ({EVERYDAY_KINDS[c]})" for c in classes)
            + " | mean of these | paired change vs training-free on their episodes (pts, mean +- s.e.) |",
            "|---|---|" + "---|" * (len(classes) + 2)]
    for shots in (1, 2, 5):
        base = _load(f"eval_prototype_{shots}shot.json")
        if base is None:
            continue
        mine = np.array([e["class"] in EVERYDAY_KINDS for e in base["episodes"]])
        labels = dict(MODELS)
        for key in EVERYDAY_MODELS:
            r = _load(f"eval_{key}_{shots}shot.json")
            if r is None:
                continue
            ious = [r["per_class"][c] for c in classes]
            d = _iou_difference(r, base) if key != "prototype" else None
            paired = "" if d is None else f"{_mean_se(d[mine])} ({mine.sum()} episodes)"
            label = labels[key].split(":")[0] if key != SHIPPED else f"**{labels[key].split(':')[0]} (shipped)**"
            rows.append(f"| {shots} | {label} | " + " | ".join(f"{v:.1f}" for v in ious)
                        + f" | {np.mean(ious):.1f} | {paired} |")
    return "\n".join(rows)


# The far-transfer split (configs/far_lite2_*.yaml): trained on the clothing_* and street_* classes only,
# evaluated on the 19 animal, vehicle and person-in-action classes (benchmarks/results/far_{key}_{shots}shot.json).
FAR_KINDS = {"horse": "animal", "video_blackswan": "animal", "video_camel": "animal", "video_cows": "animal",
             "video_dog": "animal", "video_goat": "animal", "video_horsejump-high": "animal",
             "video_libby": "animal", "video_bmx-trees": "vehicle", "video_car-roundabout": "vehicle",
             "video_drift-chicane": "vehicle", "video_drift-straight": "vehicle", "video_scooter-black": "vehicle",
             "video_soapbox": "vehicle", "video_breakdance": "person", "video_dance-twirl": "person",
             "video_kite-surf": "person", "video_paragliding-launch": "person", "video_parkour": "person"}
FAR_KIND_NAMES = {"animal": "animals", "vehicle": "vehicles", "person": "people"}
FAR_MODELS = [("prototype", "prototypes, frozen backbone (training-free)"),
              ("prototype_svf", "prototypes + SVF layer4 (the recipe of `prototype-svf-lite2`)"),
              ("refine_frozen", "learned head, frozen backbone"),
              ("refine_svf", "learned head + SVF layer4, without the fallback (`refine-svf-lite2`'s recipe)"),
              ("dual_svf", "the shipped model's recipe (`refine-dual-svf-lite2`: learned head from 2 shots, "
                           "prototype-trained values for 1 shot and the 2-shot fallback)")]


def far_transfer_table() -> str:
    """mIoU, FB-IoU, the per-episode change over the training-free prototypes and the mean class IoU by
    kind (``FAR_KINDS``) of the far-transfer models on their 19 held-out classes."""
    kinds = FAR_KIND_NAMES
    rows = ["| shots | episodes | model (trained on clothing + street only) | mIoU | FB-IoU | paired change vs "
            "training-free (pts, mean +- s.e.) | classes improved | "
            + " | ".join(f"{name} ({list(FAR_KINDS.values()).count(k)} classes)" for k, name in kinds.items()) + " |",
            "|---|---|---|---|---|---|---|" + "---|" * len(kinds)]
    for shots in (1, 2, 5):
        base = _load(f"far_prototype_{shots}shot.json")
        if base is None:
            continue
        for key, label in FAR_MODELS:
            r = _load(f"far_{key}_{shots}shot.json")
            if r is None:
                continue
            paired, better = ("", "") if key == "prototype" else _paired_cells(r, base)
            by_kind = [np.mean([v for c, v in r["per_class"].items() if FAR_KINDS[c] == k]) for k in kinds]
            rows.append(f"| {shots} | {len(r['episodes'])} | {label} | {r['miou']:.1f} | {r['fbiou']:.1f} | {paired} "
                        f"| {better} | " + " | ".join(f"{v:.1f}" for v in by_kind) + " |")
    return "\n".join(rows)


def far_adaptation_table() -> str:
    """``evaluate --adapt`` runs of the far-transfer split's shipped-recipe model on its 19 held-out
    classes (``far_adapt_*.json``): the per-episode change, overall and by kind (``FAR_KINDS``)."""
    kinds = FAR_KIND_NAMES
    rows = ["| shots | lr | episodes (seed) | mIoU before -> after | change (pts, mean +- s.e.) | losing > 5 pts | "
            "gaining > 5 pts | gate undid | classes gaining on average | "
            + " | ".join(kinds.values()) + " | adaptation s (median / p90) |",
            "|---|---|---|---|---|---|---|---|---|" + "---|" * len(kinds) + "---|"]
    for r in _far_adapt_runs():
        d = _changes(r)
        classes = np.array([e["class"] for e in r["episodes"]])
        per_class = np.array([d[classes == c].mean() for c in dict.fromkeys(classes)])
        by_kind = [_mean_se(d[np.array([FAR_KINDS[c] == k for c in classes])]) for k in kinds]
        undone = np.mean([e["reverted"] for e in r["episodes"]])
        sec = r["adapt_seconds"]
        rows.append(f"| {r['config']['shots']} | {run_lr(r):g} | {len(d)} ({r['config']['seed']}) | "
                    f"{r['miou_before']:.1f} -> "
                    f"{r['miou']:.1f} | {_mean_se(d)} | {100 * (d < -5).mean():.1f}% | {100 * (d > 5).mean():.1f}% "
                    f"| {100 * undone:.0f}% | {(per_class > 0).sum()} of {len(per_class)} | " + " | ".join(by_kind)
                    + f" | {sec['median']:.1f} / {sec['p90']:.1f} |")
    return "\n".join(rows)


def _final_train_loss(key: str) -> str:
    """Mean training loss of the last epoch, from the run's log.csv kept in ``results/train_logs/``."""
    path = RESULTS / "train_logs" / f"{key}.csv"
    if not path.is_file():
        return ""
    return f"{float(path.read_text().strip().splitlines()[-1].split(',')[3]):.3f}"


def ablation_table() -> str:
    """Meta-training SVF against BatchNorm and full fine-tuning of the same stage (``ABLATION``),
    each paired per episode with the SVF run of its row on the same episodes."""
    labels = {key: f"{what}, {epochs} epochs" if epochs else what for key, what, epochs, _, _ in ABLATION}
    epochs_of = {key: epochs for key, _, epochs, _, _ in ABLATION}
    rows = ["| shots | layer4: what meta-trained | trained weights | final training loss | mIoU | FB-IoU | paired with "
            "| change (pts, mean +- s.e.) | classes better |", "|---|---|---|---|---|---|---|---|---|"]
    for shots in (1, 5):
        for key, _, _, count, ref_key in ABLATION:
            r = _load(f"eval_{key}_{shots}shot.json")
            ref = _load(f"eval_{ref_key}_{shots}shot.json") if ref_key else None
            if r is None:
                continue
            paired = better = ""
            if ref is not None:
                d = _iou_difference(r, ref)
                if d is None:
                    raise ValueError(f"eval_{key}_{shots}shot.json and eval_{ref_key}_{shots}shot.json differ")
                paired, better = _mean_se(d), _classes_better(r, ref)
            with_ = f"SVF, {epochs_of[ref_key]} epochs" if ref is not None else ""
            rows.append(f"| {shots} | {labels[key]} | {count:,} | {_final_train_loss(key)} | {r['miou']:.1f} | "
                        f"{r['fbiou']:.1f} | {with_} | {paired} | {better} |")
    return "\n".join(rows)


def fallback_table() -> str:
    """The shipped model's low-shot fallback against the same model without it (``refine-svf-lite2``:
    the same computation whenever the fallback is not taken), on the same episodes per seed: seed 0
    helped choose the margin (with other draws of it), seed 1 checks it."""
    rows = ["| shots | seed | episodes | fallback taken | mIoU without -> with | FB-IoU without -> with "
            "| paired change (pts, mean +- s.e.) | change where taken (pts, mean) |",
            "|---|---|---|---|---|---|---|---|"]
    for seed, prefix in ((0, "eval_"), (1, "eval_seed1_")):
        for shots in (2,):  # the shipped model checks for the fallback with 2 shots only
            with_, without = _load(f"{prefix}dual_{shots}shot.json"), _load(f"{prefix}shipped_{shots}shot.json")
            if with_ is None or without is None:
                continue
            d = _iou_difference(with_, without)
            if d is None:
                raise ValueError(f"{prefix}dual_{shots}shot.json and its pair hold different episodes")
            taken = np.array([e.get("low_shot_values", False) for e in with_["episodes"]])
            where = f"{d[taken].mean():+.2f}" if taken.any() else ""
            rows.append(f"| {shots} | {seed} | {len(d)} | {100 * taken.mean():.1f}% | {without['miou']:.1f} -> "
                        f"{with_['miou']:.1f} | {without['fbiou']:.1f} -> {with_['fbiou']:.1f} | {_mean_se(d)} "
                        f"| {where} |")
    return "\n".join(rows)


def _mean_se(x: np.ndarray) -> str:
    """``"+m.mm +- s.ss"``: the mean of ``x`` and its standard error."""
    return f"{x.mean():+.2f} +- {x.std(ddof=1) / np.sqrt(len(x)):.2f}"


@functools.cache
def _adapt_runs() -> dict[str, dict]:
    """``{file name: run}`` of every ``evaluate --adapt`` result, sorted by name (read once: do not change them)."""
    return {name.name: json.loads(name.read_text()) for name in sorted(RESULTS.glob("eval_adapt_*.json"))}


@functools.cache
def _studies() -> dict[str, dict]:
    """``{file name: study}`` of every ``adapt_study_*.json``, sorted by name (read once: do not change them)."""
    return {name.name: json.loads(name.read_text()) for name in sorted(RESULTS.glob("adapt_study_*.json"))}


def _far_adapt_runs() -> list[dict]:
    """Every ``evaluate --adapt`` run on the far-transfer classes (``far_adapt_*.json``), sorted by name."""
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob("far_adapt_*.json"))]


def _runs_with_default_svf() -> list[dict]:
    """The ``evaluate --adapt`` runs of SVF adaptation with the defaults, the step aside
    (``eval_adapt_*.json`` whose options restate the defaults or set only ``lr``, then
    ``far_adapt_*.json``): what the study variants are paired with."""
    return [r for r in _adapt_runs().values() if _defaults_but_step(r)] + _far_adapt_runs()


def _defaults_but_step(run: dict) -> bool:
    """Whether the run's options (:func:`_options`) restate the defaults, its learning rate aside and
    its depthwise conv left whole (the 1-shot default before 2026-12-05: these runs are what the
    ``--grouped kernel`` studies pair with)."""
    return {o for o in _options(run) if not o.startswith("lr=")} - {NO_FOLD} <= DEFAULT_OPTIONS


def default_lr(shots: int) -> float:
    """Today's default step for ``shots`` supports (``AdaptConfig.step_size``)."""
    return AdaptConfig().step_size(shots)


def run_lr(run: dict) -> float:
    """The learning rate an ``evaluate --adapt`` run adapted with: the ``lr`` it recorded in
    ``adapt_config``, else its ``--adapt-set lr=``, else 0.03 (the default at every shot count from
    2026-11-21, before any run recorded ``adapt_config``, until 1 shot's became 0.01 on 2026-12-05)."""
    recorded = (run["config"].get("adapt_config") or {}).get("lr")
    if recorded is not None:
        return float(recorded)
    items = [o.partition("=")[2] for o in run["config"].get("adapt_set") or [] if o.startswith("lr=")]
    return float(items[-1]) if items else 0.03


def _changes(run: dict) -> np.ndarray:
    """Per-episode IoU change of an ``evaluate --adapt`` run (or an adapt_study variant), in points."""
    return np.array([e["iou_after"] - e["iou_before"] for e in run["episodes"]]) * 100


def _options(run: dict) -> list[str]:
    """The run's ``--adapt-set`` items; for runs made before the loss default became ``balanced``
    (they do not record ``adapt_config``), the ``loss=ce`` that their ``loss="auto"`` meant with
    2 or more shots; ``lr=`` (:func:`run_lr`) only where it is not today's default for the run's
    number of shots (1-shot runs before 2026-12-05: ``lr=0.03``); ``--adapt-grouped MODE`` where the
    run's fold of the depthwise convs is not today's (:func:`_today_fold`; runs of the shipped default
    at 1 shot before that fold became its default: ``--adapt-grouped none``)."""
    options = [o for o in run["config"].get("adapt_set") or [] if not o.startswith("lr=")]
    lr = run_lr(run)
    if lr != default_lr(run["config"]["shots"]):
        options.append(f"lr={lr:g}")
    legacy = "adapt_config" not in run["config"] and run["config"]["shots"] >= 2
    if legacy and not any(o.startswith("loss=") for o in options):
        options.append("loss=ce")
    grouped = _grouped_mode(run)
    if grouped != _today_fold(run):
        options.append(NO_FOLD if grouped is None else
                       "--adapt-grouped" if grouped == "per-group" else f"--adapt-grouped {grouped}")
    return options


NO_FOLD = "--adapt-grouped none"


@functools.cache
def _registry_entries() -> dict:
    return read_registry()[1]


def _today_fold(run: dict) -> str | None:
    """The fold of the depthwise convs whose values today's defaults train for the run's registry model
    and number of shots (registry ``adapt_grouped``, ``AdaptConfig.grouped``), else ``None``."""
    entry = _registry_entries().get(run["config"]["model"])
    if entry is None or not AdaptConfig().trains_grouped(run["config"]["shots"]):
        return None
    return adapt_fold(entry)


def _label(run: dict) -> str:
    """Options and whether the support gate ran, e.g. ``loss=ce`` + gate."""
    gated = "reverted" in run["episodes"][0]
    return (" ".join(f"`{o}`" for o in _options(run)) or "defaults") + (", gate" if gated else ", no gate")


def paired_runs_table(min_episodes: int = 100) -> str:
    """Every two ``evaluate --adapt`` runs of the same model, shots and seed with at least
    ``min_episodes`` episodes in common (checked: same queries in the same order): the per-episode
    IoU change of the first minus that of the second, on their common episodes."""
    runs = _adapt_runs()
    rows = ["| run | minus run | episodes | options | minus options | change minus change (pts, mean +- s.e.) |",
            "|---|---|---|---|---|---|"]
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = runs[a], runs[b]
            same = all(ra["config"][k] == rb["config"][k] for k in ("model", "shots", "seed", "classes"))
            pairs = list(zip(ra["episodes"], rb["episodes"], strict=False))
            if not same or len(pairs) < min_episodes or any(x["query"] != y["query"] for x, y in pairs):
                continue
            diff = _changes(ra)[:len(pairs)] - _changes(rb)[:len(pairs)]
            if not diff.any():
                continue
            opt_a, opt_b = _label(ra), _label(rb)
            rows.append(f"| `{a}` | `{b}` | {len(diff)} | {opt_a} | {opt_b} | "
                        f"{_mean_se(diff)} |")
    return "\n".join(rows)


def adapted_evaluation_table() -> str:
    """The ``evaluate --adapt`` runs (``eval_adapt_*.json``): the defaults, many episodes."""
    rows = ["| model | options | gate | shots | episodes (seed) | mIoU before -> after | FB-IoU before -> after | "
            "IoU change per episode (pts, mean +- s.d., s.e.) | losing > 5 pts | gaining > 5 pts | "
            "adaptation s (median / p90) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in _adapt_runs().values():
        d = _changes(r)
        sec = r["adapt_seconds"]
        model = r["config"]["model"] or Path(r["config"]["checkpoint"] or "?").name
        options = " ".join(f"`{o}`" for o in _options(r)) or "defaults"
        gated = [e["reverted"] for e in r["episodes"] if "reverted" in e]
        gate = f"support ({100 * np.mean(gated):.0f}% undone)" if gated else "none"
        rows.append(f"| {model} | {options} | {gate} | {r['config']['shots']} | {len(d)} ({r['config']['seed']}) | "
                    f"{r['miou_before']:.1f} -> {r['miou']:.1f} | "
                    f"{r['fbiou_before']:.1f} -> {r['fbiou']:.1f} | {d.mean():+.2f} +- {d.std(ddof=1):.2f} "
                    f"(s.e. {d.std(ddof=1) / np.sqrt(len(d)):.2f}) | {100 * (d < -5).mean():.1f}% | "
                    f"{100 * (d > 5).mean():.1f}% | {sec['median']:.1f} / {sec['p90']:.1f} |")
    return "\n".join(rows)


def _has_kinds(classes: Iterable[str]) -> bool:
    """Whether :func:`_kind` applies: every class is one of fss-dev's everyday-kind, garment or street classes."""
    return all(c in EVERYDAY_KINDS or c.startswith(("clothing_", "street_")) for c in classes)


def _kind_order(kinds: Iterable[str]) -> list[str]:
    """The distinct kinds of ``kinds``, the everyday kinds first, the others in order of appearance."""
    return list(dict.fromkeys(sorted(kinds, key=lambda k: not k.startswith("everyday"))))


def _kind(name: str) -> str:
    """The group a held-out class belongs to in ``adaptation_by_kind_table``."""
    if name in EVERYDAY_KINDS:
        return "everyday kinds (animals, vehicles, people)"
    return "garments" if name.startswith("clothing_") else "street surfaces (fence, road)"


DEFAULT_OPTIONS = {"loss=balanced", "one_shot=views"}  # --adapt-set items that restate today's defaults


def adaptation_by_kind_table() -> str:
    """``evaluate --adapt`` runs of the shipped model (and its 2+-shot computation) with the
    defaults, their per-episode IoU change split by the kind of class (``_kind``), also averaged
    class by class (the s.e. over classes: how much the mean depends on which classes were drawn)."""
    rows = ["| run | model | shots | lr | episodes (seed) | classes | change (pts, mean +- s.e.) | losing > 5 pts | "
            "gaining > 5 pts | classes gaining on average | mean of the class means +- s.e. over classes |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in _adapt_runs().items():
        model = r["config"]["model"]
        defaults = _defaults_but_step(r) and "reverted" in r["episodes"][0]
        if model not in ("refine-dual-svf-lite2", "refine-svf-lite2") or not defaults:
            continue
        change = _changes(r)
        classes = np.array([e["class"] for e in r["episodes"]])
        kinds = np.array([_kind(c) for c in classes])
        for kind in _kind_order(kinds):
            d, names = change[kinds == kind], classes[kinds == kind]
            per_class = np.array([d[names == c].mean() for c in dict.fromkeys(names)])
            rows.append(f"| `{name}` | {model} | {r['config']['shots']} | {run_lr(r):g} | {len(d)} "
                        f"({r['config']['seed']}) | {kind} "
                        f"| {_mean_se(d)} | {100 * (d < -5).mean():.1f}% | {100 * (d > 5).mean():.1f}% "
                        f"| {(per_class > 0).sum()} of {len(per_class)} | {_mean_se(per_class)} |")
    return "\n".join(rows)


def _study_variants(data: dict) -> dict[str, dict]:
    """The variants of an ``adapt_study`` file that measured what they say. Files written before
    ``comparison_targets_from_base`` existed ran a ``bn``/``full`` variant on the singular values the
    preceding ``svf`` variant had adapted (the predictor left them loaded in the shared model), so
    their ``bn``/``full`` variants that follow an ``svf`` one are left out."""
    if data.get("comparison_targets_from_base"):
        return data["variants"]
    kept, seen_svf = {}, False
    for name, v in data["variants"].items():
        if v["config"]["target"] != "svf" and seen_svf:
            continue
        seen_svf |= v["config"]["target"] == "svf"
        kept[name] = v
    return kept


def adaptation_table() -> str:
    """One row per variant of each ``adapt_study_*.json`` (see :func:`_study_variants`); *minus
    first, paired*: the per-episode change minus that of the file's first variant on the same
    episode (mean +- s.e.)."""
    rows = ["| shots | model | variant | episodes | IoU before | IoU after | change (pts) | s.d. | s.e. | "
            "minus first variant, paired | episodes losing > 5 pts | gate undid | median s | p90 s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for data in _studies().values():
        first = None
        for variant, v in _study_variants(data).items():
            sec = v["seconds"]
            change = _changes(v)
            paired = ""
            if first is None:
                first = change
            else:
                diff = change - first
                paired = _mean_se(diff)
            undid = f"{100 * v['share_reverted']:.0f}%" if "share_reverted" in v else "no gate"
            if v["config"].get("loss") == "auto" and data["shots"] >= 2:  # before balanced became the default
                variant += ":loss=ce" if ":" not in variant else ",loss=ce"
            variant += _study_variant_suffix(data, v)
            rows.append(f"| {data['shots']} | {data['model']} | `{variant}` | {data['episodes']} | "
                        f"{v['mean_before']:.1f} | {v['mean_after']:.1f} | {v['mean_change']:+.2f} | "
                        f"{v['std_change']:.2f} | {v['se_change']:.2f} | {paired} | "
                        f"{100 * v['share_losing_5pts']:.0f}% | {undid} | {sec['median']:.1f} | {sec['p90']:.1f} |")
    return "\n".join(rows)


def _grouped_label(grouped: bool | str) -> str:
    """How a study's ``--grouped`` switch decomposed the depthwise conv, as a label suffix."""
    return {"shared": " (+ depthwise, shared basis)", "kernel": " (+ depthwise, per-kernel SVD)"}.get(
        grouped, " (+ depthwise)")


def _trained_fold(fold: bool | str | None, config: dict, shots: int) -> str | None:
    """``fold`` (a run's decomposition of the grouped convs; ``True`` is ``"per-group"``) where its
    adaptation ``config`` trained those values with ``shots`` supports, else ``None``. Configs
    recorded before ``AdaptConfig.grouped`` existed trained them always."""
    if not fold or config.get("target", "svf") != "svf":
        return None
    if not AdaptConfig(grouped=config.get("grouped", "always")).trains_grouped(shots):
        return None
    return grouped_fold_of(fold)


def _study_fold(study: dict, variant: dict) -> str | None:
    """:func:`_trained_fold` of a study variant (the study records its fold as ``svf_grouped``)."""
    return _trained_fold(study.get("svf_grouped"), variant["config"], study["shots"])


def _study_variant_suffix(study: dict, variant: dict) -> str:
    """:func:`_grouped_label` for an ``svf`` variant that trained the values of a ``--grouped``
    study's decomposed depthwise convs, else ``""``."""
    grouped = _study_fold(study, variant)
    return _grouped_label(grouped) if grouped else ""


def _same_episodes(study: dict, variant: dict, run: dict) -> bool:
    """Whether an ``adapt_study`` variant and an ``evaluate --adapt`` run began with the same episodes
    (the shorter one's): same model, shots, seed and classes, and per episode the same class, query
    (when recorded) and IoU before adapting (to 1e-4: a few pixels of a query may differ between
    torch builds)."""
    config = run["config"]
    model = config["model"] or Path(config["checkpoint"]).name
    if (model, config["shots"], config["seed"], config["classes"]) != (
            study["model"], study["shots"], study["seed"], study["held_out"]):
        return False
    pairs = list(zip(variant["episodes"], run["episodes"], strict=False))
    return bool(pairs) and all(
        a["class"] == b["class"] and a.get("query", b["query"]) == b["query"]
        and abs(a["iou_before"] - b["iou_before"]) < 1e-4 for a, b in pairs)


def _study_pairs() -> Iterator[tuple[dict, str, dict, dict, np.ndarray, np.ndarray]]:
    """``(study, variant name, variant, run, SVF change, variant change)`` for every variant of an
    ``adapt_study`` file run on the first episodes of an ``evaluate --adapt`` run with the defaults
    (checked by :func:`_same_episodes`; changes per episode, in points; a variant that ran more
    episodes than the run is cut to the run's), leaving out variants that are the defaults again."""
    runs = _runs_with_default_svf()
    for study in _studies().values():
        if "held_out" not in study or not study.get("comparison_targets_from_base"):
            continue
        for variant, v in study["variants"].items():
            for run in runs:
                if not _same_episodes(study, v, run):
                    continue
                n = min(len(v["episodes"]), len(run["episodes"]))
                paired = {**v, "episodes": v["episodes"][:n]}
                svf, other = _changes(run)[:n], _changes(paired)
                if (other - svf).any():
                    yield study, variant, paired, run, svf, other


def study_against_evaluate_table() -> str:
    """The variants of ``adapt_study`` files (``bn``, ``full``, SVF with other settings) run on the
    episodes of an ``evaluate --adapt`` run with the defaults (SVF), paired episode by episode
    (:func:`_study_pairs`): the default SVF run does not have to be repeated inside the study."""
    rows = ["| model | shots | variant | episodes (seed) | SVF lr | SVF change (pts, mean +- s.e.) | variant change | "
            "variant minus SVF, paired | losing > 5 pts: SVF / variant | classes where the variant gains more | "
            "median s: SVF (whole run) / variant |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for study, variant, v, run, svf, other in _study_pairs():
        names = np.array([e["class"] for e in v["episodes"]])
        classes = list(dict.fromkeys(names))
        wins = sum(other[names == c].mean() > svf[names == c].mean() for c in classes)
        label = f"`{variant}`{_study_variant_suffix(study, v)}"
        rows.append(f"| {study['model']} | {study['shots']} | {label} | {len(svf)} ({study['seed']}) | "
                    f"{run_lr(run):g} | {_mean_se(svf)} | {_mean_se(other)} | {_mean_se(other - svf)} | "
                    f"{100 * (svf < -5).mean():.0f}% / {100 * (other < -5).mean():.0f}% | "
                    f"{wins} of {len(classes)} | {run['adapt_seconds']['median']:.1f} / "
                    f"{v['seconds']['median']:.1f} |")
    return "\n".join(rows)


def pooled_variant_against_svf(variant: str = "full:lr=0.001", label: str = "full", files_apart: bool = False) -> str:
    """A study variant (by default full fine-tuning of the adapt blocks; ``dense:lr=0.001``: of the
    convs SVF decomposes; ``bn:lr=0.003``: the blocks' BatchNorm affine parameters; ``svf --grouped
    kernel``: the ``svf`` variant of a ``--grouped kernel`` study) against SVF adaptation with
    today's defaults, every paired study of :func:`_study_pairs`
    taken together per shot count (with ``files_apart``, the studies of a model file - the far-transfer
    split's - in rows of their own, per set of held-out classes). SVF's changes are the evaluate run's
    where it used today's step (:func:`default_lr`), else those of an ``svf:lr=`` study variant at that
    step on the same run's episodes (only the episodes both studies ran count)."""
    pooled: dict[tuple[int, tuple[str, ...]], list] = {}
    for run, variants in _study_pairs_by_run():
        study = variants[0][1]
        shots = study["shots"]
        step = default_lr(shots)
        svf = _changes(run) if run_lr(run) == step else next(
            (c for key, _, _, c in variants if key == f"svf:lr={step:g}"), None)
        for key, _, v, other in variants:
            if key == variant and svf is not None:
                n = min(len(svf), len(other))
                model_file = files_apart and study["model"].endswith(".safetensors")
                pooled.setdefault((shots, tuple(sorted(study["held_out"])) if model_file else ()), []).append(
                    (f"{study['model']} ({study['seed']})", svf[:n], other[:n], _classes(v)[:n]))
    return _pooled_table(pooled, "SVF", label, by_kind=files_apart)


def _study_pairs_by_run() -> list[tuple[dict, list[tuple[str, dict, dict, np.ndarray]]]]:
    """:func:`_study_pairs` grouped by their ``evaluate --adapt`` run, in the order they come:
    ``(run, [(variant key (:func:`_variant_key`), study, variant, variant change), ...])``."""
    by_run: dict[int, tuple[dict, list]] = {}  # holds the runs, so that an id cannot be reused
    for study, name, v, run, _, other in _study_pairs():
        by_run.setdefault(id(run), (run, []))[1].append((_variant_key(study, name, v), study, v, other))
    return list(by_run.values())


def _variant_key(study: dict, name: str, variant: dict) -> str:
    """A study variant's name, with ``--grouped MODE`` added to an ``svf`` variant that trained the
    values of a ``--grouped`` study's decomposed depthwise convs."""
    grouped = _study_fold(study, variant)
    return f"{name} --grouped {grouped}" if grouped and name == "svf" else name


COMPARISON_TARGETS = ("bn:lr=0.003", "dense:lr=0.001", "full:lr=0.001")  # full last: the reference
KERNEL_SVF = "SVF with each depthwise filter decomposed (`--grouped kernel`)"
TODAY_STEP_SVF = "SVF at today's step"  # an svf:lr= study variant at the default step of a run made at another


def against_full_table() -> str:
    """Per ``evaluate --adapt`` run with the defaults: SVF as run, SVF with the adapt block's depthwise
    filters decomposed kernel by kernel (an ``svf`` variant of a ``--grouped kernel`` study), and
    tuning of the block's BatchNorm affine parameters (``bn``), of the decomposed convs' weights
    (``dense``) and of every weight of the block (``full``), each on the first episodes it and ``full``
    both ran (:func:`_study_pairs`), against ``full`` paired. Only runs with a ``full`` study and at
    least one of the others. The run's own SVF is named with its step where that is not today's."""
    rows = ["| shots | run (model, seed) | episodes | adapts | change (pts, mean +- s.e.) | minus full, paired | "
            "losing > 5 pts |",
            "|---|---|---|---|---|---|---|"]
    for run, study, changes in sorted(_kernel_and_weight_changes(), key=lambda r: (r[1]["shots"], r[1]["seed"])):
        full = f"`{COMPARISON_TARGETS[-1]}`"
        if full not in changes or len(changes) < 3:
            continue
        shots = study["shots"]
        at_today_step = run_lr(run) == default_lr(shots)
        default = " (the default)" if shots > 1 else ""
        shown = {"SVF (defaults)": "SVF, depthwise filters whole"
                 + (default if at_today_step else f" at lr {run_lr(run):g}"),
                 TODAY_STEP_SVF: f"SVF, depthwise filters whole at lr {default_lr(shots):g}{default}",
                 KERNEL_SVF: "SVF, each depthwise filter decomposed (`--grouped kernel`)"
                 + (" (the default)" if shots == 1 else "")}
        for label in ("SVF (defaults)", TODAY_STEP_SVF, KERNEL_SVF, *(f"`{t}`" for t in COMPARISON_TARGETS)):
            if label in changes:
                n = min(len(changes[label]), len(changes[full]))
                c = changes[label][:n]
                paired = _mean_se(c - changes[full][:n]) if label != full else ""
                rows.append(f"| {shots} | {study['model']} ({study['seed']}) | {n} | {shown.get(label, label)} | "
                            f"{_mean_se(c)} | {paired} | {100 * (c < -5).mean():.0f}% |")
    return "\n".join(rows)


def depthwise_step_table() -> str:
    """SVF with each depthwise filter decomposed at another step for the depthwise values (``svf:``
    variants with ``grouped_lr_scale`` in a ``--grouped kernel`` study) against the same decomposition
    at the common step (the ``svf`` variant of a ``--grouped kernel`` study), on the episodes of the
    same ``evaluate --adapt`` run that both ran, every paired study taken together per shot count and
    set of held-out classes."""
    pooled: dict[tuple[int, tuple[str, ...]], list] = {}
    for _run, pairs in _study_pairs_by_run():
        variants = {key: (study, other) for key, study, v, other in pairs if _study_fold(study, v) == "kernel"}
        kernel = variants.get("svf --grouped kernel")
        for name, (study, other) in variants.items():
            if kernel is None or "grouped_lr_scale" not in name:
                continue
            n = min(len(kernel[1]), len(other))
            key = (study["shots"], tuple(sorted(study["held_out"])))
            label = f"{study['model']} ({study['seed']}) `{name}`"
            pooled.setdefault(key, []).append((label, kernel[1][:n], other[:n], _classes(study["variants"][name])[:n]))
    return _pooled_table(pooled, "kernel", "scaled step")


def _kernel_and_weight_changes() -> list[tuple[dict, dict, dict[str, np.ndarray]]]:
    """Per ``evaluate --adapt`` run with the defaults: ``(run, a study, {label: per-episode changes})``
    of SVF as run, of the ``svf`` variant of a ``--grouped kernel`` study (:data:`KERNEL_SVF`) and of
    the :data:`COMPARISON_TARGETS` studies on its episodes (:func:`_study_pairs_by_run`)."""
    found = []
    for run, variants in _study_pairs_by_run():
        today = f"svf:lr={default_lr(run['config']['shots']):g}"
        chosen = [(key, study, other) for key, study, _, other in variants
                  if key in ("svf --grouped kernel", today) or key in COMPARISON_TARGETS]
        if chosen:
            changes = {"SVF (defaults)": _changes(run)}
            labels = {"svf --grouped kernel": KERNEL_SVF, today: TODAY_STEP_SVF}
            changes.update((labels.get(key, f"`{key}`"), other) for key, _, other in chosen)
            found.append((run, chosen[0][1], changes))
    return found


def kernel_against_table(target: str = COMPARISON_TARGETS[-1], label: str = "full") -> str:
    """1 shot, where the shipped default decomposes each depthwise filter: that SVF against another
    ``target`` of :data:`COMPARISON_TARGETS` (by default full fine-tuning of the block,
    ``full:lr=0.001``; ``label`` names it in the table) on the same episodes, every set taken
    together - the sets of :func:`against_full_table` and the ``--grouped kernel`` studies that ran
    both variants themselves (``--variants svf full:lr=0.001``) on episodes of no ``evaluate`` run."""
    runs = _runs_with_default_svf()
    pooled: dict[tuple[int, tuple[str, ...]], list] = {}
    for run, study, changes in _kernel_and_weight_changes():
        if study["shots"] == 1 and KERNEL_SVF in changes and f"`{target}`" in changes:
            n = min(len(changes[KERNEL_SVF]), len(changes[f"`{target}`"]))
            pooled.setdefault((1, tuple(sorted(study["held_out"]))), []).append(
                (f"{study['model']} ({study['seed']})", changes[KERNEL_SVF][:n], changes[f"`{target}`"][:n],
                 _classes(run)[:n]))
    for study in _studies().values():
        variants = study["variants"]
        if (study["shots"] != 1 or not study.get("comparison_targets_from_base") or target not in variants
                or "svf" not in variants or _study_fold(study, variants["svf"]) != "kernel"
                or any(_same_episodes(study, variants["svf"], run) for run in runs)):
            continue
        n = min(len(variants["svf"]["episodes"]), len(variants[target]["episodes"]))
        pooled.setdefault((1, tuple(sorted(study["held_out"]))), []).append(
            (f"{study['model']} ({study['seed']})", _changes(variants["svf"])[:n], _changes(variants[target])[:n],
             _classes(variants["svf"])[:n]))
    return _pooled_table(pooled, "kernel SVF", label)


def step_table(shots: int, small: float = 0.01, large: float = 0.03) -> str:
    """SVF at lr ``small`` against lr ``large`` with ``shots`` supports on the same episodes, every
    paired study of :func:`_study_pairs` taken together (``svf:lr=<small>`` studies of runs at
    ``large`` and ``svf:lr=<large>`` studies of runs at ``small``), per set of held-out classes, each
    split by kind (``_kind``) too. ``small`` is the default at 1 shot since 2026-12-05, with more since
    2026-12-06."""
    pooled: dict[tuple[int, tuple[str, ...]], list] = {}
    seen: dict[int, dict] = {}
    for study, name, v, run, svf, other in _study_pairs():
        if study["shots"] != shots or id(v) in seen:
            continue
        pair = {(f"svf:lr={small:g}", large): (svf, other),
                (f"svf:lr={large:g}", small): (other, svf)}.get((name, run_lr(run)))
        if pair is not None:
            seen[id(v)] = v
            pooled.setdefault((shots, tuple(sorted(study["held_out"]))), []).append(
                (f"{study['model']} ({study['seed']})", *pair, _classes(v)))
    return _pooled_table(pooled, f"lr {large:g}", f"lr {small:g}")


def variant_pair_table(first: str, second: str, first_label: str, second_label: str) -> str:
    """Two variants of ``adapt_study`` files run on the episodes of the same ``evaluate --adapt`` run
    (:func:`_study_pairs_by_run`; keys as :func:`_variant_key` names them), ``second`` against
    ``first`` on the episodes both ran, every such run taken together per shot count and set of
    held-out classes, then each run alone and each kind of class."""
    pooled: dict[tuple[int, tuple[str, ...]], list] = {}
    for _run, variants in _study_pairs_by_run():
        found = {key: (study, v, change) for key, study, v, change in variants}
        if first in found and second in found:
            (study, v, a), b = found[first], found[second][2]
            n = min(len(a), len(b))
            pooled.setdefault((study["shots"], tuple(sorted(study["held_out"]))), []).append(
                (f"{study['model']} ({study['seed']})", a[:n], b[:n], _classes(v)[:n]))
    return _pooled_table(pooled, first_label, second_label, by_set=True)


def _classes(variant: dict) -> list[str]:
    return [e["class"] for e in variant["episodes"]]


def _pooled_table(pooled: dict[tuple[int, tuple[str, ...]], list], first: str, second: str,
                  by_kind: bool = False, by_set: bool = False) -> str:
    """``{(shots, held-out classes or ()): [(run label, first's change, second's change, classes)]}``
    -> one row per key, and per kind where the key's held-out classes (with ``by_kind``, the episodes'
    classes of a key without them) are fss-dev's of several kinds; with ``by_set``, also one row per
    run of a key that pools several."""
    rows = [f"| shots | runs (model, seed) | episodes | {first} change (pts, mean +- s.e.) | {second} change | "
            f"{second} minus {first}, paired | losing > 5 pts: {first} / {second} |",
            "|---|---|---|---|---|---|---|"]
    for shots, split in sorted(pooled, key=lambda key: (key[0], not _has_kinds(key[1]), -len(key[1]))):
        parts = pooled[shots, split]
        a = np.concatenate([p[1] for p in parts])
        b = np.concatenate([p[2] for p in parts])
        groups = [(", ".join(p[0] for p in parts), np.ones(len(a), bool))]
        classes = [c for p in parts for c in p[3]]
        if by_set and len(parts) > 1:
            part_of = np.repeat(np.arange(len(parts)), [len(p[1]) for p in parts])
            groups += [(f"the same: {p[0]} alone", part_of == i) for i, p in enumerate(parts)]
        if (split and _has_kinds(split)) or (by_kind and not split and _has_kinds(classes)):
            kinds = np.array([_kind(c) for c in classes])
            if len(set(kinds)) > 1:
                groups += [(f"the same: {k}", kinds == k) for k in _kind_order(kinds)]
        for runs, m in groups:
            rows.append(f"| {shots} | {runs} | {m.sum()} | {_mean_se(a[m])} | "
                        f"{_mean_se(b[m])} | {_mean_se(b[m] - a[m])} | "
                        f"{100 * (a[m] < -5).mean():.0f}% / {100 * (b[m] < -5).mean():.0f}% |")
    return "\n".join(rows)


def per_class_table(name: str) -> str:
    """Mean IoU change per class and per kind (``_kind``) of one ``eval_adapt_*.json`` run, or of an
    ``adapt_study_*.json`` file's variants next to the default SVF of the evaluate run whose episodes
    they share (:func:`_same_episodes`), with the variant minus SVF paired, on the episodes all of
    them ran."""
    data = json.loads((RESULTS / name).read_text())
    columns: dict[str, np.ndarray] = {}
    if "variants" in data:
        runs = _runs_with_default_svf()
        for variant, v in data["variants"].items():
            run = next((r for r in runs if _same_episodes(data, v, r)), None)
            change = _changes(v)
            svf = None if run is None else _changes(run)
            n = len(change) if svf is None else min(len(change), len(svf))
            if svf is not None:
                columns["SVF (evaluate run)"] = svf[:n]
            columns[variant] = change[:n]
            if svf is not None:
                columns[f"{variant} minus SVF"] = change[:n] - svf[:n]
        episodes = next(iter(data["variants"].values()))["episodes"]
    else:
        columns["change"], episodes = _changes(data), data["episodes"]
    n = min(len(c) for c in columns.values())  # the episodes every column ran
    columns, episodes = {k: c[:n] for k, c in columns.items()}, episodes[:n]
    classes = np.array([e["class"] for e in episodes])
    groups = [(c, classes == c) for c in dict.fromkeys(classes)]
    kind = (lambda c: FAR_KIND_NAMES[FAR_KINDS[c]]) if set(classes) <= set(FAR_KINDS) else _kind
    groups += [(k, np.array([kind(c) == k for c in classes])) for k in dict.fromkeys(kind(c) for c in classes)]
    rows = ["| class or kind | episodes | " + " | ".join(f"{c} (pts, mean +- s.e.)" for c in columns) + " |",
            "|---|---|" + "---|" * len(columns)]
    for label, mask in groups:
        cells = [_mean_se(v[mask]) if mask.sum() > 1 else f"{v[mask].mean():+.2f}" for v in columns.values()]
        rows.append(f"| {label} | {mask.sum()} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _resolved_loss(config: dict, shots: int) -> str:
    """The loss a variant trained with (``auto``, the former default, meant ``ce`` from 2 shots on)."""
    if config.get("loss") == "auto":
        return "balanced" if shots == 1 else "ce"
    return config.get("loss", "ce")


def _paired(change: np.ndarray, episodes: list, ref: tuple[np.ndarray, dict, list] | None) -> str:
    """``change`` minus ``ref``'s change on their common episodes (mean +- s.e.), ``""`` without ``ref``."""
    if ref is None:
        return ""
    n = min(len(change), len(ref[0]))
    if episodes[:n] != ref[2][:n]:
        return "episodes differ"
    return _mean_se(change[:n] - ref[0][:n])


def learning_rate_table(models: tuple[str, ...] = ("refine-svf-lite2", "refine-dual-svf-lite2"), seed: int = 2) -> str:
    """SVF, BatchNorm and full fine-tuning at every learning rate and number of steps tried with today's
    other defaults (class-balanced loss, support gate, the model's adapt modules), on the same seeded
    episodes of every ``adapt_study_*.json`` of each of ``models``; *minus SVF default, paired*: the per-episode
    change minus that of ``svf`` at lr 0.03 and 10 steps on the same episodes; *minus 10 steps*: minus
    the same target and lr at 10 steps (files are matched on their episodes' classes and IoU before
    adapting, which the same episodes reproduce exactly)."""
    defaults = {"gate": "support", "objective": "auto", "modules": None, "optimizer": "layer_sgd"}
    found: dict[tuple[str, int], dict[tuple[str, bool, float, int], tuple[np.ndarray, dict, list]]] = {}
    for data in _studies().values():
        if data["model"] not in models or data["seed"] != seed:
            continue
        for v in _study_variants(data).values():
            cfg = v["config"]
            if any(cfg.get(k) != d for k, d in defaults.items()) or _resolved_loss(cfg, data["shots"]) != "balanced":
                continue
            key = (cfg["target"], _study_fold(data, v) or False, cfg["lr"], cfg["steps"])
            episodes = [(e["class"], round(e["iou_before"], 9)) for e in v["episodes"]]
            found.setdefault((data["model"], data["shots"]), {}).setdefault(key, (_changes(v), v, episodes))
    rows = ["| model | shots | trains | lr | steps | episodes | change (pts, mean +- s.e.) "
            "| minus SVF default, paired | minus 10 steps, paired | losing > 5 pts | gate undid | median s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, shots in sorted(found, key=lambda ms: (models.index(ms[0]), ms[1])):
        runs = found[model, shots]
        for key, (change, v, episodes) in sorted(runs.items(), key=lambda kv: (
                ["svf", "bn", "depthwise", "dense", "full"].index(kv[0][0]), str(kv[0][1]), kv[0][2:])):
            target, grouped, lr, steps = key
            vs_svf = _paired(change, episodes, runs.get(("svf", False, 0.03, 10))) if key != (
                "svf", False, 0.03, 10) else ""
            vs_steps = _paired(change, episodes, runs.get((target, grouped, lr, 10))) if steps != 10 else ""
            label = {"svf": "singular values", "bn": "BatchNorm affine", "depthwise": "depthwise filters",
                     "dense": "the decomposed convs' weights", "full": "every weight"}[target]
            label += _grouped_label(grouped) if grouped else ""
            rows.append(f"| {model} | {shots} | {label} | {lr:g} | {steps} | {len(change)} | {_mean_se(change)} | "
                        f"{vs_svf} | {vs_steps} | {100 * (change < -5).mean():.0f}% | "
                        f"{100 * v['share_reverted']:.0f}% | {v['seconds']['median']:.1f} |")
    return "\n".join(rows)


def _same_queries(a: list[dict], b: list[dict]) -> int:
    """How many leading episodes two per-episode lists share (same class and query), or 0 where the
    first ones differ."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x["class"] != y["class"] or x.get("query", y.get("query")) != y.get("query", x.get("query")):
            break
        n += 1
    return n


def _without_mirror(run: dict) -> tuple[str, dict] | None:
    """The adaptation of a ``flip_adapt_*.json`` run (``evaluate --adapt --flip``) on the same episodes
    without the mirror: an ``evaluate --adapt`` run with the same options, else the ``svf`` variant (or
    an ``svf:lr=`` one that sets only the step) of an ``adapt_study`` at the run's step whose depthwise
    fold trained as the run's did. ``(file name, run or variant)``."""
    cfg = run["config"]
    key = (cfg["model"], cfg["shots"], cfg["seed"], cfg["classes"])
    for name, ref in _adapt_runs().items():
        rc = ref["config"]
        if ((rc["model"], rc["shots"], rc["seed"], rc["classes"]) == key and _options(ref) == _options(run)
                and _same_queries(run["episodes"], ref["episodes"])):
            return name, ref
    for file_name, study in _studies().items():
        for name, v in study.get("variants", {}).items():
            if ((name == "svf" or (name.startswith("svf:lr=") and "," not in name))
                    and (study["model"], study["shots"], study["seed"], study.get("held_out")) == key
                    and float(v["config"].get("lr") or default_lr(study["shots"])) == run_lr(run)
                    and _study_fold(study, v) == _grouped_mode(run)
                    and _same_queries(run["episodes"], v["episodes"])):
                return file_name, v
    return None


def flip_adaptation_table() -> str:
    """Adaptation with the defaults where each query is also segmented mirrored (``evaluate --adapt
    --flip``, as the app segments: ``flip_adapt_*.json``) against the same adaptation without the
    mirror on the same episodes (:func:`_without_mirror`). The mirror changes only how the query is
    predicted, so the adaptations themselves are the same: the share of equal gate decisions checks it.
    A run at another step than today's default names its step."""
    rows = ["| shots | run (model, seed) | episodes | mIoU with the mirror: before -> after | change with the "
            "mirror (pts, mean +- s.e.) | change without | with minus without, paired | losing > 5 pts: "
            "without / with | same gate decisions | reference without the mirror |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("flip_adapt_*.json")):
        run = json.loads(path.read_text())
        found = _without_mirror(run)
        if found is None:
            continue
        ref_name, ref = found
        n = _same_queries(run["episodes"], ref["episodes"])
        with_mirror, without = _changes(run)[:n], _changes(ref)[:n]
        same_gate = np.mean([a.get("reverted") == b.get("reverted")
                             for a, b in zip(run["episodes"][:n], ref["episodes"][:n], strict=True)])
        cfg = run["config"]
        step = "" if run_lr(run) == default_lr(cfg["shots"]) else f", lr {run_lr(run):g}"
        rows.append(f"| {cfg['shots']} | {cfg['model']} ({cfg['seed']}){step} | {n} | {run['miou_before']:.1f} -> "
                    f"{run['miou']:.1f} | {_mean_se(with_mirror)} | {_mean_se(without)} | "
                    f"{_mean_se(with_mirror - without)} | {100 * (without < -5).mean():.0f}% / "
                    f"{100 * (with_mirror < -5).mean():.0f}% | {100 * same_gate:.0f}% | `{ref_name}` |")
    return "\n".join(rows)


def cue_table() -> str:
    """``benchmarks/cue_foreground.py`` runs (``cue_foreground_*.json``): how object-centred the cue
    panel's maps are (mean map value on the object minus on the background, x100) for the components
    an adaptation raised and lowered most, and for components drawn at random from the same layer."""
    rows = ["| shots | episodes scored (undone by the gate) | layer | image | rising cues | falling cues | random "
            "components | rising minus falling, paired | episodes with rising > falling |",
            "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("cue_foreground_*.json")):
        run = json.loads(path.read_text())
        undone = sum(e["reverted"] for e in run["episodes"])
        scored = len(run["episodes"]) - undone
        for key, e in run["summary"].items():
            layer, where = key.split(" | ")
            cells = [f"{e[k]['mean']:+.1f} +- {e[k]['se']:.1f}" for k in
                     ("rising", "falling", "random", "rising_minus_falling")]
            rows.append(f"| {run['shots']} | {scored} ({undone}) | {layer} | {where} | {' | '.join(cells)} | "
                        f"{100 * e['share_rising_larger']:.0f}% |")
    return "\n".join(rows)


GATE_MARGINS = (0.0, 0.01, 0.02, 0.05)


def _grouped_mode(run: dict) -> str | None:
    """The run's ``--adapt-grouped`` mode where its adaptation trained those values: ``None`` (off, or
    not trained with the run's shots), ``"per-group"`` (recorded as ``true`` by runs made before the
    shared-basis mode existed), ``"shared"`` or ``"kernel"``."""
    cfg = run["config"]
    return _trained_fold(cfg.get("adapt_grouped"), cfg.get("adapt_config") or {}, cfg["shots"])


def _same_settings_key(run: dict) -> tuple:
    """Model, ``--adapt-set`` items, shots, seed and depthwise switch of an ``evaluate --adapt`` run."""
    cfg = run["config"]
    return cfg["model"], cfg.get("adapt_set") or [], cfg["shots"], cfg["seed"], _grouped_mode(run)


def _gate_sources() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(label, ungated change [pts], gate score gain [IoU])`` per run that recorded the gate's scores.

    A run with ``gate_margin=-1`` kept every adaptation, so its own changes are the ungated ones. A
    gated run is paired with a run without a gate of the same model, options, shots and seed over
    their common episodes: an undone adaptation predicts exactly as before, and a kept one must give
    exactly the query IoU of the run without a gate (checked; runs made with other code fail the
    check), so both runs together give the ungated changes."""
    runs = _adapt_runs()
    sources = []
    for name, r in runs.items():
        if "support_iou_after" not in r["episodes"][0]:
            continue
        gain = np.array([e["support_iou_after"] - e["support_iou_before"] for e in r["episodes"]])
        options = r["config"].get("adapt_set") or []
        if "gate_margin=-1" in options:
            sources.append((f"`{name}`", _changes(r), gain))
            continue
        for other, u in runs.items():
            if "support_iou_after" in u["episodes"][0] or _same_settings_key(u) != _same_settings_key(r):
                continue
            pairs = list(zip(r["episodes"], u["episodes"], strict=False))  # the common episodes
            if all(a["query"] == b["query"] and (a["reverted"] or abs(a["iou_after"] - b["iou_after"]) < 1e-9)
                   for a, b in pairs):
                sources.append((f"`{name}` + `{other}`", _changes(u)[:len(pairs)], gain[:len(pairs)]))
    return sources


def gate_margin_table() -> str:
    """What the support gate does at several margins (:func:`_gate_sources`), with the correlation
    of its score's gain with the query's change and the mean ungated change of the undone and the kept
    adaptations at margin 0."""
    rows = ["| runs | episodes | margin (IoU pts) | kept | change (pts, mean +- s.e.) | minus no gate, paired | "
            "losing > 5 pts | correlation | ungated change of undone / kept (pts) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for label, d, gain in _gate_sources():
        corr = float(np.corrcoef(d, gain)[0, 1])
        undone = d[gain <= 0]
        split = f"{undone.mean():+.2f} / {d[gain > 0].mean():+.2f}" if undone.size else f"- / {d.mean():+.2f}"
        for margin in (-1.0, *GATE_MARGINS):
            keep = gain > margin
            g = np.where(keep, d, 0.0)
            extra = f"{corr:.2f} | {split}" if margin == 0 else " | "
            paired = _mean_se(g - d) if margin >= 0 else ""
            rows.append(f"| {label} | {len(d)} | {'no gate' if margin < 0 else f'{100 * margin:g}'} | "
                        f"{100 * keep.mean():.0f}% | {_mean_se(g)} | "
                        f"{paired} | {100 * (g < -5).mean():.1f}% | {extra} |")
    return "\n".join(rows)


def pooled_change(names: list[str]) -> str:
    """The per-episode IoU change of several ``evaluate --adapt`` runs (results/ file names) taken
    together: episodes, mean +- s.e. and the share losing more than 5 points; then the same for each
    kind of class (``_kind``), unless the runs hold far-transfer classes (their kinds are other)."""
    runs = [json.loads((RESULTS / n).read_text()) for n in names]
    d = np.concatenate([_changes(r) for r in runs])
    lines = [f"{' + '.join(names)}: {len(d)} episodes, change {_mean_se(d)} pts, "
             f"{100 * (d < -5).mean():.1f}% losing > 5 pts"]
    classes = [e["class"] for r in runs for e in r["episodes"]]
    if _has_kinds(classes):
        kinds = np.array([_kind(c) for c in classes])
        for kind in _kind_order(kinds):
            k = d[kinds == kind]
            lines.append(f"  {kind}: {len(k)} episodes, change {_mean_se(k)} pts, "
                         f"{100 * (k < -5).mean():.1f}% losing > 5 pts")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--min-episodes", type=int, default=100,
                    help="fewest common episodes for a pair in the paired-runs table")
    ap.add_argument("--per-class", nargs="+", metavar="FILE", default=None,
                    help="only print the per-class and per-kind changes of these results/ files")
    ap.add_argument("--pool", nargs="+", metavar="FILE", default=None,
                    help="only print the IoU change of these evaluate --adapt runs taken together")
    args = ap.parse_args()
    if args.pool:
        print(pooled_change(args.pool))
        raise SystemExit(0)
    if args.per_class:
        for name in args.per_class:
            print(f"### {name}\n\n{per_class_table(name)}\n")
        raise SystemExit(0)
    print("### Accuracy\n")
    print(accuracy_table())
    print("\n### Each query also segmented mirrored\n")
    print(flip_table())
    print("\n### Meta-training SVF against BatchNorm and full fine-tuning\n")
    print(ablation_table())
    print("\n### Held-out classes of everyday kinds\n")
    print(everyday_table())
    print("\n### Far transfer: trained on clothing and street scenes, tested on animals, vehicles and people\n")
    print(far_transfer_table())
    print("\n### Adaptation on the far-transfer classes\n")
    print(far_adaptation_table())
    print("\n### The low-shot fallback\n")
    print(fallback_table())
    print("\n### Adaptation with the defaults\n")
    print(adapted_evaluation_table())
    print("\n### Adaptation with each query also segmented mirrored, as the app segments\n")
    print(flip_adaptation_table())
    print("\n### Cue maps: the components adaptation raised and lowered most, on labelled photos\n")
    print(cue_table())
    print("\n### Adaptation by kind of class\n")
    print(adaptation_by_kind_table())
    print("\n### Study variants against the default SVF adaptation on an evaluate run's episodes\n")
    print(study_against_evaluate_table())
    print("\n### Full fine-tuning against SVF with the default step, all paired studies together\n")
    print(pooled_variant_against_svf())
    print("\n### BatchNorm tuning against SVF with the default step, all paired studies together\n")
    print(pooled_variant_against_svf("bn:lr=0.003", "BatchNorm"))
    print("\n### Fine-tuning the convs SVF decomposes against SVF with the default step, all paired studies\n")
    print(pooled_variant_against_svf("dense:lr=0.001", "dense"))
    print("\n### SVF with each depthwise filter decomposed against SVF with the default step, all paired studies\n")
    print(pooled_variant_against_svf("svf --grouped kernel", "kernel", files_apart=True))
    print("\n### Every adaptation target on the same episodes\n")
    print(against_full_table())
    print("\n### 1 shot: SVF with the depthwise filters decomposed against full fine-tuning, all paired sets\n")
    print(kernel_against_table())
    print("\n### 1 shot: SVF with the depthwise filters decomposed against BatchNorm tuning, all paired sets\n")
    print(kernel_against_table("bn:lr=0.003", "BatchNorm"))
    print("\n### SVF with the depthwise filters decomposed: another step for their values, all paired studies\n")
    print(depthwise_step_table())
    print("\n### The 1-shot step: lr 0.01 (the default) against lr 0.03, all paired studies together\n")
    print(step_table(1))
    print("\n### The step from two shots on: lr 0.01 (the default since 2026-12-06) against lr 0.03 at 5 shots, "
          "all paired studies together\n")
    print(step_table(5))
    print("\n### From two shots on: also training the depthwise filters' values, at lr 0.01, all paired studies\n")
    print(variant_pair_table("svf:lr=0.01", "svf:grouped=always,lr=0.01", "1x1 values", "with depthwise"))
    print("\n### Adapted runs paired on their common episodes\n")
    print(paired_runs_table(args.min_episodes))
    print("\n### Adaptation variants on the same episodes\n")
    print(adaptation_table())
    print("\n### SVF, BatchNorm and full fine-tuning at every learning rate and number of steps tried\n")
    print(learning_rate_table())
    print("\n### The support gate at other margins\n")
    print(gate_margin_table())
