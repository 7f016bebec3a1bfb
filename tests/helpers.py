"""Small shared test utilities: real fss-dev pairs, IoU, benchmark scripts as modules, a small SVF
model, torch's thread count kept across a CLI call."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from svf_model import apply_svf
from svf_model.heads import build_head
from svf_model.model import FewShotSegmenter


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


def prototype_svf_model(backbone: torch.nn.Module, svf_on: str = "layer4.1") -> FewShotSegmenter:
    """The prototype head on layer2-4 of a deep copy of ``backbone`` (SVF goes into the backbone, so a
    session-wide backbone stays plain), SVF (exp parametrisation) on its module ``svf_on``; eval mode."""
    backbone = copy.deepcopy(backbone)
    model = FewShotSegmenter(backbone, build_head("prototype", backbone, stages=("layer2", "layer3", "layer4")))
    apply_svf([backbone.get_submodule(svf_on)], parametrization="exp")
    return model.eval()


@contextlib.contextmanager
def kept_torch_threads() -> Iterator[None]:
    """Restore torch's thread count afterwards: a CLI's ``--threads`` sets it for the whole process."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
