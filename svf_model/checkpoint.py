"""This project's model files: head weights + SVF singular values, in safetensors with metadata.

Tensors: ``head.*`` (the head's whole state dict) and ``backbone.<svf layer>.sv.s`` (``direct``
parametrisation) or ``.sv.d`` (``exp``). The frozen backbone is not stored: it is rebuilt from its
pretrained weights, which also give the SVD bases ``U``, ``V`` and ``s0``.

Metadata (strings; JSON for non-strings): ``format``, ``backbone``, ``backbone_weights``
(``imagenet``, ``random`` or a path), ``method``, ``head_kwargs``, ``svf_stages``, ``svf_kinds``,
``parametrization``, ``image_size``, ``shots``, ``sha256`` (of the tensors: a changed byte is
refused), ``backbone_fingerprint`` (of the frozen backbone weights: a different pretrained backbone
gives a warning), plus any extra keys the caller adds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .weights import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "svf-fewshot/1"
_JSON_KEYS = ("head_kwargs", "svf_stages", "svf_kinds", "image_size", "shots")


def trainable_state(model) -> dict[str, torch.Tensor]:  # noqa: ANN001 - FewShotSegmenter
    """``head.*`` state + ``backbone.<layer>.sv.{s|d}`` of every SVF layer (detached)."""
    from .svf import svf_layers

    state = {f"head.{k}": v.detach() for k, v in model.head.state_dict().items()}
    for name, layer in svf_layers(model.backbone):
        suffix = "s" if layer.sv.parametrization == "direct" else "d"
        state[f"backbone.{name}.sv.{suffix}"] = layer.sv.trainable.detach()
    return state


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Digest of names, dtypes, shapes and bytes of ``tensors`` (order-independent)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def backbone_fingerprint(backbone: torch.nn.Module) -> str:
    """Digest of the backbone's frozen pretrained tensors: everything except SVF layers' own
    tensors and BatchNorm counters (short hex)."""
    from .svf import svf_layers

    svf_names = {name for name, _ in svf_layers(backbone)}
    tensors = {}
    for key, value in backbone.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if key.endswith("num_batches_tracked") or any(owner == n or owner.startswith(n + ".") for n in svf_names):
            continue
        tensors[key] = value.float()
    return tensors_sha256(tensors)[:16]


def describe(model, meta: dict[str, Any] | None = None) -> dict[str, Any]:  # noqa: ANN001
    """Metadata of ``model`` (derived where possible), updated with ``meta``."""
    from .svf import svf_layers

    layers = list(svf_layers(model.backbone))
    stages = sorted({name.split(".")[0] for name, _ in layers})
    kinds = sorted({"grouped" if getattr(lay, "groups", 1) > 1 else lay.kind if lay.kind in ("1x1", "linear")
                    else "3x3" for _, lay in layers})
    derived = {
        "backbone": model.backbone.name,
        "backbone_weights": "imagenet" if getattr(model.backbone, "pretrained", True) else "random",
        "method": model.method,
        "head_kwargs": {},
        "svf_stages": stages,
        "svf_kinds": kinds,
        "parametrization": layers[0][1].sv.parametrization if layers else "direct",
        "image_size": 473,
        "shots": 1,
    }
    derived.update(meta or {})
    return derived


def save_checkpoint(model, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:  # noqa: ANN001
    """Write ``model``'s head weights and singular values to ``path`` (``.safetensors``).

    Args:
        model: a :class:`svf_model.model.FewShotSegmenter` (unwrapped from DDP).
        meta: metadata (see module docstring); missing keys are derived from the model. Pass at
            least ``head_kwargs``, ``image_size`` and ``shots``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"model files are .safetensors, got {path.name}")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in trainable_state(model).items()}
    info = describe(model, meta)
    info["format"] = FORMAT
    info["sha256"] = tensors_sha256(tensors)
    info["backbone_fingerprint"] = backbone_fingerprint(model.backbone)
    metadata = {k: (json.dumps(v) if k in _JSON_KEYS or not isinstance(v, str) else v) for k, v in info.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a model file, its sha256 verified. Raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as fh:
                raw_meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open API
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, dict) or "state_dict" not in obj or "meta" not in obj:
                raise CheckpointError(f"{path.name}: expected {{'state_dict': ..., 'meta': ...}}")
            tensors, raw_meta = dict(obj["state_dict"]), dict(obj["meta"])
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt/unsafe files all end here
        raise CheckpointError(f"cannot read {path.name}: {type(exc).__name__}: {exc}") from exc
    if raw_meta.get("format") != FORMAT:
        raise CheckpointError(f"{path.name} is not a {FORMAT} model file (format={raw_meta.get('format')!r})")
    meta: dict[str, Any] = {}
    for key, value in raw_meta.items():
        try:
            meta[key] = json.loads(value) if key in _JSON_KEYS else value
        except (TypeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path.name}: metadata {key!r} is not valid JSON") from exc
    expected = meta.get("sha256")
    if expected is None or tensors_sha256(tensors) != expected:
        raise CheckpointError(f"{path.name}: tensor checksum mismatch - the file is corrupt or was modified")
    return tensors, meta


def build_from_meta(meta: dict[str, Any], backbone_weights: str | os.PathLike | None = None):  # noqa: ANN201
    """Model skeleton (pretrained backbone, fresh head, SVF applied) described by ``meta``."""
    from .backbones import BackboneWeightsError, build_backbone
    from .heads import build_head
    from .model import FewShotSegmenter
    from .svf import apply_svf, freeze_batchnorm

    weights = backbone_weights or meta.get("backbone_weights", "imagenet")
    try:
        backbone = build_backbone(meta["backbone"], weights=None if weights == "random" else weights)
    except (BackboneWeightsError, KeyError, OSError, CheckpointError) as exc:
        raise CheckpointError(
            f"cannot build backbone {meta.get('backbone')!r} with weights {weights!r}: {exc}. "
            "Pass backbone_weights=PATH to load_checkpoint"
        ) from exc
    head = build_head(meta["method"], backbone, **meta.get("head_kwargs", {}))
    for p in backbone.parameters():
        p.requires_grad_(False)
    if meta.get("svf_stages"):
        apply_svf(backbone.stages(meta["svf_stages"]), kinds=meta.get("svf_kinds", ("1x1", "3x3")),
                  parametrization=meta.get("parametrization", "direct"))
    freeze_batchnorm(backbone)
    return FewShotSegmenter(backbone, head)


def load_trainable_state(model, tensors: dict[str, torch.Tensor], name: str) -> None:  # noqa: ANN001
    """Load head weights and singular values into ``model``; every tensor of
    :func:`trainable_state` must be present with its shape and nothing else (else
    :class:`CheckpointError` naming ``name``)."""
    own = trainable_state(model)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{name} does not fit {model.method} on {model.backbone.name}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    bad = [k for k in own if own[k].shape != tensors[k].shape]
    if bad:
        raise CheckpointError(f"{name}: shape mismatch for {bad[:8]}")
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"{name}: unexpected keys {result.unexpected_keys[:8]}")


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", backbone_weights: str | os.PathLike | None = None
):  # noqa: ANN201 - (FewShotSegmenter, dict)
    """Rebuild a model saved by :func:`save_checkpoint` -> ``(model in eval mode, meta)``.

    Every stored tensor must match the rebuilt model exactly (names and shapes) and every head
    tensor and singular-value vector must be present; otherwise :class:`CheckpointError`.
    """
    tensors, meta = read_checkpoint(path)
    model = build_from_meta(meta, backbone_weights)
    load_trainable_state(model, tensors, Path(path).name)
    fingerprint = meta.get("backbone_fingerprint")
    if fingerprint and fingerprint != backbone_fingerprint(model.backbone):
        message = (f"{Path(path).name} was trained on other {meta['backbone']} weights than those loaded "
                   "(fingerprint differs): results may be worse than reported")
        warnings.warn(message, stacklevel=2)
        logger.warning(message)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval(), meta
