"""Combine two model files of the same backbone: the singular values of one, the head of the other.

    python -m svf_model.compose --singular-values A.safetensors --head B.safetensors \\
        [--head-kwargs '{min_shots: 2}'] --out C.safetensors

With the same file for both it only updates the head's options: that is how the shipped default
got its fall-back settings (``checkpoints/README.md``). Both inputs are verified (checksums), the
combination must fit the rebuilt model exactly, and the written file is loaded back once, so a
mismatch (different backbone or SVF stages, unknown head keyword) is refused.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import build_from_meta, load_checkpoint, load_trainable_state, read_checkpoint, save_checkpoint
from .weights import CheckpointError


def _label(path: str | os.PathLike) -> str:
    path = Path(path)
    return f"{path.parent.name}/{path.name}"


def compose_checkpoints(
    singular_values: str | os.PathLike,
    head: str | os.PathLike,
    out: str | os.PathLike,
    head_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write ``out`` = the SVF layers and singular values of ``singular_values`` + the head (method,
    keyword arguments updated with ``head_kwargs``, weights) of ``head``."""
    sv_tensors, sv_meta = read_checkpoint(singular_values)
    head_tensors, head_meta = read_checkpoint(head)
    if sv_meta["backbone"] != head_meta["backbone"]:
        raise CheckpointError(f"backbones differ: {sv_meta['backbone']} vs {head_meta['backbone']}")
    meta = {**sv_meta, "method": head_meta["method"],
            "head_kwargs": {**head_meta.get("head_kwargs", {}), **(head_kwargs or {})},
            "composed_from": f"singular values: {_label(singular_values)}; head: {_label(head)}"}
    for key in ("sha256", "format", "backbone_fingerprint"):
        meta.pop(key, None)
    try:
        model = build_from_meta(meta)
    except TypeError as exc:  # a head keyword the head does not take
        raise CheckpointError(f"cannot build head {meta['method']!r} with {meta['head_kwargs']}: {exc}") from exc
    merged = {k: v for k, v in sv_tensors.items() if k.startswith("backbone.")}
    merged.update({k: v for k, v in head_tensors.items() if k.startswith("head.")})
    load_trainable_state(model, merged, f"the combination of {_label(singular_values)} and {_label(head)}")
    path = save_checkpoint(model, out, meta)
    load_checkpoint(path)  # round trip: refuses anything that would not load later
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m svf_model.compose", description=__doc__.split("\n\n")[0])
    p.add_argument("--singular-values", required=True, help="model file whose singular values are kept")
    p.add_argument("--head", required=True, help="model file whose head is kept")
    p.add_argument("--head-kwargs", default="{}", help="YAML mapping that updates the head's keyword arguments")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    path = compose_checkpoints(args.singular_values, args.head, args.out, yaml.safe_load(args.head_kwargs) or {})
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
