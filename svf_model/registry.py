"""Model registry (``checkpoints/registry.json``): what each named model is and where its weights live.

Each entry names the architecture (``method``, ``backbone``, ``head_kwargs``), the shot count it was
trained for, its training data and licence, its file and sha256, and a ``source``:

* ``{"type": "builtin"}``: no file (training-free head on an embedded backbone);
* ``{"type": "local"}``: ``checkpoints/<file>``;
* ``{"type": "hub", "repo_id": ..., "filename": ..., "revision": ...}``: fetched with
  ``huggingface_hub`` (honours ``HF_HUB_OFFLINE``; offline, a missing file is a clear error).

``format`` is ``"svf"`` (this project's safetensors: head + singular values) or ``"official"``
(a PFENet/BAM ``best.pth``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .weights import CheckpointError

CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "checkpoints"
REGISTRY_FILE = CHECKPOINT_DIR / "registry.json"


@dataclass
class ModelEntry:
    name: str
    method: str
    backbone: str
    title: str = ""
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    shot: int | None = None
    training_data: str = ""
    license: str = ""
    file: str | None = None
    sha256: str | None = None
    source: dict[str, Any] = field(default_factory=lambda: {"type": "builtin"})
    format: str = "svf"
    image_size: int = 473
    adapt_modules: list[str] = field(default_factory=lambda: ["layer4.1"])
    parametrization: str = "exp"
    # also decompose the adapt modules' grouped/depthwise convs: True (or "per-group") group by group,
    # "shared" as one filter bank, "kernel" each depthwise filter as a kh x kw matrix (svf_model.svf)
    adapt_grouped: bool | str = False
    metrics: dict[str, Any] = field(default_factory=dict)
    adapt_note: str = ""  # shown after Adapt: what adaptation measurably did to this model


def read_registry(path: str | os.PathLike = REGISTRY_FILE) -> tuple[str, dict[str, ModelEntry]]:
    """``(default name, {name: entry})`` from a registry file."""
    try:
        data = json.loads(Path(path).read_text())
        entries = {}
        for raw in data["models"]:
            entry = ModelEntry(**raw)
            entries[entry.name] = entry
        default = data["default"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"model registry {path} is unreadable or malformed: {type(exc).__name__}: {exc}") from exc
    if default not in entries:
        raise CheckpointError(f"registry default {default!r} is not one of its models")
    return default, entries


def list_models(path: str | os.PathLike = REGISTRY_FILE) -> list[str]:
    default, entries = read_registry(path)
    return [default] + sorted(n for n in entries if n != default)


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_file(entry: ModelEntry, checkpoint_dir: str | os.PathLike = CHECKPOINT_DIR) -> Path | None:
    """Local path of the entry's weights (downloading from the hub if needed), sha256-verified."""
    checkpoint_dir = Path(checkpoint_dir)
    kind = entry.source.get("type", "builtin")
    if kind == "builtin":
        return None
    if not entry.file:
        raise CheckpointError(f"registry entry {entry.name!r} has no file name")
    local = checkpoint_dir / entry.file
    if not local.is_file() and kind == "hub":
        local = _download(entry, checkpoint_dir)
    if not local.is_file():
        raise CheckpointError(
            f"model {entry.name!r}: weights not found. Put the file at {local} "
            f"(training data: {entry.training_data or 'see checkpoints/README.md'})"
        )
    if entry.sha256:
        actual = sha256_of(local)
        if actual != entry.sha256:
            raise CheckpointError(
                f"model {entry.name!r}: {local.name} has sha256 {actual[:16]}..., the registry expects "
                f"{entry.sha256[:16]}...: the file is corrupt, tampered with or another version; refusing it"
            )
    return local


def _download(entry: ModelEntry, checkpoint_dir: Path) -> Path:
    from huggingface_hub import hf_hub_download

    src = entry.source
    try:
        path = hf_hub_download(
            repo_id=src["repo_id"], filename=src.get("filename", entry.file), revision=src.get("revision"),
            local_dir=checkpoint_dir,
        )
    except Exception as exc:  # noqa: BLE001 - offline mode, no network, 404: same advice
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise CheckpointError(
            f"model {entry.name!r}: could not fetch {src.get('filename', entry.file)} from the Hugging Face Hub "
            f"repo {src['repo_id']}{' (HF_HUB_OFFLINE is set)' if offline else ''}: {type(exc).__name__}. "
            f"Download it by hand and put it at {checkpoint_dir / entry.file}"
        ) from exc
    return Path(path)


def adapt_fold(entry: ModelEntry, adapt_grouped: bool | str | None = None) -> str | None:
    """How :func:`load_model` decomposes ``entry``'s adapt modules' grouped convs with that
    ``adapt_grouped`` (``None``: the entry's setting): see :func:`grouped_fold_of`."""
    return grouped_fold_of(entry.adapt_grouped if adapt_grouped is None else adapt_grouped)


def grouped_fold_of(grouped: bool | str) -> str | None:
    """An ``adapt_grouped`` value as a fold: ``None`` (not decomposed) or one of
    :data:`svf_model.svf.GROUPED_FOLDS` (``True`` is ``"per-group"``, ``False`` and ``"none"`` are off).

    Raises:
        ValueError: any other value.
    """
    from .svf import GROUPED_FOLDS

    if grouped not in (False, True, "none", *GROUPED_FOLDS):
        raise ValueError(f"adapt_grouped must be false, true, none or one of {', '.join(GROUPED_FOLDS)}, "
                         f"got {grouped!r}")
    if grouped in (False, "none"):
        return None
    return "per-group" if grouped is True else grouped


def load_model(
    name: str | None = None,
    device: str = "cpu",
    registry: str | os.PathLike = REGISTRY_FILE,
    checkpoint_dir: str | os.PathLike | None = None,
    adapt_grouped: bool | str | None = None,
):
    """Build a registered model (``None``: the default) -> ``(FewShotSegmenter, ModelEntry)``.

    The backbone modules listed in ``adapt_modules`` (dotted paths such as ``"layer4"`` or
    ``"layer4.1"``) carry SVF layers, ready for adaptation. With ``adapt_grouped`` (``None``: the
    entry's setting; ``False`` or ``"none"``: not) their grouped/depthwise convs are decomposed too,
    group by group (``True`` or ``"per-group"``), as one filter bank with shared basis filters
    (``"shared"``) or each depthwise filter as a ``kh x kw`` matrix (``"kernel"``), so their singular
    values can adapt as well (when: ``AdaptConfig.grouped``). Weight
    files are looked up (and hub downloads stored) in ``checkpoint_dir``, by default the folder
    holding ``registry``.
    """
    from .backbones import build_backbone
    from .heads import build_head
    from .model import FewShotSegmenter
    from .svf import make_adaptable

    default, entries = read_registry(registry)
    name = name or default
    if name not in entries:
        raise CheckpointError(f"unknown model {name!r}; registered: {', '.join(sorted(entries))}")
    entry = entries[name]
    fold = adapt_fold(entry, adapt_grouped)
    path = resolve_file(entry, Path(checkpoint_dir) if checkpoint_dir is not None else Path(registry).parent)
    if path is None:
        backbone = build_backbone(entry.backbone, weights="imagenet")
        model = FewShotSegmenter(backbone, build_head(entry.method, backbone, **entry.head_kwargs))
    elif entry.format == "official":
        from .official import load_official

        model = load_official(path, entry.method, entry.backbone, shot=entry.shot or 1, **entry.head_kwargs)
    else:
        from .checkpoint import load_checkpoint

        model, _ = load_checkpoint(path)
    make_adaptable(model.backbone, entry.adapt_modules, fold, entry.parametrization)
    for p in model.parameters():
        p.requires_grad_(False)
    model.name = entry.name
    model.adapt_modules = list(entry.adapt_modules)
    model.adapt_note = entry.adapt_note
    return model.to(device).eval(), entry
