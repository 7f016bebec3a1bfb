"""Predictor: set the supports once, then segment any number of queries (cf. ``SamPredictor``).

Many predictors (one per app session) can share one model: each holds only its supports, their
cached features and its own singular values; the shared model is switched to a predictor's
singular values under a lock for the duration of each call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .adapt import AdaptConfig, AdaptProgress, AdaptResult, adapt_svf
from .delta import load_svf_delta, save_svf_delta, set_svf_state, svf_state
from .imageio import ImageLike, InputError, check_mask, load_image, load_mask
from .model import FewShotSegmenter
from .preprocess import letterbox_image, letterbox_mask, unletterbox_logits
from .svf import svf_parameters


@dataclass
class Prediction:
    """One query's result at its original size."""

    mask: np.ndarray  # bool [H, W]
    prob: np.ndarray  # float32 [H, W], foreground probability
    seconds: float


_STATE_TOKENS = itertools.count(1)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _shared_lock(model: FewShotSegmenter) -> threading.RLock:
    lock = getattr(model, "_predictor_lock", None)
    if lock is None:
        lock = threading.RLock()
        model._predictor_lock = lock
    return lock


def base_svf_state(model: FewShotSegmenter) -> dict[str, torch.Tensor]:
    """The model's own (pretrained) singular values, recorded the first time it is asked for."""
    state = getattr(model, "_svf_base_state", None)
    if state is None:
        state = {k: v.detach().clone() for k, v in svf_state(model.backbone).items()}
        model._svf_base_state = state
    return state


class Predictor:
    """Few-shot segmentation of queries against cached supports.

    Args:
        model: a :class:`FewShotSegmenter` (shared; never modified outside the lock).
        image_size: the side the inputs are letterboxed to (473 for PASCAL models).
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when present).
        precision: ``"fp32"``, ``"bf16"`` (autocast, CPU or GPU) or ``"fp16"`` (autocast, GPU).
        max_shots: refuse more shots than this (``None``: no limit).
        model_name: used to tag exported singular values (checked on import).
    """

    def __init__(
        self,
        model: FewShotSegmenter,
        image_size: int = 473,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        max_shots: int | None = None,
        model_name: str | None = None,
    ) -> None:
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.image_size = image_size
        self.precision = precision
        self.max_shots = max_shots
        self.model_name = model_name or getattr(model, "name", model.backbone.name)
        self._lock = _shared_lock(model)
        self._base = base_svf_state(model)
        self._svf: dict[str, torch.Tensor] | None = None  # None: the model's own values
        self._svf_token = 0  # identifies self._svf while it is loaded in the shared model
        self._supports: torch.Tensor | None = None  # [K, 3, S, S]
        self._support_masks: torch.Tensor | None = None  # [K, S, S]
        self._cache = None

    # -- state -------------------------------------------------------------------------------
    @property
    def num_shots(self) -> int:
        return 0 if self._supports is None else self._supports.shape[0]

    @property
    def adapted(self) -> bool:
        return self._svf is not None

    def svf_values(self) -> dict[str, torch.Tensor]:
        """This predictor's trainable singular-value tensors (the base ones if not adapted)."""
        return dict(self._svf if self._svf is not None else self._base)

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        """Hold the shared model with this predictor's singular values loaded.

        Loading is skipped when the model still holds exactly these values (same state token and
        untouched parameters), so consecutive calls of one session keep the cached folded weights.
        """
        with self._lock:
            token = self._svf_token if self._svf is not None else 0
            versions = tuple(p._version for p in svf_parameters(self.model.backbone))
            if getattr(self.model, "_loaded_svf", None) != (token, versions):
                set_svf_state(self.model.backbone, self._svf if self._svf is not None else self._base)
                versions = tuple(p._version for p in svf_parameters(self.model.backbone))
                self.model._loaded_svf = (token, versions)
            yield

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- supports ----------------------------------------------------------------------------
    def set_supports(
        self,
        images: Sequence[ImageLike],
        masks: Sequence[ImageLike],
        ignore: Sequence[ImageLike] | None = None,
    ) -> None:
        """Set the support shots and cache their features.

        Args:
            images: K images (path, PIL or ``[H, W(, C)]`` array; grey/RGBA/16-bit accepted).
            masks: K masks of the same sizes; nonzero = foreground.
            ignore: optional K masks of pixels to ignore (nonzero = ignored).
        """
        if len(images) == 0:
            raise InputError("add at least one support shot (an image with its object painted)")
        if len(images) != len(masks):
            raise InputError(f"{len(images)} support images but {len(masks)} masks")
        if self.max_shots is not None and len(images) > self.max_shots:
            raise InputError(f"{len(images)} shots given; at most {self.max_shots} are supported")
        mean, std = self.model.backbone.mean, self.model.backbone.std
        xs, ms = [], []
        for i, (img, msk) in enumerate(zip(images, masks, strict=True)):
            img = load_image(img)
            msk = load_mask(msk)
            ign = load_mask(ignore[i]) if ignore is not None and ignore[i] is not None else None
            check_mask(msk, img, what=f"mask of shot {i + 1}", ignore=ign)
            xs.append(letterbox_image(img, self.image_size, mean, std))
            ms.append(letterbox_mask(msk, self.image_size, ign))
        self._supports = torch.stack(xs).to(self.device)
        self._support_masks = torch.stack(ms).to(self.device)
        self._cache = None
        self._encode()

    def _encode(self) -> None:
        with self._active(), torch.no_grad(), self._autocast():
            self._cache = self.model.encode_supports(self._supports[None], self._support_masks[None])

    def clear_supports(self) -> None:
        self._supports = self._support_masks = self._cache = None

    # -- queries -----------------------------------------------------------------------------
    def predict(self, image: ImageLike, threshold: float = 0.5) -> Prediction:
        """Segment one query -> :class:`Prediction` at the query's original size."""
        if self._supports is None:
            raise InputError("no support shots: add at least one before segmenting")
        start = time.perf_counter()
        img = load_image(image)
        h, w = img.shape[:2]
        x = letterbox_image(img, self.image_size, self.model.backbone.mean, self.model.backbone.std)
        with self._active(), torch.no_grad():
            if self._cache is None:
                self._encode()
            with self._autocast():
                logits = self.model.segment(x[None].to(self.device), self._cache)
        prob = unletterbox_logits(logits, h, w).softmax(1)[0, 1].cpu().numpy().astype(np.float32)
        return Prediction(mask=prob > threshold, prob=prob, seconds=time.perf_counter() - start)

    def predict_many(self, images: Sequence[ImageLike], threshold: float = 0.5) -> list[Prediction]:
        return [self.predict(img, threshold) for img in images]

    # -- adaptation --------------------------------------------------------------------------
    def adapt(
        self,
        config: AdaptConfig | None = None,
        progress: Callable[[AdaptProgress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> AdaptResult:
        """Fine-tune this predictor's singular values on its supports (see :func:`adapt_svf`).

        A cancelled run, or one the support gate rejects (``result.reverted``, see
        ``AdaptConfig.gate``), leaves the predictor as it was before the call.
        """
        if self._supports is None:
            raise InputError("no support shots: add at least one before adapting")
        config = config or AdaptConfig()
        if config.modules is None and getattr(self.model, "adapt_modules", None):
            config = dataclasses.replace(config, modules=list(self.model.adapt_modules))
        with self._active():
            before = svf_state(self.model.backbone)
            try:
                result = adapt_svf(self.model, self._supports, self._support_masks, config, progress, should_stop)
            finally:
                after = svf_state(self.model.backbone)
                set_svf_state(self.model.backbone, before)
            if not (result.cancelled or result.skipped or result.reverted):
                self._set_svf({k: v.detach().clone() for k, v in after.items()})
                result.note = getattr(self.model, "adapt_note", None) or None
        return result

    def _set_svf(self, state: dict[str, torch.Tensor] | None) -> None:
        self._svf = state
        self._svf_token = next(_STATE_TOKENS)
        self._cache = None

    def reset(self) -> None:
        """Forget the adaptation: back to the model's own singular values."""
        self._set_svf(None)

    def export_svf(self, path: str) -> None:
        """Write this predictor's singular values as a safetensors delta."""
        with self._active():
            save_svf_delta(self.model.backbone, path, self.model_name)

    def import_svf(self, path: str) -> None:
        """Load singular values exported by :meth:`export_svf` (base model name and hash checked)."""
        with self._lock:
            backup = svf_state(self.model.backbone)
            try:
                load_svf_delta(self.model.backbone, path, self.model_name)
                self._set_svf({k: v.detach().clone() for k, v in svf_state(self.model.backbone).items()})
            finally:
                set_svf_state(self.model.backbone, backup)
        self._cache = None
