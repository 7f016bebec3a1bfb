"""This project's model files: head weights + SVF singular values, in safetensors with metadata.

Tensors: ``head.*`` (the head's whole state dict) and ``backbone.<svf layer>.sv.s`` (``direct``
parametrisation) or ``.sv.d`` (``exp``); optionally ``low_shot.backbone.<svf layer>.sv.*``, a second
set of singular values for fewer than ``low_shot_below`` shots (:class:`svf_model.model.LowShotValues`,
every SVF layer, same shapes). The frozen backbone is not stored: it is rebuilt from its
pretrained weights, which also give the SVD bases ``U``, ``V`` and ``s0``. Comparison models that
trained backbone weights instead of singular values (``tuned_weights``: ``full`` or ``bn`` on
``tuned_stages``, :class:`svf_model.model.TunedWeights`) also store those as ``backbone.<name>``.

Metadata (strings; JSON for non-strings): ``format``, ``backbone``, ``backbone_weights``
(``imagenet``, ``random`` or a path), ``method``, ``head_kwargs``, ``svf_stages``, ``svf_kinds``,
``svf_grouped_fold`` (how grouped convs are decomposed: ``per-group``, ``shared`` or ``kernel``; files
written before it read ``svf_shared_basis``), ``parametrization``, ``image_size``,
``shots``, ``low_shot_below``, ``low_shot_fallback_margin`` and ``low_shot_fallback_up_to`` (with
low-shot values), ``tuned_weights`` and ``tuned_stages`` (comparison models),
``sha256`` (of the tensors: a changed byte is refused), ``backbone_fingerprint`` (of the frozen
backbone weights: a different pretrained backbone gives a warning), plus any extra keys the caller
adds.
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
_JSON_KEYS = ("head_kwargs", "svf_stages", "svf_kinds", "svf_shared_basis", "image_size", "shots",
              "low_shot_below", "low_shot_fallback_margin", "low_shot_fallback_up_to", "tuned_stages")
LOW_SHOT = "low_shot."


def trainable_state(model) -> dict[str, torch.Tensor]:  # noqa: ANN001 - FewShotSegmenter
    """``head.*`` state + ``backbone.<layer>.sv.{s|d}`` of every SVF layer (detached), + the tuned
    backbone tensors of a comparison model (``model.tuned_weights``)."""
    from .svf import svf_layers

    state = {f"head.{k}": v.detach() for k, v in model.head.state_dict().items()}
    for name, layer in svf_layers(model.backbone):
        suffix = "s" if layer.sv.parametrization == "direct" else "d"
        state[f"backbone.{name}.sv.{suffix}"] = layer.sv.trainable.detach()
    tuned = getattr(model, "tuned_weights", None)
    if tuned is not None:
        state.update({f"backbone.{k}": v.detach() for k, v in tuned.tensors(model.backbone).items()})
    return state


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Digest of names, dtypes, shapes and bytes of ``tensors`` (order-independent)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def backbone_fingerprint(backbone: torch.nn.Module, tuned: set[str] = frozenset()) -> str:
    """Digest of the backbone's frozen pretrained tensors: everything except SVF layers' own
    tensors, the ``tuned`` ones (backbone-relative names) and BatchNorm counters (short hex)."""
    from .svf import svf_layers, within

    svf_names = {name for name, _ in svf_layers(backbone)}
    tensors = {}
    for key, value in backbone.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if (key.endswith("num_batches_tracked") or key in tuned
                or within(owner, svf_names)):
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
        "svf_grouped_fold": next((lay.grouped_fold for _, lay in layers if getattr(lay, "groups", 1) > 1),
                                 "per-group"),
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
    low = getattr(model, "low_shot_values", None)
    if low is not None:
        for key, value in low.state.items():
            tensors[LOW_SHOT + _file_key(key)] = value.detach().cpu().contiguous().clone()
        info["low_shot_below"] = low.below
        if low.fallback_margin is not None:
            info["low_shot_fallback_margin"] = low.fallback_margin
        if low.fallback_up_to is not None:
            info["low_shot_fallback_up_to"] = low.fallback_up_to
    tuned = getattr(model, "tuned_weights", None)
    if tuned is not None:
        info["tuned_weights"], info["tuned_stages"] = tuned.kind, list(tuned.stages)
    info["format"] = FORMAT
    info["sha256"] = tensors_sha256(tensors)
    info["backbone_fingerprint"] = backbone_fingerprint(model.backbone, _tuned_names(model))
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


def _tuned_names(model) -> set[str]:  # noqa: ANN001
    tuned = getattr(model, "tuned_weights", None)
    return set(tuned.tensors(model.backbone)) if tuned is not None else set()


def build_from_meta(meta: dict[str, Any], backbone_weights: str | os.PathLike | None = None):  # noqa: ANN201
    """Model skeleton (pretrained backbone, fresh head, SVF applied) described by ``meta``."""
    from .backbones import BackboneWeightsError, build_backbone
    from .heads import build_head
    from .model import FewShotSegmenter
    from .svf import GROUPED_FOLDS, apply_svf, freeze_batchnorm

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
    fold = meta.get("svf_grouped_fold", "shared" if meta.get("svf_shared_basis") else "per-group")
    if fold not in GROUPED_FOLDS:
        raise CheckpointError(f"svf_grouped_fold must be one of {', '.join(GROUPED_FOLDS)}, got {fold!r}")
    if meta.get("svf_stages"):
        apply_svf(backbone.stages(meta["svf_stages"]), kinds=meta.get("svf_kinds", ("1x1", "3x3")),
                  parametrization=meta.get("parametrization", "direct"), grouped_fold=fold)
    freeze_batchnorm(backbone)
    model = FewShotSegmenter(backbone, head)
    if meta.get("tuned_weights") is not None:
        from .backbones import STAGES
        from .model import TunedWeights

        kind, stages = meta["tuned_weights"], meta.get("tuned_stages")
        if kind not in TunedWeights.KINDS or not isinstance(stages, list) or not set(stages) <= set(STAGES):
            raise CheckpointError(f"tuned_weights must be one of {TunedWeights.KINDS} with tuned_stages from "
                                  f"{STAGES}, got {kind!r} on {stages!r}")
        model.tuned_weights = TunedWeights(kind, tuple(stages))
    return model


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


def _file_key(state_key: str) -> str:
    """:func:`svf_model.svf_state` key ``<layer>.<s|d>`` -> model-file key ``backbone.<layer>.sv.<s|d>``."""
    layer, _, suffix = state_key.rpartition(".")
    return f"backbone.{layer}.sv.{suffix}"


def _state_key(file_key: str) -> str:
    """Model-file key ``backbone.<layer>.sv.<s|d>`` -> :func:`svf_model.svf_state` key ``<layer>.<s|d>``."""
    layer, _, suffix = file_key.removeprefix("backbone.").rpartition(".sv.")
    return f"{layer}.{suffix}"


def matching_singular_values(model, tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The ``backbone.<layer>.sv.*`` tensors among ``tensors``, checked to cover exactly ``model``'s
    SVF layers (same stages, kinds, parametrisation and shapes); else :class:`CheckpointError`."""
    own = {k: v for k, v in trainable_state(model).items() if k.startswith("backbone.")}
    stored = {k: v for k, v in tensors.items() if k.startswith("backbone.")}
    if set(stored) != set(own) or any(own[k].shape != stored[k].shape for k in own):
        missing, unexpected = sorted(set(own) - set(stored)), sorted(set(stored) - set(own))
        raise CheckpointError(f"{name}: the singular values do not fit this model's SVF layers (same stages, "
                              f"kinds and parametrisation needed): missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]}, or other shapes")
    return stored


def low_shot_values(  # noqa: ANN201
    model, tensors: dict[str, torch.Tensor], below: Any, name: str,  # noqa: ANN001
    fallback_margin: Any = None, fallback_up_to: Any = None,
):
    """:class:`svf_model.model.LowShotValues` from ``backbone.<layer>.sv.*`` tensors that fit
    ``model``'s SVF layers (:func:`matching_singular_values`), for fewer than ``below`` (>= 2) shots
    and, with a ``fallback_margin`` in [0, 1], as the fallback from ``below`` up to ``fallback_up_to``
    (>= ``below``) shots."""
    from .model import LowShotValues

    stored = matching_singular_values(model, tensors, f"{name} (low-shot values)")
    if not isinstance(below, int) or isinstance(below, bool) or below < 2:
        raise CheckpointError(f"{name}: low-shot singular values need low_shot_below >= 2, got {below!r}")
    number = isinstance(fallback_margin, int | float) and not isinstance(fallback_margin, bool)
    if fallback_margin is not None and not (number and 0 <= fallback_margin <= 1):
        raise CheckpointError(f"{name}: low_shot_fallback_margin must be a number in [0, 1], got {fallback_margin!r}")
    if fallback_up_to is not None and (not isinstance(fallback_up_to, int) or isinstance(fallback_up_to, bool)
                                       or fallback_up_to < below):
        raise CheckpointError(f"{name}: low_shot_fallback_up_to must be a whole number >= {below}, "
                              f"got {fallback_up_to!r}")
    state = {_state_key(key): value.detach().clone() for key, value in stored.items()}
    return LowShotValues(below=below, state=state,
                         fallback_margin=None if fallback_margin is None else float(fallback_margin),
                         fallback_up_to=fallback_up_to)


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", backbone_weights: str | os.PathLike | None = None
):  # noqa: ANN201 - (FewShotSegmenter, dict)
    """Rebuild a model saved by :func:`save_checkpoint` -> ``(model in eval mode, meta)``.

    Every stored tensor must match the rebuilt model exactly (names and shapes) and every head
    tensor and singular-value vector must be present; otherwise :class:`CheckpointError`.
    """
    tensors, meta = read_checkpoint(path)
    model = build_from_meta(meta, backbone_weights)
    low = {k[len(LOW_SHOT):]: v for k, v in tensors.items() if k.startswith(LOW_SHOT)}
    load_trainable_state(model, {k: v for k, v in tensors.items() if not k.startswith(LOW_SHOT)}, Path(path).name)
    if low:
        model.low_shot_values = low_shot_values(model, low, meta.get("low_shot_below"), Path(path).name,
                                                meta.get("low_shot_fallback_margin"),
                                                meta.get("low_shot_fallback_up_to"))
    fingerprint = meta.get("backbone_fingerprint")
    if fingerprint and fingerprint != backbone_fingerprint(model.backbone, _tuned_names(model)):
        message = (f"{Path(path).name} was trained on other {meta['backbone']} weights than those loaded "
                   "(fingerprint differs): results may be worse than reported")
        warnings.warn(message, stacklevel=2)
        logger.warning(message)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval(), meta
