"""Tuned singular values on their own: in memory (reset, per-session state) and as a small file.

An SVF "delta" is what few-shot tuning changes: one vector ``s [R]`` per SVF layer. The frozen
``U``/``Vh`` come from decomposing the base weights again, so a delta only makes sense on the same
base; :func:`svf_hash` fingerprints that decomposition.

File layout (safetensors): ``"<layer>.s"`` the tuned values and ``"<layer>.s0"`` the values of the
decomposition, per layer name from :func:`svf_model.svf.svf_layers`, and for a layer trained in the
exp parametrisation ``"<layer>.d"``, its trainable ``d`` (``s = s0 exp(d)``) as it was, so that the
same decomposition loads it bit for bit (``s`` alone goes through ``log`` and may come back an ulp
off); metadata ``format``, ``base_name``, ``svf_hash`` and ``parametrization``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .svf import SVFLayer, svf_layers
from .weights import CheckpointError

logger = logging.getLogger(__name__)

DELTA_FORMAT = "svf-delta/1"
S0_RTOL = 1e-4


def _layers(module: nn.Module) -> dict[str, SVFLayer]:
    layers: dict[str, SVFLayer] = {}
    for name, layer in svf_layers(module):
        if name in layers:
            raise ValueError(f"two SVF layers are both named {name!r}; pass the module that holds them all")
        layers[name] = layer
    return layers


def svf_hash(module: nn.Module) -> str:
    """SHA-256 over every SVF layer's name, shapes and the bytes of ``U`` and ``Vh`` (as float32,
    so a float64 copy of the same decomposition hashes the same)."""
    digest = hashlib.sha256()
    for name, layer in sorted(_layers(module).items()):
        digest.update(f"{name}:{tuple(layer.U.shape)}:{tuple(layer.Vh.shape)};".encode())
        for tensor in (layer.U, layer.Vh):
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _trainable_key(layer: SVFLayer) -> str:
    return "s" if layer.sv.parametrization == "direct" else "d"


def svf_state_keys(module: nn.Module) -> list[str]:
    """The keys of :func:`svf_state` (``"<layer>.s"`` or ``"<layer>.d"``) without copying any value."""
    return [f"{name}.{_trainable_key(layer)}" for name, layer in _layers(module).items()]


def svf_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copy of the trainable tensor of every SVF layer: ``{"<layer>.s" or "<layer>.d": [R]}``.

    The keys name what is stored: ``s`` (direct parametrisation) or ``d`` (exp: ``s = s0 exp(d)``),
    so :func:`set_svf_state` restores it bit-exactly and converts between parametrisations.
    """
    return {f"{name}.{_trainable_key(layer)}": layer.sv.trainable.detach().clone()
            for name, layer in _layers(module).items()}


def _set_singular_values(name: str, layer: SVFLayer, s: torch.Tensor) -> None:
    """Write singular values ``s [R]`` into ``layer`` in its own parametrisation, in place."""
    param = layer.sv.trainable
    s = s.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        if layer.sv.parametrization == "direct":
            param.copy_(s)
            return
        s0 = layer.sv.s0
        same = s == s0  # d = 0, also where s0 = 0 (rank-deficient weights)
        if bool((~same & ((s <= 0) | (s0 <= 0))).any()):
            raise ValueError(f"{name}: s = s0 * exp(d) cannot reach non-positive values or move from s0 = 0")
        param.copy_(torch.where(same, torch.zeros_like(s), torch.log(s / s0)))


def set_svf_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore a :func:`svf_state` in place (optimiser references stay valid).

    Raises:
        ValueError: a layer is missing or extra, or a vector has the wrong length.
    """
    layers = _layers(module)
    by_layer: dict[str, tuple[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, _, kind = key.rpartition(".")
        if kind not in ("s", "d") or not name:
            raise ValueError(f"unexpected key {key!r} in an SVF state (want '<layer>.s' or '<layer>.d')")
        by_layer[name] = (kind, tensor)
    missing, extra = sorted(set(layers) - set(by_layer)), sorted(set(by_layer) - set(layers))
    if missing or extra:
        raise ValueError(f"SVF state does not fit: missing layers {missing[:5]}, unexpected {extra[:5]}")
    for name, (kind, tensor) in by_layer.items():
        layer = layers[name]
        if tensor.shape != (layer.rank,):
            raise ValueError(f"{name}: state has shape {tuple(tensor.shape)}, the layer has rank {layer.rank}")
        if kind == _trainable_key(layer):
            current = layer.sv.trainable
            # unchanged values are not rewritten: that would bump their version and drop caches
            # keyed on it (folded weights, the backbone's feature memo)
            if not torch.equal(current.detach(), tensor.to(current)):
                with torch.no_grad():
                    current.copy_(tensor)
        else:
            s0 = layer.sv.s0.to(tensor)
            _set_singular_values(name, layer, s0 * torch.exp(tensor) if kind == "d" else tensor)


def save_svf_delta(module: nn.Module, path: str | os.PathLike, base_name: str) -> Path:
    """Write the current singular values of every SVF layer of ``module`` to ``path`` (safetensors).

    Args:
        module: the module holding the SVF layers (layer names are relative to it).
        path: output file, conventionally ``*.safetensors``.
        base_name: name of the base weights the delta applies to (e.g. ``"efficientnet_lite2"``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from safetensors.torch import save_file

    layers = _layers(module)
    if not layers:
        raise ValueError("module has no SVF layers; call apply_svf first")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{name}.s"] = layer.singular_values().detach().to("cpu").contiguous()
        tensors[f"{name}.s0"] = layer.sv.s0.detach().to("cpu").contiguous()
        if layer.sv.parametrization == "exp":
            tensors[f"{name}.d"] = layer.sv.trainable.detach().to("cpu").contiguous()
    parametrizations = sorted({layer.sv.parametrization for layer in layers.values()})
    metadata = {
        "format": DELTA_FORMAT,
        "base_name": base_name,
        "svf_hash": svf_hash(module),
        "parametrization": ",".join(parametrizations),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_svf_delta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a delta file, without applying it. Raises :class:`CheckpointError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"SVF delta not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except Exception as exc:  # noqa: BLE001 - truncated/garbled files of any kind
        raise CheckpointError(f"cannot read SVF delta {path.name}: {type(exc).__name__}: {exc}") from exc
    if metadata.get("format") != DELTA_FORMAT or "svf_hash" not in metadata:
        raise CheckpointError(f"{path.name} is not an SVF delta (metadata {sorted(metadata)})")
    return tensors, metadata


def load_svf_delta(module: nn.Module, path: str | os.PathLike, base_name: str | None = None) -> dict[str, str]:
    """Load tuned singular values saved by :func:`save_svf_delta` into ``module`` in place.

    Refuses (:class:`CheckpointError`) a delta for another base (``base_name`` given and different),
    another layer set or ranks, or another decomposition (``svf_hash`` differs). When only the hash
    differs but every layer's ``s0`` matches within ``rtol=1e-4`` - the same base decomposed by another
    LAPACK build, with different signs or rounding - the delta is applied with a warning.

    Args:
        module: the module holding the SVF layers, as passed to :func:`save_svf_delta`.
        path: the ``.safetensors`` delta.
        base_name: expected base name; ``None`` skips that check (the hash still applies).

    Returns:
        The file's metadata.
    """
    tensors, metadata = read_svf_delta(path)
    name = Path(path).name
    if base_name is not None and metadata.get("base_name") != base_name:
        raise CheckpointError(f"{name} was tuned on base {metadata.get('base_name')!r}, not {base_name!r}")

    layers = _layers(module)
    saved = {k[: -len(".s0")] for k in tensors if k.endswith(".s0")}
    with_d = {k[: -len(".d")] for k in tensors if k.endswith(".d")}
    if set(tensors) != {f"{n}.{suffix}" for n in saved for suffix in ("s", "s0")} | {f"{n}.d" for n in with_d} \
            or not with_d <= saved:
        raise CheckpointError(f"{name}: every layer needs exactly '<layer>.s' and '<layer>.s0' "
                              "(and may have '<layer>.d')")
    if saved != set(layers):
        missing, extra = sorted(set(layers) - saved), sorted(saved - set(layers))
        raise CheckpointError(
            f"{name} does not fit this model's SVF layers: missing {len(missing)} {missing[:3]}, "
            f"unexpected {len(extra)} {extra[:3]} (was apply_svf run on the same stages and kinds?)"
        )
    for layer_name, layer in layers.items():
        for suffix in ("s", "s0", "d") if layer_name in with_d else ("s", "s0"):
            if tensors[f"{layer_name}.{suffix}"].shape != (layer.rank,):
                raise CheckpointError(
                    f"{name}: {layer_name}.{suffix} has shape {tuple(tensors[f'{layer_name}.{suffix}'].shape)}, "
                    f"the layer has rank {layer.rank}"
                )

    same_decomposition = metadata["svf_hash"] == svf_hash(module)
    if not same_decomposition:
        far = [n for n, layer in layers.items()
               if not torch.allclose(tensors[f"{n}.s0"].double(), layer.sv.s0.detach().cpu().double(),
                                     rtol=S0_RTOL, atol=0)]
        if far:
            raise CheckpointError(
                f"{name} was tuned on another decomposition (svf_hash differs and s0 differs in "
                f"{len(far)} layers, e.g. {far[0]}): different base weights"
            )
        message = (f"{name}: svf_hash differs but every s0 matches within rtol {S0_RTOL:g} "
                   "(same base decomposed elsewhere); applying the delta")
        warnings.warn(message, stacklevel=2)
        logger.warning(message)

    exact = {}
    for layer_name in with_d:
        s_saved, s0_saved, d = (tensors[f"{layer_name}.{k}"].double() for k in ("s", "s0", "d"))
        if not torch.allclose(s0_saved * torch.exp(d), s_saved, rtol=1e-5, atol=0):
            raise CheckpointError(f"{name}: {layer_name}.d does not give {layer_name}.s (s = s0 exp(d)): the file "
                                  "was altered")
        layer = layers[layer_name]
        if (same_decomposition and layer.sv.parametrization == "exp"
                and torch.equal(tensors[f"{layer_name}.s0"].to(layer.sv.s0), layer.sv.s0.detach())):
            exact[layer_name] = tensors[f"{layer_name}.d"]
    for layer_name, layer in layers.items():
        try:
            if layer_name in exact:
                with torch.no_grad():
                    layer.sv.trainable.copy_(exact[layer_name])
            else:
                _set_singular_values(layer_name, layer, tensors[f"{layer_name}.s"])
        except ValueError as exc:
            raise CheckpointError(f"{name}: {exc}") from exc
    return metadata
