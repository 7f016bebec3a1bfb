"""Few-shot segmentation data: sources (FSS-1000 folders, PASCAL-5i, COCO-20i), seeded episodes,
joint augmentation and the training collate."""

from .coco import COCO_CLASSES, Coco20i, coco_fold_classes
from .episodes import (
    IGNORE,
    Episode,
    EpisodeDataset,
    EpisodeSet,
    EpisodeSource,
    EpisodeSpec,
    Item,
    eligible_classes,
    make_episodes,
    sample_episodes,
)
from .fss_folder import FSSFolder, list_classes, split_classes
from .labelmap import MIN_AREA, LabelMapSource
from .pascal import PASCAL_CLASSES, Pascal5i, pascal_fold_classes
from .transforms import Letterbox, TrainAugment, collate_episodes, normalize

__all__ = [
    "COCO_CLASSES",
    "IGNORE",
    "MIN_AREA",
    "PASCAL_CLASSES",
    "Coco20i",
    "Episode",
    "EpisodeDataset",
    "EpisodeSet",
    "EpisodeSource",
    "EpisodeSpec",
    "FSSFolder",
    "Item",
    "LabelMapSource",
    "Letterbox",
    "Pascal5i",
    "TrainAugment",
    "coco_fold_classes",
    "collate_episodes",
    "eligible_classes",
    "list_classes",
    "make_episodes",
    "normalize",
    "pascal_fold_classes",
    "sample_episodes",
    "split_classes",
]
