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
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .adapt import AdaptConfig, AdaptProgress, AdaptResult, adapt_svf, support_score
from .delta import load_svf_delta, save_svf_delta, set_svf_state, svf_state, svf_state_keys
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


_MODEL_LOCKS: weakref.WeakKeyDictionary[FewShotSegmenter, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def _shared_lock(model: FewShotSegmenter) -> threading.RLock:
    """The one lock of every Predictor over ``model`` (kept beside the model, not on it, so that the
    model can still be deep-copied or pickled after a Predictor has used it)."""
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(model, threading.RLock())


def base_svf_state(model: FewShotSegmenter, low_shot: bool = False) -> dict[str, torch.Tensor]:
    """The model's own (pretrained) singular values, recorded the first time they are asked for; with
    ``low_shot``, its low-shot values instead (:class:`svf_model.model.LowShotValues`; layers they do
    not cover, e.g. SVF layers added after loading, keep the model's own). SVF layers added or
    removed since the record (``apply_svf`` on a model a Predictor already used, or on a deep copy
    of it) are recorded at their current values; the others keep their recorded ones."""
    state = getattr(model, "_svf_base_state", None)
    if state is None or state.keys() != set(svf_state_keys(model.backbone)):
        current = svf_state(model.backbone)
        state = {k: state[k] if state is not None and k in state else v for k, v in current.items()}
        model._svf_base_state = state
        model._svf_low_shot_state = None
    if not low_shot or getattr(model, "low_shot_values", None) is None:
        return state
    low = getattr(model, "_svf_low_shot_state", None)
    if low is None:
        low = {**state, **{k: v.detach().clone() for k, v in model.low_shot_values.state.items()}}
        model._svf_low_shot_state = low
    return low


class Predictor:
    """Few-shot segmentation of queries against cached supports.

    For a model with low-shot singular values (:class:`svf_model.model.LowShotValues`) the predictor
    segments with those values and the head's prototype logits below their shot count, and from there
    on (up to ``fallback_up_to`` shots) when the supports' leave-one-out check favours them by the model's
    fallback margin
    (:attr:`uses_low_shot_values`, :attr:`fallback_scores`); otherwise with the model's own values and
    whole head.

    Args:
        model: a :class:`FewShotSegmenter` (shared; never modified outside the lock).
        image_size: the side the inputs are letterboxed to (473 for PASCAL models).
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when present).
        precision: ``"fp32"``, ``"bf16"`` (autocast, CPU or GPU) or ``"fp16"`` (autocast, GPU).
        max_shots: refuse more shots than this (``None``: no limit).
        model_name: used to tag exported singular values (checked on import).
        flip: also segment each query mirrored left-right and average the two foreground
            probabilities (test-time augmentation: twice the query's cost; measured in the README,
            "Accuracy of the shipped model"). Off by default, which is what the evaluation tables
            score; the app turns it on.
    """

    def __init__(
        self,
        model: FewShotSegmenter,
        image_size: int = 473,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        max_shots: int | None = None,
        model_name: str | None = None,
        flip: bool = False,
    ) -> None:
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.image_size = image_size
        self.precision = precision
        self.max_shots = max_shots
        self.flip = flip
        self.model_name = model_name or getattr(model, "name", model.backbone.name)
        self._lock = _shared_lock(model)
        base_svf_state(model)  # recorded before anything can change the values
        self._svf: dict[str, torch.Tensor] | None = None  # None: the model's own values
        self._svf_base: dict[str, torch.Tensor] | None = None  # the base values self._svf started from
        self._low_shot = False  # the supports are segmented with the low-shot values
        self._svf_low_shot = False  # self._svf was adapted from (and runs like) the low-shot values
        self.fallback_scores: tuple[float, float] | None = None  # support IoU: own values+head, low-shot
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

    @property
    def uses_low_shot_values(self) -> bool:
        """Whether queries are segmented with the low-shot values (or values adapted from them) and the
        prototype logits, rather than with the model's own values and whole head."""
        return self._svf_low_shot if self._svf is not None else self._low_shot

    @property
    def _base(self) -> dict[str, torch.Tensor]:
        """The model's singular values for the current supports (own or low-shot)."""
        return base_svf_state(self.model, self._low_shot)

    def svf_values(self) -> dict[str, torch.Tensor]:
        """This predictor's trainable singular-value tensors (the base ones if not adapted)."""
        return dict(self._svf if self._svf is not None else self._base)

    def base_values(self) -> dict[str, torch.Tensor]:
        """The base singular values :meth:`svf_values` are compared with: those the adaptation
        started from, or, not adapted, the model's own for this number of shots."""
        return dict(self._svf_base if self._svf is not None and self._svf_base is not None else self._base)

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        """Hold the shared model with this predictor's singular values loaded.

        Loading is skipped when the model still holds exactly these values (same state token and
        untouched parameters), so consecutive calls of one session keep the cached folded weights.
        """
        with self._lock:
            if self._svf is not None:
                token = self._svf_token
            else:  # the model's own values: 0, or -1 for its low-shot values
                token = -1 if self._low_shot else 0
            versions = tuple(p._version for p in svf_parameters(self.model.backbone))
            if getattr(self.model, "_loaded_svf", None) != (token, versions):
                set_svf_state(self.model.backbone, self._svf if self._svf is not None else self._base)
                versions = tuple(p._version for p in svf_parameters(self.model.backbone))
                self.model._loaded_svf = (token, versions)
            prototype_only = getattr(self.model.head, "prototype_only", None)
            with prototype_only() if self.uses_low_shot_values and prototype_only else contextlib.nullcontext():
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
        memoize = getattr(self.model.backbone, "memoize", None)  # the check and the encoding share passes
        with memoize() if memoize is not None else contextlib.nullcontext():
            self._low_shot = self._choose_low_shot()
            self._encode()

    def _choose_low_shot(self) -> bool:
        """Whether the current supports get the low-shot values (see the class docstring). The check
        segments each support from the others twice - own values with the whole head (refinement
        from one shot on), low-shot values with the prototype logits - and compares pooled IoUs."""
        self.fallback_scores = None
        low = getattr(self.model, "low_shot_values", None)
        if low is None:
            return False
        if self.num_shots < low.below:
            return True
        head, backbone = self.model.head, self.model.backbone
        too_many = low.fallback_up_to is not None and self.num_shots > low.fallback_up_to
        if low.fallback_margin is None or too_many or not hasattr(head, "prototype_only") or self.num_shots < 2:
            return False
        episode = (self._supports, self._support_masks)
        whole_head = getattr(head, "refined_from_one_shot", contextlib.nullcontext)
        with self._lock:
            loaded = svf_state(backbone)
            try:
                set_svf_state(backbone, base_svf_state(self.model))
                with whole_head():
                    own = support_score(self.model, episode)
                set_svf_state(backbone, base_svf_state(self.model, low_shot=True))
                with head.prototype_only():
                    plain = support_score(self.model, episode)
            finally:
                set_svf_state(backbone, loaded)
        self.fallback_scores = (own, plain)
        return plain > own + low.fallback_margin

    def _encode(self) -> None:
        with self._active(), torch.no_grad(), self._autocast():
            self._cache = self.model.encode_supports(self._supports[None], self._support_masks[None])

    def clear_supports(self) -> None:
        self._supports = self._support_masks = self._cache = None
        self._low_shot, self.fallback_scores = False, None

    # -- queries -----------------------------------------------------------------------------
    def predict(self, image: ImageLike, threshold: float = 0.5) -> Prediction:
        """Segment one query -> :class:`Prediction` at the query's original size."""
        if self._supports is None:
            raise InputError("no support shots: add at least one before segmenting")
        start = time.perf_counter()
        img = load_image(image)
        views = [img, np.ascontiguousarray(img[:, ::-1])] if self.flip else [img]
        with self._active(), torch.no_grad():
            if self._cache is None:
                self._encode()
            probs = [self._foreground(view) for view in views]
        prob = probs[0] if len(probs) == 1 else (probs[0] + probs[1][:, ::-1]) / 2
        prob = np.ascontiguousarray(prob, dtype=np.float32)
        return Prediction(mask=prob > threshold, prob=prob, seconds=time.perf_counter() - start)

    def _foreground(self, img: np.ndarray) -> np.ndarray:
        """Foreground probability ``[H, W]`` of one decoded image (the model held, supports encoded)."""
        h, w = img.shape[:2]
        x = letterbox_image(img, self.image_size, self.model.backbone.mean, self.model.backbone.std)
        with self._autocast():
            logits = self.model.segment(x[None].to(self.device), self._cache)
        return unletterbox_logits(logits, h, w).softmax(1)[0, 1].cpu().numpy()

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
                base, low_shot = self.base_values(), self.uses_low_shot_values
                self._set_svf({k: v.detach().clone() for k, v in after.items()})
                self._svf_base, self._svf_low_shot = base, low_shot
                result.note = getattr(self.model, "adapt_note", None) or None
        return result

    def _set_svf(self, state: dict[str, torch.Tensor] | None) -> None:
        self._svf = state
        self._svf_base = None
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
                base = self._base
                self._set_svf({k: v.detach().clone() for k, v in svf_state(self.model.backbone).items()})
                self._svf_base, self._svf_low_shot = base, self._low_shot
            finally:
                set_svf_state(self.model.backbone, backup)
        self._cache = None
