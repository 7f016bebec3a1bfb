"""Small shared test utilities: real fss-dev pairs, IoU, benchmark scripts as modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image


def fss_pairs(root: Path, cls: str, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first ``n`` (image uint8 [H,W,3], mask bool [H,W]) pairs of class ``cls`` (sorted by stem)."""
    stems = sorted(p for p in (root / cls).glob("*.jpg"))[:n]
    return [(np.asarray(Image.open(p).convert("RGB")), np.asarray(Image.open(p.with_suffix(".png"))) > 127)
            for p in stems]


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
