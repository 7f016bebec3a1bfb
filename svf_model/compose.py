"""Combine two model files of the same backbone: the singular values of one, the head of the other.

    python -m svf_model.compose --singular-values A.safetensors --head B.safetensors \\
        [--head-kwargs '{min_shots: 2}'] [--low-shot-singular-values D.safetensors [--low-shot-below 2]] \\
        --out C.safetensors

With the same file for both it only updates the head's options: that is how the shipped default
got its fall-back settings (``checkpoints/README.md``). Both inputs are verified (checksums), the
combination must fit the rebuilt model exactly, and the written file is loaded back once, so a
mismatch (different backbone or SVF stages, unknown head keyword) is refused.

``--low-shot-singular-values`` adds a third file's singular values as the model's low-shot values
(:class:`svf_model.model.LowShotValues`): episodes with fewer than ``--low-shot-below`` shots
(default: the head's ``min_shots``) are segmented with them. That is how the shipped default uses
the prototype-trained values for one shot, where its head falls back to the prototype logits.
``--low-shot-fallback-margin M`` also makes them (with the prototype logits) the fallback for more
shots (up to ``--low-shot-fallback-up-to``): the Predictor uses them when they segment the supports
from each other better than the model's own values and head by more than ``M`` IoU.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import (
    build_from_meta,
    load_checkpoint,
    load_trainable_state,
    low_shot_values,
    read_checkpoint,
    save_checkpoint,
)
from .weights import CheckpointError


def _label(path: str | os.PathLike) -> str:
    path = Path(path)
    return f"{path.parent.name}/{path.name}"


def compose_checkpoints(
    singular_values: str | os.PathLike,
    head: str | os.PathLike,
    out: str | os.PathLike,
    head_kwargs: dict[str, Any] | None = None,
    low_shot: str | os.PathLike | None = None,
    low_shot_below: int | None = None,
    low_shot_fallback_margin: float | None = None,
    low_shot_fallback_up_to: int | None = None,
) -> Path:
    """Write ``out`` = the SVF layers and singular values of ``singular_values`` + the head (method,
    keyword arguments updated with ``head_kwargs``, weights) of ``head`` [+ the singular values of
    ``low_shot`` for fewer than ``low_shot_below`` shots, default the head's ``min_shots``, and as the
    fallback from there up to ``low_shot_fallback_up_to`` shots when they win the supports' cross-check by
    ``low_shot_fallback_margin``]."""
    sv_tensors, sv_meta = read_checkpoint(singular_values)
    head_tensors, head_meta = read_checkpoint(head)
    if sv_meta["backbone"] != head_meta["backbone"]:
        raise CheckpointError(f"backbones differ: {sv_meta['backbone']} vs {head_meta['backbone']}")
    meta = {**sv_meta, "method": head_meta["method"],
            "head_kwargs": {**head_meta.get("head_kwargs", {}), **(head_kwargs or {})},
            "composed_from": f"singular values: {_label(singular_values)}; head: {_label(head)}"}
    for key in ("sha256", "format", "backbone_fingerprint", "low_shot_below", "low_shot_fallback_margin",
                "low_shot_fallback_up_to"):
        meta.pop(key, None)
    try:
        model = build_from_meta(meta)
    except TypeError as exc:  # a head keyword the head does not take
        raise CheckpointError(f"cannot build head {meta['method']!r} with {meta['head_kwargs']}: {exc}") from exc
    merged = {k: v for k, v in sv_tensors.items() if k.startswith("backbone.")}
    merged.update({k: v for k, v in head_tensors.items() if k.startswith("head.")})
    load_trainable_state(model, merged, f"the combination of {_label(singular_values)} and {_label(head)}")
    if low_shot is not None:
        low_tensors, low_meta = read_checkpoint(low_shot)
        if low_meta["backbone"] != sv_meta["backbone"]:
            raise CheckpointError(f"backbones differ: {low_meta['backbone']} vs {sv_meta['backbone']}")
        below = low_shot_below if low_shot_below is not None else meta["head_kwargs"].get("min_shots")
        if below is None:
            raise CheckpointError("say below how many shots the low-shot values apply (--low-shot-below)")
        values = {k: v for k, v in low_tensors.items() if k.startswith("backbone.")}
        model.low_shot_values = low_shot_values(model, values, below, _label(low_shot), low_shot_fallback_margin,
                                                low_shot_fallback_up_to)
        meta["composed_from"] += f"; low-shot singular values (below {below} shots): {_label(low_shot)}"
    path = save_checkpoint(model, out, meta)
    load_checkpoint(path)  # round trip: refuses anything that would not load later
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m svf_model.compose", description=__doc__.split("\n\n")[0])
    p.add_argument("--singular-values", required=True, help="model file whose singular values are kept")
    p.add_argument("--head", required=True, help="model file whose head is kept")
    p.add_argument("--head-kwargs", default="{}", help="YAML mapping that updates the head's keyword arguments")
    p.add_argument("--low-shot-singular-values", default=None,
                   help="model file whose singular values serve episodes with fewer shots")
    p.add_argument("--low-shot-below", type=int, default=None,
                   help="those values apply below this many shots (default: the head's min_shots)")
    p.add_argument("--low-shot-fallback-margin", type=float, default=None,
                   help="from --low-shot-below shots on, use the low-shot values with the prototype logits when "
                        "they segment the supports from each other better by more than this IoU (0..1)")
    p.add_argument("--low-shot-fallback-up-to", type=int, default=None,
                   help="check for the fallback only up to this many shots (default: any number)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    path = compose_checkpoints(args.singular_values, args.head, args.out, yaml.safe_load(args.head_kwargs) or {},
                               args.low_shot_singular_values, args.low_shot_below, args.low_shot_fallback_margin,
                               args.low_shot_fallback_up_to)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
