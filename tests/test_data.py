"""Data sources, seeded episodes, joint augmentation and the training collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from svf_model.data import (
    COCO_CLASSES,
    PASCAL_CLASSES,
    Coco20i,
    EpisodeDataset,
    FSSFolder,
    Letterbox,
    Pascal5i,
    TrainAugment,
    coco_fold_classes,
    collate_episodes,
    list_classes,
    make_episodes,
    pascal_fold_classes,
    sample_episodes,
    split_classes,
)

CLASSES = ["horse", "street_car", "clothing_hat", "video_dog", "street_sky"]


# ---------------------------------------------------------------------------------------------
# fss-dev


def test_fss_folder_classes_and_items(fss_dev):
    import json

    classes = list_classes(fss_dev)
    counts = json.loads((fss_dev / "classes.json").read_text())
    assert classes == list(counts)
    src = FSSFolder(fss_dev, CLASSES)
    for c in CLASSES:
        items = src.items(c)
        assert len(items) == counts[c]
        assert all(it.image.parent.name == c and it.image.stem == it.label.stem for it in items)


def test_episodes_deterministic_per_seed(fss_dev):
    a = sample_episodes(FSSFolder(fss_dev, CLASSES), 12, 2, seed=7)
    b = sample_episodes(FSSFolder(fss_dev, CLASSES), 12, 2, seed=7)
    c = sample_episodes(FSSFolder(fss_dev, CLASSES), 12, 2, seed=8)
    assert a == b
    assert a != c
    # Torch's global RNG plays no part.
    torch.manual_seed(123)
    assert sample_episodes(FSSFolder(fss_dev, CLASSES), 12, 2, seed=7) == a
    for spec in a:
        assert spec.query not in spec.supports
        assert len(set(spec.supports)) == 2
        assert all(it.image.parent.name == spec.class_name for it in (*spec.supports, spec.query))


def test_balanced_sampling_gives_each_class_its_share(fss_dev):
    specs = sample_episodes(FSSFolder(fss_dev, CLASSES), 3 * len(CLASSES), 1, seed=0, mode="balanced")
    names = [s.class_name for s in specs]
    assert sorted(set(names)) == sorted(CLASSES)
    assert all(names.count(c) == 3 for c in CLASSES)


def test_loaded_episodes_have_binary_masks(fss_dev):
    episodes = make_episodes(FSSFolder(fss_dev, CLASSES), 4, 2, seed=1)
    for i in range(len(episodes)):
        ep = episodes[i]
        assert ep.shots == 2 and len(ep.support_paths) == 2
        for img, msk in [*zip(ep.supports, ep.support_masks, strict=True), (ep.query, ep.query_mask)]:
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
            assert msk.dtype == np.uint8 and msk.shape == img.shape[:2]
            assert set(np.unique(msk)) <= {0, 1}
            assert 0 < msk.mean() < 1  # real objects: neither empty nor full
        # The query mask is the class's png thresholded.
        raw = np.asarray(Image.open(episodes.specs[i].query.label))
        assert np.array_equal(ep.query_mask, (raw > 127).astype(np.uint8))
    again = make_episodes(FSSFolder(fss_dev, CLASSES), 4, 2, seed=1)[3]
    assert np.array_equal(again.query, episodes[3].query)
    tail = episodes[2:]  # a slice is an episode set of its own, loaded on access
    assert len(tail) == 2 and tail.specs == episodes.specs[2:]
    assert np.array_equal(tail[1].query, episodes[3].query)
    assert list(tail) and [e.query_path for e in tail] == [episodes[i].query_path for i in (2, 3)]


def test_split_classes_seeded_and_disjoint(fss_dev):
    classes = list_classes(fss_dev)
    train, val = split_classes(classes, 0.2, seed=3)
    assert (train, val) == split_classes(classes, 0.2, seed=3)
    assert split_classes(classes, 0.2, seed=4)[1] != val
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(classes)
    assert len(val) == round(0.2 * len(classes))


# ---------------------------------------------------------------------------------------------
# augmentation and collate


def _striped_image(h: int = 90, w: int = 130) -> tuple[np.ndarray, np.ndarray]:
    """Photo-like test image whose mask is a function of its pixels: mask = red channel high."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    fg = ((xx // 13 + yy // 11) % 3 == 0) | ((xx - 60) ** 2 + (yy - 40) ** 2 < 300)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.where(fg, 230, 20)
    img[..., 1] = rng.integers(0, 255, (h, w))
    img[..., 2] = np.where(fg, 30, 200)
    return img, fg.astype(np.uint8)


def _agreement(image: torch.Tensor, mask: torch.Tensor, erode: int = 0) -> tuple[float, float]:
    """Share of mask-foreground pixels that are red and of mask-background pixels that are blue,
    optionally only on pixels ``erode`` pixels away from a mask edge."""
    import torch.nn.functional as F

    red, blue = image[0].int(), image[2].int()
    fg, bg = mask == 1, mask == 0
    if erode:
        k = 2 * erode + 1
        fg = -F.max_pool2d(-fg.float()[None, None], k, 1, erode)[0, 0] > 0
        bg = -F.max_pool2d(-bg.float()[None, None], k, 1, erode)[0, 0] > 0
    return float(((red > blue) & fg).sum() / fg.sum()), float(((blue > red) & bg).sum() / bg.sum())


def test_augmentation_keeps_image_and_mask_aligned():
    img, mask = _striped_image()
    aug = TrainAugment(97, mean=(0.5, 0.5, 0.5))
    fill = round(0.5 * 255)
    changed = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out_img, out_mask = aug(img, mask)
        assert out_img.shape == (3, 97, 97) and out_img.dtype == torch.uint8
        assert out_mask.shape == (97, 97) and out_mask.dtype == torch.uint8
        assert set(out_mask.unique().tolist()) <= {0, 1, 255}
        assert (out_mask == 1).sum() > 100 and (out_mask == 0).sum() > 100
        # Labels follow the pixels: red where the mask says object, blue where it says background.
        # Resampling blurs edges (bilinear image, nearest mask), so away from edges it must be exact.
        assert min(_agreement(out_img, out_mask)) > 0.93
        assert min(_agreement(out_img, out_mask, erode=1)) > 0.998
        # The check has teeth: a mask shifted by 3 pixels fails it.
        assert min(_agreement(out_img, torch.roll(out_mask, 3, dims=1), erode=1)) < 0.9
        # Padding is ignore in the mask and the mean colour in the image.
        ign = out_mask == 255
        if ign.any():
            assert (out_img[:, ign] == fill).float().mean() > 0.95
        ref_img, _ = Letterbox(97)(img, mask)
        changed += not torch.equal(out_img, ref_img)
    assert changed >= 10  # the augmentation really changes the geometry


def test_augmentation_on_real_photo_with_derived_mask(fss_dev):
    path = sorted((fss_dev / "horse").glob("*.jpg"))[0]
    img = np.asarray(Image.open(path).convert("RGB"))
    mask = (img.mean(2) > np.median(img.mean(2))).astype(np.uint8)
    aug = TrainAugment(129, mean=(0.5, 0.5, 0.5), color_jitter=0.0)
    torch.manual_seed(0)
    out_img, out_mask = aug(img, mask)
    grey = out_img.float().mean(0)
    threshold = np.median(img.mean(2))
    fg, bg = out_mask == 1, out_mask == 0
    assert (grey[fg] > threshold - 8).float().mean() > 0.9
    assert (grey[bg] <= threshold + 8).float().mean() > 0.9


def test_episode_dataset_reproducible_and_collated(fss_dev):
    src = FSSFolder(fss_dev, CLASSES)
    ds = EpisodeDataset(src, 2, 6, TrainAugment(65, color_jitter=0.2), seed=5)
    first = ds[3]
    torch.manual_seed(99)  # global RNG state must not matter
    again = EpisodeDataset(FSSFolder(fss_dev, CLASSES), 2, 6, TrainAugment(65, color_jitter=0.2), seed=5)[3]
    assert torch.equal(first["query"], again["query"]) and torch.equal(first["support_masks"], again["support_masks"])
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["query"], first["query"]) or ds[3]["query_path"] != first["query_path"]

    batch = collate_episodes([first, again], size=65, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert batch["query"].shape == (2, 3, 65, 65) and batch["query"].dtype == torch.float32
    assert batch["supports"].shape == (2, 2, 3, 65, 65)
    assert batch["support_masks"].shape == (2, 2, 65, 65) and batch["support_masks"].dtype == torch.float32
    assert batch["query_mask"].shape == (2, 65, 65) and batch["query_mask"].dtype == torch.int64
    assert batch["query"].min() >= -1.0 and batch["query"].max() <= 1.0
    expected = (first["query"].float() / 255 - 0.5) / 0.5
    assert torch.allclose(batch["query"][0], expected)
    assert batch["class_names"][0] in CLASSES


def test_collate_resizes_items_of_other_sizes():
    img, mask = _striped_image(40, 80)
    item = {"query": torch.from_numpy(img).permute(2, 0, 1), "query_mask": torch.from_numpy(mask),
            "supports": [torch.from_numpy(img).permute(2, 0, 1)], "support_masks": [torch.from_numpy(mask)],
            "class_name": "x", "query_path": "q", "support_paths": ["s"]}
    batch = collate_episodes([item], size=32)
    assert batch["query"].shape == (1, 3, 32, 32)
    qm = batch["query_mask"][0]
    assert (qm[16:] == 255).all()  # 40x80 -> 16x32 content, the rest padding = ignore
    assert set(qm[:16].unique().tolist()) <= {0, 1}


# ---------------------------------------------------------------------------------------------
# PASCAL-5i / COCO-20i on synthetic folders


def _write_pair(root, image_rel: str, label_rel: str, label: np.ndarray) -> None:
    rng = np.random.default_rng(label.sum() % 1000)
    (root / image_rel).parent.mkdir(parents=True, exist_ok=True)
    (root / label_rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (*label.shape, 3), dtype=np.uint8)).save(root / image_rel)
    Image.fromarray(label).save(root / label_rel)


def _label(*objects: tuple[int, int], size: int = 100, border: bool = True) -> np.ndarray:
    """Label map with one square object per ``(class id, side)``, plus a 255 border around each."""
    label = np.zeros((size, size), np.uint8)
    x = 0
    for cid, side in objects:
        if border:
            label[0:side + 2, x:x + side + 2] = 255
        label[1:side + 1, x + 1:x + side + 1] = cid
        x += side + 3
    return label


@pytest.fixture()
def voc(tmp_path):
    """Synthetic VOC2012 + SBD layout with PFENet/BAM list files."""
    root = tmp_path / "VOC2012"
    pairs = {
        "2008_000001": _label((1, 50)),             # aeroplane (fold 0 novel)
        "2008_000002": _label((1, 48), (7, 30)),    # aeroplane + car
        "2008_000003": _label((2, 60)),             # bicycle (novel)
        "2008_000004": _label((2, 55), (15, 12)),   # bicycle + a small person (144 px < 2048)
        "2008_000005": _label((7, 50)),             # car (base)
        "2008_000006": _label((7, 46), (15, 50)),   # car + person
        "2008_000007": _label((15, 60)),            # person
        "2008_000008": _label((7, 52), (3, 8)),     # car + a tiny bird (novel, 64 px)
        "2008_000009": _label((15, 49), (7, 47)),   # person + car
    }
    lines = []
    for stem, label in pairs.items():
        _write_pair(root, f"JPEGImages/{stem}.jpg", f"SegmentationClassAug/{stem}.png", label)
        lines.append(f"JPEGImages/{stem}.jpg SegmentationClassAug/{stem}.png")
    (root / "lists" / "pascal").mkdir(parents=True)
    (root / "lists" / "pascal" / "train.txt").write_text("\n".join(lines[4:]) + "\n")
    (root / "lists" / "pascal" / "val.txt").write_text("\n".join(lines[:4]) + "\n")
    return root


def test_pascal_folds():
    assert pascal_fold_classes(0) == [1, 2, 3, 4, 5]
    assert pascal_fold_classes(3) == [16, 17, 18, 19, 20]
    assert sorted(c for f in range(4) for c in pascal_fold_classes(f)) == list(range(1, 21))
    assert PASCAL_CLASSES[0] == "aeroplane" and PASCAL_CLASSES[19] == "tvmonitor"


def test_pascal_val_split_masks_and_area_filter(voc):
    val = Pascal5i(voc, fold=0, split="val", index_cache=voc / "index.json")
    assert val.classes == ["aeroplane", "bicycle", "bird", "boat", "bottle"]
    assert [it.image.stem for it in val.items("aeroplane")] == ["2008_000001", "2008_000002"]
    assert [it.image.stem for it in val.items("bicycle")] == ["2008_000003", "2008_000004"]
    assert val.items("bird") == []  # only in a training image
    item = val.items("aeroplane")[1]
    label = np.asarray(Image.open(item.label))
    mask = val.load_mask(item, "aeroplane")
    assert np.array_equal(mask == 1, label == 1)
    assert np.array_equal(mask == 255, label == 255)
    assert ((mask == 0) == ((label != 1) & (label != 255))).all()
    assert (mask[label == 7] == 0).all()  # the car is background for aeroplane
    assert (voc / "index.json").is_file()
    # Episodes in PFENet's image mode: the query's class is in its image.
    episodes = make_episodes(val, 4, 1, seed=0)
    for i, spec in enumerate(episodes.specs):
        assert spec.query in val.items(spec.class_name)
        assert set(np.unique(episodes[i].query_mask)) <= {0, 1, 255}


def test_pascal_train_split_drops_images_with_novel_classes(voc):
    bam = Pascal5i(voc, fold=0, split="train", exclude_novel=True)
    pfenet = Pascal5i(voc, fold=0, split="train", exclude_novel=False)
    assert "aeroplane" not in bam.classes and "car" in bam.classes and len(bam.classes) == 15
    assert [it.image.stem for it in pfenet.items("car")] == ["2008_000005", "2008_000006", "2008_000008",
                                                             "2008_000009"]
    # 2008_000008 shows a (tiny) bird, a novel class of fold 0: BAM drops it.
    assert [it.image.stem for it in bam.items("car")] == ["2008_000005", "2008_000006", "2008_000009"]
    assert bam.dropped == 1
    # Training episodes in PFENet's image mode: queries in turn, the class one present in the image.
    ds = EpisodeDataset(bam, 1, 4, Letterbox(33), seed=0, mode="image")
    for i in range(4):
        spec = ds.spec(i)
        assert spec.query in bam.items(spec.class_name) and spec.query not in spec.supports
        item = ds[i]
        assert item["query_mask"].shape == (33, 33) and set(item["query_mask"].unique().tolist()) <= {0, 1, 255}


def test_coco_class_splits():
    inter = [coco_fold_classes(f, "interleaved") for f in range(4)]
    contig = [coco_fold_classes(f, "contiguous") for f in range(4)]
    assert inter[0][:3] == [1, 5, 9] and inter[3][-1] == 80
    assert contig[1] == list(range(21, 41))
    for split in (inter, contig):
        assert sorted(c for fold in split for c in fold) == list(range(1, 81))
    assert len(COCO_CLASSES) == 80 and COCO_CLASSES[0] == "person" and COCO_CLASSES[-1] == "toothbrush"


def test_coco_synthetic_layout(tmp_path):
    root = tmp_path / "coco"
    for i, objects in enumerate([((1, 60),), ((5, 50), (2, 50)), ((1, 55), (5, 46)), ((2, 70),)]):
        name = f"COCO_val2014_{i:012d}"
        _write_pair(root / "COCO2014", f"val2014/{name}.jpg", f"annotations/val2014/{name}.png",
                    _label(*objects, size=130))
    inter = Coco20i(root, fold=0, split="val", class_split="interleaved")
    assert inter.classes[:2] == ["person", "airplane"]  # ids 1 and 5
    assert len(inter.items("person")) == 2 and len(inter.items("airplane")) == 2
    contig = Coco20i(root, fold=0, split="val", class_split="contiguous")
    assert len(contig.items("bicycle")) == 2  # id 2 is novel in contiguous fold 0 only
    assert "bicycle" not in inter.classes
    ep = make_episodes(inter, 2, 1, seed=0)[0]
    assert ep.class_name in ("person", "airplane") and set(np.unique(ep.query_mask)) <= {0, 1, 255}
