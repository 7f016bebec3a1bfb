"""Per-process model store and per-browser-session state.

One :class:`ModelStore` per process loads each registered model once; every browser session holds
a :class:`Session`: its own shots, its own :class:`~svf_model.predictor.Predictor` (supports and
singular values) on the shared model, its stop flag and its scratch folder for downloads.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from svf_model.adapt import AdaptConfig, AdaptProgress, AdaptResult
from svf_model.imageio import MAX_SIDE, ImageLike, InputError, check_mask, downscale, load_image, load_mask
from svf_model.predictor import Prediction, Predictor, default_device
from svf_model.registry import ModelEntry, list_models, load_model

logger = logging.getLogger(__name__)

MAX_SHOTS = 5
MEMO_BYTES = 512 << 20  # feature memo of the loaded model (svf_model.feature_memo)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    entry: ModelEntry
    image_size: int
    seconds: float


class ModelStore:
    """Loads registered models on first use (once per process) and hands out the shared instances.

    Args:
        default: the model new sessions start with (``None``: the registry's default).
        image_size: overrides every entry's ``image_size`` (tests and small machines).
        device: ``"cpu"``/``"cuda"`` (``None``: CUDA when present).
        flip: segment each query also mirrored and average the two (``Predictor.flip``; README,
            "Accuracy of the shipped model").
    """

    def __init__(self, default: str | None = None, image_size: int | None = None, device: str | None = None,
                 flip: bool = True):
        names = list_models()
        if default is not None and default not in names:
            raise InputError(f"unknown model {default!r}; registered: {', '.join(names)}")
        self.names = names
        self.default = default or names[0]
        self.image_size = image_size
        self.device = torch.device(device) if device else default_device()
        self.flip = flip
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def get(self, name: str | None = None) -> LoadedModel:
        name = name or self.default
        if name not in self.names:
            raise InputError(f"unknown model {name!r}; registered: {', '.join(self.names)}")
        with self._lock:
            if name not in self._models:
                start = time.perf_counter()
                model, entry = load_model(name, device=str(self.device))
                # supports and queries are encoded again after every Adapt and re-Segment: the
                # memo keeps their frozen blocks' features (shared by sessions, LRU, content-keyed)
                model.backbone.enable_memo(MEMO_BYTES)
                size = self.image_size or entry.image_size
                self._models[name] = LoadedModel(model, entry, size, time.perf_counter() - start)
                logger.info("loaded model %s in %.1f s (image size %d)", name, time.perf_counter() - start, size)
            return self._models[name]

    def preload(self, name: str | None = None) -> threading.Thread:
        """Load a model in the background so the page is served while the weights load."""

        def work() -> None:
            try:
                self.get(name)
            except Exception:  # noqa: BLE001 - reported again, as a message, when a session asks for it
                logger.exception("could not preload model %s", name or self.default)

        thread = threading.Thread(target=work, name="svf-preload", daemon=True)
        thread.start()
        return thread

    def predictor(self, name: str | None = None) -> tuple[Predictor, LoadedModel]:
        loaded = self.get(name)
        pred = Predictor(loaded.model, loaded.image_size, device=self.device, max_shots=MAX_SHOTS,
                         model_name=loaded.entry.name, flip=self.flip)
        return pred, loaded


class Scratch:
    """A folder of files handed to the browser (mask PNGs, singular values); files older than
    ``max_age_s`` are removed whenever a new one is made."""

    def __init__(self, prefix: str = "svf-app-", max_age_s: float = 3600.0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.max_age_s = max_age_s

    def new(self, filename: str) -> Path:
        self._prune()
        folder = self.root / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True, exist_ok=True)
        return folder / filename

    def _prune(self) -> None:
        limit = time.time() - self.max_age_s
        for folder in self.root.iterdir():
            try:
                if folder.stat().st_mtime < limit:
                    shutil.rmtree(folder, ignore_errors=True)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Shot:
    image: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray  # bool [H, W]
    name: str


def prepare_shot(image: ImageLike, mask: ImageLike, name: str = "shot") -> tuple[Shot, bool]:
    """Load, validate and (if larger than ``MAX_SIDE``) downscale one support -> ``(shot, downscaled)``."""
    img = load_image(image)
    msk = load_mask(mask)
    check_mask(msk, img, what=f"the mask of {name}")
    small = downscale(img)
    if small is not img:
        msk = downscale(msk, nearest=True)
        check_mask(msk, small, what=f"the mask of {name} (downscaled to {MAX_SIDE} px)")
    return Shot(small, msk, name), small is not img


@dataclass
class Query:
    name: str
    image: np.ndarray  # uint8 [h, w, 3], downscaled if larger than MAX_SIDE
    size: tuple[int, int]  # (H, W) of the original file: the masks handed out have this size

    @property
    def downscaled(self) -> bool:
        return self.image.shape[:2] != self.size


def prepare_query(image: ImageLike, name: str = "query") -> Query:
    img = load_image(image)
    return Query(name, downscale(img), img.shape[:2])


def full_size(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``bool [h, w]`` mask of a downscaled image -> ``bool [H, W]`` at the original size (nearest)."""
    if mask.shape == tuple(size):
        return mask
    from PIL import Image

    return np.asarray(Image.fromarray(mask).resize((size[1], size[0]), Image.NEAREST))


class Session:
    """One browser session: shots, queries, a predictor of its own, a stop flag, a scratch folder."""

    def __init__(self, store: ModelStore, model_name: str | None = None) -> None:
        self.store = store
        self.shots: list[Shot] = []
        self.queries: list[Query] = []
        self.stop = threading.Event()
        self.scratch = Scratch(prefix="svf-session-")
        self.last_action = "ready"
        self.adapt_info = ""
        self._lock = threading.RLock()
        self._dirty = True
        self.predictor, self.loaded = store.predictor(model_name)

    def __deepcopy__(self, memo: dict) -> Session:
        # Gradio deep-copies state values in a few places; the shared model must never be copied.
        return self

    # -- model ------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.loaded.entry.name

    def set_model(self, name: str) -> None:
        """Switch to another registered model (the adaptation is dropped, the shots are kept)."""
        with self._lock:
            self.predictor, self.loaded = self.store.predictor(name)
            self.adapt_info = ""
            self._dirty = True

    # -- shots ------------------------------------------------------------------------------------
    def add_shot(self, shot: Shot) -> None:
        with self._lock:
            if len(self.shots) >= MAX_SHOTS:
                raise InputError(f"{MAX_SHOTS} shots is the maximum: remove one before adding another")
            self.shots.append(shot)
            self._dirty = True

    def remove_shot(self, index: int | None) -> Shot:
        with self._lock:
            if not self.shots:
                raise InputError("there are no shots to remove")
            if index is None or not 0 <= index < len(self.shots):
                raise InputError("select a shot in the gallery first, then remove it")
            self._dirty = True
            return self.shots.pop(index)

    def set_shots(self, shots: Sequence[Shot]) -> None:
        if len(shots) > MAX_SHOTS:
            raise InputError(f"{len(shots)} shots given; at most {MAX_SHOTS} are supported")
        with self._lock:
            self.shots = list(shots)
            self._dirty = True

    def sync(self) -> None:
        """Encode the shots into the predictor if they changed since the last call."""
        with self._lock:
            if not self.shots:
                raise InputError("no support shots yet: paint the object on a photo and press 'Add shot'")
            if self._dirty:
                self.predictor.set_supports([s.image for s in self.shots], [s.mask for s in self.shots])
                self._dirty = False

    # -- inference --------------------------------------------------------------------------------
    def segment(self, queries: Sequence[Query]) -> list[Prediction]:
        self.sync()
        self.queries = list(queries)
        return [self.predictor.predict(q.image) for q in self.queries]

    def adapt_config(self, steps: int | None = None, lr: float | None = None, gate: bool = True) -> AdaptConfig:
        """The Adapt button's settings; ``lr`` 0 or None: the default step for the number of shots."""
        config = AdaptConfig(gate="support" if gate else "off")
        if steps is not None:
            config.steps = int(steps)
        if lr:  # 0 or None: the default step for the number of shots (AdaptConfig.step_size)
            config.lr = float(lr)
        if config.image_size is not None:
            config.image_size = min(config.image_size, self.loaded.image_size)
        return config

    def adapt(
        self,
        config: AdaptConfig,
        progress: Callable[[AdaptProgress], None] | None = None,
    ) -> AdaptResult:
        self.sync()
        result = self.predictor.adapt(config, progress=progress, should_stop=self.stop.is_set)
        if not (result.cancelled or result.skipped or result.reverted):
            self.adapt_info = f"{result.steps} steps on {len(self.shots)} shot(s), lr {result.lr:g}"
        return result

    def reset(self) -> None:
        self.predictor.reset()
        self.adapt_info = ""

    def close(self) -> None:
        self.stop.set()
        self.scratch.close()


def close_session(session: Session | None) -> None:
    """``gr.State`` delete callback: free the session's files when its browser tab is gone."""
    if isinstance(session, Session):
        session.close()
