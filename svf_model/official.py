"""Official PFENet / BAM / SVF checkpoints <-> :class:`FewShotSegmenter`.

Official layout (dvlab-research/PFENet, chunbolang/BAM ``best.pth``: ``{"state_dict": ...}``, keys
with a ``module.`` prefix when saved from ``DataParallel``):

* ``layer0.*`` .. ``layer4.*``: the backbone -> our ``backbone.layerN.*``;
* everything else: the head, same names -> our ``head.*``;
* SVF checkpoints (zechao-li/SVF-pytorch ``svf.py``) replace each decomposed conv ``P`` by
  ``P.conv_V.weight [R, Ci, k, k]``, ``P.vector_S [1, R, 1, 1]``, ``P.conv_U.weight [Co, R, 1, 1]``
  (+ ``P.conv_U.bias``) -> our :class:`~svf_model.svf.SVFConv2d` ``P.Vh [R, Ci*k*k]``,
  ``P.sv.s [R]``, ``P.U [Co, R]`` (+ ``P.bias``). The official resolver keeps
  ``R = floor(min(Co, Ci*k*k) / 4) * 4``, so a stem conv with ``Ci*k*k = 27`` has rank 24; loaded
  layers take the checkpoint's rank.

``num_batches_tracked`` counters are optional both ways (checkpoints saved before PyTorch 0.4.1
lack them); every other key must match exactly, with its shape.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from .backbones import STAGES, Backbone, build_backbone
from .heads import build_head
from .model import FewShotSegmenter
from .svf import SVFConv2d, SVFLayer, apply_svf, svf_layers
from .weights import CheckpointError, load_state_dict_file

_COUNTER = "num_batches_tracked"


def _to_official(key: str) -> str:
    for prefix in ("backbone.", "head."):
        if key.startswith(prefix):
            return key[len(prefix):]
    raise ValueError(f"unexpected model key {key!r} (expected backbone.* or head.*)")


def _from_official(key: str) -> str:
    return ("backbone." if key.split(".", 1)[0] in STAGES else "head.") + key


def _svf_tensors(layer: SVFLayer) -> dict[str, torch.Tensor]:
    """One SVF layer in the official SVD_Conv2d / SVD_Linear layout (suffix -> tensor)."""
    u, vh, s = layer.U.detach(), layer.Vh.detach(), layer.singular_values().detach()
    r = layer.rank
    if isinstance(layer, SVFConv2d):
        co, ci, kh, kw = layer.weight_shape
        out = {"conv_V.weight": vh.reshape(r, ci, kh, kw), "vector_S": s.reshape(1, r, 1, 1),
               "conv_U.weight": u[:, :, None, None]}
        if layer.bias is not None:
            out["conv_U.bias"] = layer.bias.detach()
    else:
        out = {"fc_V.weight": vh, "vector_S": s.reshape(1, r), "fc_U.weight": u}
        if layer.bias is not None:
            out["fc_U.bias"] = layer.bias.detach()
    return out


def official_state_dict(model: FewShotSegmenter) -> dict[str, torch.Tensor]:
    """``model``'s weights under the official key names (PFENet/BAM, SVF layers as SVD_Conv2d).

    Keys keep the model's order; tensors are detached (views of the model's where possible).
    """
    svf = {name: layer for name, layer in svf_layers(model)}
    out: dict[str, torch.Tensor] = {}
    emitted: set[str] = set()
    for key, value in model.state_dict().items():
        owner = next((n for n in svf if key.startswith(n + ".")), None)
        if owner is None:
            out[_to_official(key)] = value
        elif owner not in emitted:
            emitted.add(owner)
            prefix = _to_official(owner)
            out.update({f"{prefix}.{suffix}": t for suffix, t in _svf_tensors(svf[owner]).items()})
    return out


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that ``DataParallel`` checkpoints carry."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _set_rank(layer: SVFLayer, rank: int) -> None:
    """Resize an SVF layer's factors to ``rank`` (values are overwritten by the checkpoint next)."""
    full = min(layer.U.shape[0], layer.Vh.shape[1])
    if rank == layer.rank or not 0 < rank <= full:
        return  # a rank above full is left for the shape check to report
    kw = {"dtype": layer.U.dtype, "device": layer.U.device}
    layer.U = torch.zeros(layer.U.shape[0], rank, **kw)
    layer.Vh = torch.zeros(rank, layer.Vh.shape[1], **kw)
    trainable = layer.sv.trainable.requires_grad
    layer.sv = type(layer.sv)(torch.zeros(rank, **kw), layer.sv.parametrization)
    layer.sv.trainable.requires_grad_(trainable)
    layer._cache_key, layer._cached_weight = None, None


def prepare_svf(model: FewShotSegmenter, state: dict[str, torch.Tensor]) -> list[str]:
    """Turn the backbone stages that ``state`` (official keys) stores in SVF form into SVF stages
    (:func:`~svf_model.svf.apply_svf`, ``"direct"``), with the checkpoint's ranks. Returns the stages."""
    stages = sorted({k.split(".", 1)[0] for k in state if k.endswith((".conv_V.weight", ".fc_V.weight"))}
                    & set(STAGES))
    stages = [s for s in stages if not any(True for _ in svf_layers(getattr(model.backbone, s)))]
    if stages:
        apply_svf([getattr(model.backbone, s) for s in stages])
    for name, layer in svf_layers(model):
        prefix = _to_official(name)
        v = state.get(f"{prefix}.conv_V.weight", state.get(f"{prefix}.fc_V.weight"))
        if v is not None:
            _set_rank(layer, v.shape[0])
    return stages


def _listing(keys: Iterable[str], limit: int = 20) -> str:
    keys = list(keys)
    more = f", ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_official_state_dict(model: FewShotSegmenter, state: dict[str, torch.Tensor], name: str = "checkpoint") -> None:
    """Load official-layout ``state`` into ``model`` strictly (SVF stages must already be prepared,
    see :func:`prepare_svf`). Raises :class:`CheckpointError` naming every missing key, unexpected
    key and shape mismatch."""
    state = strip_module_prefix(state)
    expected = {k: tuple(v.shape) for k, v in official_state_dict(model).items()}
    missing = [k for k in expected if k not in state and not k.endswith(_COUNTER)]
    unexpected = [k for k in state if k not in expected and not k.endswith(_COUNTER)]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
                  for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        parts = [f"{label} ({len(items)}): {_listing(items)}" for label, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                 if items]
        hint = " (a K-shot BAM checkpoint? pass shot=K)" if any(k.startswith("kshot_rw") for k in unexpected) else ""
        raise CheckpointError(f"{name} does not fit the {model.method} model: " + "; ".join(parts) + hint)

    svf_keys = {f"{_to_official(n)}.{suffix}": (n, layer, suffix)
                for n, layer in svf_layers(model) for suffix in _svf_tensors(layer)}
    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in svf_keys:
            ours.update(_svf_entries(*svf_keys[key], value))
        elif key in expected:
            ours[_from_official(key)] = value
    result = model.load_state_dict(ours, strict=False)
    leftover = [k for k in result.missing_keys if not k.endswith(_COUNTER)] + list(result.unexpected_keys)
    if leftover:  # pragma: no cover - the key check above should make this unreachable
        raise CheckpointError(f"{name}: internal key mapping error: {_listing(leftover)}")


def _svf_entries(name: str, layer: SVFLayer, suffix: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    if suffix.endswith("V.weight"):
        return {f"{name}.Vh": value.reshape(value.shape[0], -1)}
    if suffix.endswith("U.weight"):
        return {f"{name}.U": value.reshape(value.shape[0], value.shape[1])}
    if suffix.endswith("U.bias"):
        return {f"{name}.bias": value}
    s = value.flatten()
    if layer.sv.parametrization == "direct":
        return {f"{name}.sv.s": s, f"{name}.sv.s0": s}
    return {f"{name}.sv.s0": s, f"{name}.sv.d": torch.zeros_like(s)}


def _infer_head_kwargs(method: str, state: dict[str, torch.Tensor], kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    if method == "bam":
        cls = state.get("learner_base.1.4.weight")
        if cls is not None:
            kwargs.setdefault("base_classes", cls.shape[0])
        if "kshot_rw.weight" in state:
            kwargs.setdefault("kshot_trans_dim", 0)
        elif "kshot_rw.0.weight" in state:
            kwargs.setdefault("kshot_trans_dim", state["kshot_rw.0.weight"].shape[0])
    return kwargs


def load_official(
    path: str | os.PathLike,
    method: str,
    backbone: str | Backbone,
    shot: int = 1,
    **head_kwargs,
) -> FewShotSegmenter:
    """Build ``method`` on ``backbone`` and load an official ``best.pth`` strictly; eval mode.

    Args:
        path: official checkpoint (``.pth`` read with ``weights_only=True``, or ``.safetensors``).
        method: ``"pfenet"``, ``"baseline"`` or ``"bam"``.
        backbone: a registered backbone name (built without pretrained weights: the checkpoint holds
            them) or a :class:`Backbone`.
        shot: K the checkpoint was trained for (BAM's ``kshot_rw`` exists for ``shot > 1``).
        head_kwargs: passed to the head; BAM's ``base_classes`` and ``kshot_trans_dim`` are read from
            the checkpoint when not given.

    Raises:
        CheckpointError: unreadable file, or any missing/unexpected key or shape mismatch (all named).
    """
    state = strip_module_prefix(load_state_dict_file(path))
    bb = build_backbone(backbone, weights=None) if isinstance(backbone, str) else backbone
    head = build_head(method, bb, shot=shot, **_infer_head_kwargs(method, state, head_kwargs))
    model = FewShotSegmenter(bb, head)
    prepare_svf(model, state)
    load_official_state_dict(model, state, name=Path(path).name)
    bb.pretrained = True
    return model.eval()
