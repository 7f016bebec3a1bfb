"""Safe reading of weight files: safetensors, or ``torch.load(weights_only=True)`` - never unpickling."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A weight file is missing, unreadable, tampered with, or does not fit the model."""


def load_state_dict_file(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a PyTorch file without executing pickled code.

    A PyTorch file may hold the state dict itself or ``{"state_dict": ...}`` / ``{"model": ...}``.
    Raises :class:`CheckpointError` with the file name and the reason on any failure.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=map_location)
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated, or unsafe pickles all end here
        raise CheckpointError(f"cannot read {path.name}: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name} does not hold a state dict of tensors")
    return dict(obj)
