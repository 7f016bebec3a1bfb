"""Where does full fine-tuning's test-time gain live, relative to what SVF can express?

SVF changes a folded weight ``W = U diag(s) V^T`` only along its own singular directions: the
change is ``U diag(ds) V^T``. Full fine-tuning of the same block may change ``W`` in any direction.
On the same seeded episodes as ``adapt_study.py`` / ``python -m svf_model.evaluate --adapt`` (same
classes, shots and seed), this script adapts each episode's supports twice with the support gate
off (so every adaptation is kept and the decomposition is clean):

* ``svf``: the model's singular values (AdaptConfig defaults otherwise);
* ``full``: every weight of the adapt block (``full:lr=...``, default 1e-3 as in the README's
  comparisons), and then, from that one fine-tuned block, five edits of it:

  - ``full_diag``: each SVF-decomposed conv's change ``dW`` replaced by its part SVF could express,
    ``U diag(u_i^T dW v_i) V^T`` (the rest of the block - depthwise conv, BatchNorm - as fine-tuned);
  - ``full_offdiag``: ``dW`` minus that part;
  - ``full_no_dense``: the decomposed convs back at ``W`` (only the depthwise conv and BatchNorm
    changes kept);
  - ``full_depthwise_only`` / ``full_bn_only``: the decomposed convs back at ``W`` and the
    BatchNorm affine (resp. the depthwise conv) back as it was: one part of the change alone.

For each decomposed conv it records ``|dW_full| / |W|``, the share of ``|dW_full|`` inside SVF's
subspace (``|diag| / |dW_full|``; a direction drawn at random has ``sqrt(R / (Co Ci k k))``),
``|dW_svf| / |W|`` and the cosine between SVF's change ``ds`` and full fine-tuning's diagonal part.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/full_step_subspace.py --classes <the 15> --shots 1 \\
        --episodes 100 --seed 4 --threads 1 --json benchmarks/results/full_step_subspace_1shot_seed4.json
    python benchmarks/full_step_subspace.py --report benchmarks/results/full_step_subspace_1shot_seed*.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from adapt_study import DEFAULT_DATA, iou, query_mask  # noqa: E402

from svf_model.adapt import AdaptConfig, adapt_svf, adapted_layers  # noqa: E402
from svf_model.data.episodes import make_episodes  # noqa: E402
from svf_model.data.fss_folder import FSSFolder, list_classes, split_classes  # noqa: E402
from svf_model.predictor import Predictor  # noqa: E402
from svf_model.registry import load_model  # noqa: E402

EDITS = ("full_diag", "full_offdiag", "full_no_dense", "full_depthwise_only", "full_bn_only")
VARIANTS = ("svf", "full", *EDITS)


def diagonal_part(U: torch.Tensor, Vh: torch.Tensor, dW: torch.Tensor) -> torch.Tensor:
    """``c_i = u_i^T dW v_i`` for ``U [Co, R]``, ``Vh [R, N]``, ``dW [Co, N]``: the coordinates of the
    projection of ``dW`` onto SVF's subspace ``{U diag(c) Vh}`` (orthonormal basis ``u_i v_i^T``)."""
    return torch.einsum("or,on,rn->r", U, dW, Vh)


def set_dense_weights(block: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, w in weights.items():
            conv = block.get_submodule(name)
            conv.weight.copy_(w.reshape(conv.weight.shape))


def restore_part(block: torch.nn.Module, original: torch.nn.Module, part: str, dense: set[str]) -> None:
    """Put ``block``'s BatchNorm affine (``part="bn"``) or its convs other than the decomposed ones
    in ``dense`` (``"conv"``: the depthwise conv) back to their values in ``original``."""
    with torch.no_grad():
        for name, module in block.named_modules():
            is_bn = "BatchNorm" in type(module).__name__
            if is_bn if part == "bn" else isinstance(module, torch.nn.Conv2d) and name not in dense:
                source = original.get_submodule(name)
                for key in ("weight", "bias"):
                    if getattr(module, key, None) is not None:
                        getattr(module, key).copy_(getattr(source, key))


def run_episode(model, predictor: Predictor, ep, lr: float) -> tuple[dict[str, float], list[dict]]:  # noqa: ANN001
    """IoU (0..1) of the query for every variant, and per decomposed conv the step statistics."""
    ious = {"before": iou(predictor.predict(ep.query).mask, ep.query_mask)}
    config = AdaptConfig(time_budget_s=None, gate="off", modules=list(model.adapt_modules))
    predictor.adapt(config)
    ious["svf"] = iou(predictor.predict(ep.query).mask, ep.query_mask)
    with predictor._active():
        layers = adapted_layers(model, config.modules)
        adapted_s = {n: layer.singular_values().detach().clone() for n, layer in layers}
    predictor.reset()

    with predictor._active():
        layers = adapted_layers(model, config.modules)
        stages = sorted({n.rsplit(".", 1)[0] for n, _ in layers})
        if len(stages) != 1:
            raise SystemExit(f"expected the adapt modules to sit in one block, got {stages}")
        stage = stages[0]
        base = {n[len(stage) + 1:]: (layer.U, layer.Vh, layer.singular_values().detach().clone(), n)
                for n, layer in layers}
        original = copy.deepcopy(model.backbone.get_submodule(stage))
        parent, _, child = stage.rpartition(".")
        try:
            adapt_svf(model, predictor._supports, predictor._support_masks,
                      AdaptConfig(**{**config.__dict__, "target": "full", "lr": lr}))
            block = model.backbone.get_submodule(stage)
            ious["full"] = iou(query_mask(model, predictor, ep.query), ep.query_mask)
            start, tuned, diag, stats = {}, {}, {}, []
            for sub, (U, Vh, s, full_name) in base.items():
                start[sub] = (U * s) @ Vh
                tuned[sub] = block.get_submodule(sub).weight.detach().reshape(start[sub].shape).clone()
                dW = tuned[sub] - start[sub]
                c = diagonal_part(U, Vh, dW)
                diag[sub] = (U * c) @ Vh
                ds = adapted_s[full_name] - s
                stats.append({"layer": full_name, "rel_change_full": float(dW.norm() / start[sub].norm()),
                              "diag_share_full": float(c.norm() / dW.norm()),
                              "random_direction_share": float(np.sqrt(U.shape[1] / dW.numel())),
                              "rel_change_svf": float(ds.norm() / s.norm()),
                              "cos_svf_full_diag": float(ds @ c / (ds.norm() * c.norm() + 1e-12))})
            edits = {"full_diag": {k: start[k] + diag[k] for k in base},
                     "full_offdiag": {k: tuned[k] - diag[k] for k in base},
                     "full_no_dense": start}
            for name, weights in edits.items():
                set_dense_weights(block, weights)
                ious[name] = iou(query_mask(model, predictor, ep.query), ep.query_mask)
            tuned_parts = copy.deepcopy(block)  # dense convs at W now; depthwise conv and BN as tuned
            for name, part in (("full_depthwise_only", "bn"), ("full_bn_only", "conv")):
                restore_part(block, original, part, set(base))
                ious[name] = iou(query_mask(model, predictor, ep.query), ep.query_mask)
                block.load_state_dict(tuned_parts.state_dict())
        finally:
            setattr(model.backbone.get_submodule(parent), child, original)
    return ious, stats


def summarize(rows: list[dict]) -> dict:
    """Mean IoU change (points) with its s.e. per variant every row has, full fine-tuning minus
    each other variant (paired), and per decomposed conv the median step statistics."""
    variants = [v for v in VARIANTS if all(v in r["iou"] for r in rows)]
    change = {v: np.array([r["iou"][v] - r["iou"]["before"] for r in rows]) * 100 for v in variants}
    n = len(rows)

    def mean_se(x: np.ndarray) -> dict[str, float]:
        return {"mean": float(x.mean()), "se": float(x.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0}

    out = {"episodes": n,
           "change_pts": {v: {**mean_se(change[v]), "share_losing_5pts": float((change[v] < -5).mean())}
                          for v in variants},
           "full_minus_pts": {v: mean_se(change["full"] - change[v]) for v in variants if v != "full"}}
    layers: dict[str, list[dict]] = {}
    for r in rows:
        for st in r["layers"]:
            layers.setdefault(st["layer"], []).append(st)
    out["layers"] = {name: {k: float(np.median([x[k] for x in sts])) for k in sts[0] if k != "layer"}
                     for name, sts in layers.items()}
    return out


def print_tables(summary: dict, title: str) -> None:
    print(f"\n{title}\n")
    print("| variant | IoU change (pts, mean +- s.e.) | episodes losing >5 pts | full minus it (paired) |"
          "\n|---|---|---|---|")
    for v, c in summary["change_pts"].items():
        diff = summary["full_minus_pts"].get(v)
        paired = f"{diff['mean']:+.2f} +- {diff['se']:.2f}" if diff else ""
        print(f"| {v} | {c['mean']:+.2f} +- {c['se']:.2f} | {100 * c['share_losing_5pts']:.0f}% | {paired} |")
    print("\n| layer | full: ‖dW‖ / ‖W‖ | share of ‖dW‖ SVF can express (a random direction) | SVF: ‖dW‖ / ‖W‖ "
          "| cos(SVF, full's diagonal) |\n|---|---|---|---|---|")
    for name, st in summary["layers"].items():
        print(f"| {name} | {st['rel_change_full']:.3f} | {st['diag_share_full']:.3f} "
              f"({st['random_direction_share']:.3f}) | {st['rel_change_svf']:.3f} | {st['cos_svf_full_diag']:+.2f} |")


def report(paths: list[str]) -> int:
    """Pool the episodes of saved runs (one model and shot count) and print their tables."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    if len({(r["model"], r["shots"], r["full_lr"]) for r in runs}) != 1:
        raise SystemExit("--report pools runs of one model, shot count and full-fine-tuning lr")
    rows = [row for r in runs for row in r["rows"]]
    seeds = ", ".join(f"{r['seed']} ({r['episodes']})" for r in runs)
    print_tables(summarize(rows), f"{runs[0]['shots']}-shot, {len(rows)} episodes (seed (episodes): {seeds}), "
                 f"model {runs[0]['model']}, full fine-tuning lr {runs[0]['full_lr']}, support gate off")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--model", default=None, help="registry model (default: the registry default)")
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=None, help="letterbox size (default: the model's)")
    ap.add_argument("--full-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--classes", nargs="+", default=None,
                    help="classes to sample episodes from (default: the held-out 20%% of the training split)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--report", nargs="+", default=None, metavar="JSON",
                    help="print the tables of saved runs, their episodes pooled, and run nothing")
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, entry = load_model(args.model)
    held_out = args.classes or split_classes(list_classes(args.data), 0.2, 0)[1]
    episodes = make_episodes(FSSFolder(args.data), args.episodes, args.shots, args.seed, classes=held_out)
    predictor = Predictor(model, image_size=args.size or entry.image_size, model_name=entry.name)
    rows: list[dict] = []
    start = time.perf_counter()
    for i in range(len(episodes)):
        ep = episodes[i]
        predictor.set_supports(ep.supports, [m == 1 for m in ep.support_masks], [m == 255 for m in ep.support_masks])
        ious, stats = run_episode(model, predictor, ep, args.full_lr)
        rows.append({"class": ep.class_name, "query": os.path.relpath(ep.query_path, args.data),
                     "iou": ious, "layers": stats})
        summary = summarize(rows)
        line = "  ".join(f"{v}: {c['mean']:+.2f}" for v, c in summary["change_pts"].items())
        print(f"[{i + 1}/{len(episodes)}] {time.perf_counter() - start:.0f}s  {line}", file=sys.stderr, flush=True)
        if args.json:  # after every episode, so a stopped run keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(
                {"model": entry.name, "shots": args.shots, "episodes": i + 1, "seed": args.seed,
                 "image_size": predictor.image_size, "full_lr": args.full_lr, "held_out": held_out,
                 "gate": "off", "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "summary": summary, "rows": rows}, indent=1))
    print_tables(summarize(rows), f"{args.shots}-shot, {len(rows)} episodes, model {entry.name}, support gate off")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
