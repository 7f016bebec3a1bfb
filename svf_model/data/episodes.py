"""Episodes: one class, K support shots and one query, sampled reproducibly from a data source.

Sampling uses only ``random.Random(seed)`` (never torch), so the same seed gives the same episodes
whatever the model, device or number of data-loader workers.

Three sampling modes:

* ``"balanced"``: episode ``j`` uses class ``j mod C`` of a seeded class order, the query and the
  supports drawn at random among that class's images (equal episodes per class).
* ``"class"``: the class is drawn uniformly at random for each episode (HSNet's COCO sampling).
* ``"image"``: the queries run through a seeded order of the images, the class drawn among the
  eligible classes present in that image (PFENet/BAM's evaluation loop over the image list).

Supports are always distinct (image, label) pairs of the chosen class, different from the query.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, overload

import numpy as np
from PIL import Image

IGNORE = 255
SamplingMode = Literal["balanced", "class", "image"]


class Item(NamedTuple):
    """One annotated image: the photo and its label file (a binary mask or a class-id map)."""

    image: Path
    label: Path


@dataclass(frozen=True)
class EpisodeSpec:
    """An episode before loading: which class, which support items, which query item."""

    class_name: str
    supports: tuple[Item, ...]
    query: Item


@dataclass
class Episode:
    """A loaded episode.

    Attributes:
        class_name: the target class.
        support_paths: the K support image paths.
        query_path: the query image path.
        supports: K ``uint8 [H, W, 3]`` RGB images.
        support_masks: K ``uint8 [H, W]`` masks, 1 = class, 0 = background, 255 = ignore.
        query: ``uint8 [H, W, 3]``.
        query_mask: ``uint8 [H, W]`` in {0, 1, 255}.
    """

    class_name: str
    support_paths: list[str]
    query_path: str
    supports: list[np.ndarray]
    support_masks: list[np.ndarray]
    query: np.ndarray
    query_mask: np.ndarray

    @property
    def shots(self) -> int:
        return len(self.supports)


def read_rgb(path: str | Path) -> np.ndarray:
    """Image file -> ``uint8 [H, W, 3]`` RGB."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).copy()


def read_label(path: str | Path) -> np.ndarray:
    """Label file -> ``uint8 [H, W]`` of raw values (palette PNGs give their indices)."""
    with Image.open(path) as img:
        if img.mode not in ("L", "P"):
            img = img.convert("L")
        return np.asarray(img).copy()


class EpisodeSource(ABC):
    """A collection of annotated images grouped by class, from which episodes are drawn."""

    root: Path
    #: Sampling mode used when none is given.
    default_mode: SamplingMode = "balanced"

    @property
    @abstractmethod
    def classes(self) -> list[str]:
        """The class names of this source (already restricted to its split)."""

    @abstractmethod
    def items(self, class_name: str) -> list[Item]:
        """The annotated images that contain ``class_name`` (sorted, stable)."""

    @abstractmethod
    def load_mask(self, item: Item, class_name: str) -> np.ndarray:
        """``uint8 [H, W]``: 1 where ``class_name`` is, 255 where ignored, 0 elsewhere."""

    def load_image(self, item: Item) -> np.ndarray:
        """``uint8 [H, W, 3]`` RGB."""
        return read_rgb(item.image)

    def load(self, spec: EpisodeSpec) -> Episode:
        """Read the images and masks of ``spec``."""
        supports, masks = [], []
        for item in spec.supports:
            supports.append(self.load_image(item))
            masks.append(self.load_mask(item, spec.class_name))
        query = self.load_image(spec.query)
        query_mask = self.load_mask(spec.query, spec.class_name)
        for img, msk in [*zip(supports, masks, strict=True), (query, query_mask)]:
            if img.shape[:2] != msk.shape:
                raise ValueError(f"image {img.shape[:2]} and mask {msk.shape} differ in size ({spec})")
        return Episode(
            class_name=spec.class_name,
            support_paths=[str(i.image) for i in spec.supports],
            query_path=str(spec.query.image),
            supports=supports,
            support_masks=masks,
            query=query,
            query_mask=query_mask,
        )

    def relpath(self, path: str | Path) -> str:
        """``path`` relative to :attr:`root` where possible (for reports)."""
        try:
            return Path(path).resolve().relative_to(Path(self.root).resolve()).as_posix()
        except ValueError:
            return str(path)


def eligible_classes(source: EpisodeSource, shots: int, classes: Sequence[str] | None = None) -> list[str]:
    """Classes (of ``classes`` or all) with at least ``shots + 1`` images, in source order."""
    wanted = source.classes if classes is None else list(classes)
    unknown = sorted(set(wanted) - set(source.classes))
    if unknown:
        raise KeyError(f"unknown classes {unknown}; available: {', '.join(source.classes)}")
    out = [c for c in wanted if len(source.items(c)) >= shots + 1]
    if not out:
        raise ValueError(f"no class has the {shots + 1} images that a {shots}-shot episode needs")
    return out


def _draw_supports(rng: random.Random, pool: list[Item], query: Item, shots: int) -> tuple[Item, ...]:
    candidates = [it for it in pool if it != query]
    return tuple(rng.sample(candidates, shots))


def sample_episode(
    source: EpisodeSource,
    rng: random.Random,
    shots: int,
    classes: Sequence[str],
    mode: SamplingMode = "class",
    index: int = 0,
    order: Sequence | None = None,
) -> EpisodeSpec:
    """Draw one episode spec with ``rng``.

    Args:
        classes: eligible classes (see :func:`eligible_classes`).
        mode: see the module docstring.
        index: the episode's position (``"balanced"`` and ``"image"`` modes).
        order: the seeded class order (``"balanced"``) or ``(item, classes)`` list (``"image"``).
    """
    if mode == "image":
        order = order if order is not None else image_order(source, classes, rng)
        query, present = order[index % len(order)]
        class_name = rng.choice(present)
    else:
        if mode == "balanced":
            order = order if order is not None else rng.sample(list(classes), len(classes))
            class_name = order[index % len(order)]
        elif mode == "class":
            class_name = rng.choice(list(classes))
        else:
            raise ValueError(f"unknown sampling mode {mode!r}; use balanced, class or image")
        query = rng.choice(source.items(class_name))
    return EpisodeSpec(class_name, _draw_supports(rng, source.items(class_name), query, shots), query)


def image_order(source: EpisodeSource, classes: Sequence[str], rng: random.Random) -> list[tuple[Item, list[str]]]:
    """Every item with the eligible classes it holds, in a seeded order."""
    per_item: dict[Item, list[str]] = {}
    for c in classes:
        for it in source.items(c):
            per_item.setdefault(it, []).append(c)
    pairs = list(per_item.items())
    pairs.sort(key=lambda p: (str(p[0].image), str(p[0].label)))
    rng.shuffle(pairs)
    return pairs


def sample_episodes(
    source: EpisodeSource,
    n: int,
    shots: int,
    seed: int,
    classes: Sequence[str] | None = None,
    mode: SamplingMode | None = None,
) -> list[EpisodeSpec]:
    """``n`` episode specs drawn with ``random.Random(seed)`` (deterministic, torch-independent)."""
    if shots < 1:
        raise ValueError("shots must be >= 1")
    mode = mode or source.default_mode
    rng = random.Random(seed)
    eligible = eligible_classes(source, shots, classes)
    if mode == "balanced":
        order = rng.sample(eligible, len(eligible))
    elif mode == "image":
        order = image_order(source, eligible, rng)
    else:
        order = None
    return [sample_episode(source, rng, shots, eligible, mode, j, order) for j in range(n)]


class EpisodeSet(Sequence[Episode]):
    """A fixed list of episodes, loaded on access. ``specs[i]`` says what episode ``i`` holds."""

    def __init__(self, source: EpisodeSource, specs: list[EpisodeSpec]) -> None:
        self.source = source
        self.specs = specs

    def __len__(self) -> int:
        return len(self.specs)

    @overload
    def __getitem__(self, i: int) -> Episode: ...

    @overload
    def __getitem__(self, i: slice) -> EpisodeSet: ...

    def __getitem__(self, i: int | slice) -> Episode | EpisodeSet:
        """Episode ``i`` (loaded now), or the episodes of a slice as an ``EpisodeSet`` (loaded on access)."""
        if isinstance(i, slice):
            return EpisodeSet(self.source, self.specs[i])
        return self.source.load(self.specs[i])


def make_episodes(
    source: EpisodeSource,
    n: int,
    shots: int,
    seed: int,
    classes: Sequence[str] | None = None,
    mode: SamplingMode | None = None,
) -> EpisodeSet:
    """Seeded evaluation episodes of ``source`` (see :func:`sample_episodes`)."""
    return EpisodeSet(source, sample_episodes(source, n, shots, seed, classes, mode))


class EpisodeDataset:
    """Map-style dataset of training episodes (``torch.utils.data.Dataset`` protocol).

    Item ``i`` of epoch ``e`` is drawn with ``random.Random(f"{seed}:{e}:{i}")`` and augmented under
    ``torch.manual_seed`` of the same key (in a forked RNG), so every episode is reproducible
    whatever the worker or rank that loads it. Call :meth:`set_epoch` at each epoch.

    Args:
        source: where episodes come from.
        shots: K.
        length: episodes per epoch.
        transform: ``(image, mask) -> (uint8 [3, S, S], uint8 [S, S])`` (``TrainAugment`` or
            ``Letterbox``).
        seed: base seed.
        classes: restrict to these classes.
        mode: sampling mode (``"class"`` by default: classes uniformly at random).
    """

    def __init__(
        self,
        source: EpisodeSource,
        shots: int,
        length: int,
        transform,  # noqa: ANN001 - Callable[[np.ndarray, np.ndarray], tuple[Tensor, Tensor]]
        seed: int = 0,
        classes: Sequence[str] | None = None,
        mode: SamplingMode = "class",
    ) -> None:
        self.source = source
        self.shots = shots
        self.length = length
        self.transform = transform
        self.seed = seed
        self.mode = mode
        self.classes = eligible_classes(source, shots, classes)
        self.epoch = 0
        self._order: list | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> EpisodeSpec:
        """The episode spec of ``index`` in the current epoch."""
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        if self._order is None and self.mode != "class":
            order_rng = random.Random(self.seed)
            self._order = (image_order(self.source, self.classes, order_rng) if self.mode == "image"
                           else order_rng.sample(self.classes, len(self.classes)))
        # "image" / "balanced": images / classes in turn through a seeded order, across the epochs.
        position = self.epoch * self.length + index
        return sample_episode(self.source, rng, self.shots, self.classes, self.mode, position, self._order)

    def __getitem__(self, index: int) -> dict:
        import torch

        spec = self.spec(index)
        episode = self.source.load(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random.Random(f"aug:{self.seed}:{self.epoch}:{index}").randrange(1 << 62))
            query, query_mask = self.transform(episode.query, episode.query_mask)
            pairs = [self.transform(s, m) for s, m in zip(episode.supports, episode.support_masks, strict=True)]
        return {
            "query": query,
            "query_mask": query_mask,
            "supports": torch.stack([p[0] for p in pairs]),
            "support_masks": torch.stack([p[1] for p in pairs]),
            "class_name": spec.class_name,
            "query_path": episode.query_path,
            "support_paths": episode.support_paths,
        }
