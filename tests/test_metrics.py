"""The PFENet/BAM metric protocol on hand-made cases and against an independent reference."""

from __future__ import annotations

import numpy as np
import pytest

from svf_model.metrics import FewShotMeter, episode_counts, trivial_meters


def _case(pred_fg: list[int], target_fg: list[int], n: int = 10, ignore: list[int] = ()) -> tuple:
    """1-D 'images' of ``n`` pixels (as [1, n] arrays) with the given foreground/ignore indices."""
    pred = np.zeros((1, n), bool)
    pred[0, pred_fg] = True
    target = np.zeros((1, n), np.uint8)
    target[0, target_fg] = 1
    target[0, list(ignore)] = 255
    return pred, target


def test_two_classes_known_intersections_and_unions():
    meter = FewShotMeter()
    # class a, episode 1: pred {0,1,2}, target {1,2,3} -> I 2, U 4
    assert meter.update("a", *_case([0, 1, 2], [1, 2, 3])) == pytest.approx(0.5)
    # class a, episode 2: pred = target = {5,6,7} -> I 3, U 3
    assert meter.update("a", *_case([5, 6, 7], [5, 6, 7])) == pytest.approx(1.0)
    # class b: pred {0..4}, target {5..9} -> I 0, U 10
    assert meter.update("b", *_case([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])) == pytest.approx(0.0)
    per_class = meter.per_class()
    assert per_class["a"] == pytest.approx(5 / 7)  # sum I / sum U, not the mean of 0.5 and 1.0
    assert per_class["b"] == pytest.approx(0.0)
    assert meter.miou == pytest.approx((5 / 7 + 0.0) / 2)
    # background: ep1 pred bg {3..9} target bg {0,4..9}: I 6, U 8; ep2 I 7 U 7; ep3 pred bg {5..9}
    # target bg {0..4}: I 0 U 10
    fg = (2 + 3 + 0) / (4 + 3 + 10)
    bg = (6 + 7 + 0) / (8 + 7 + 10)
    assert meter.fbiou == pytest.approx((fg + bg) / 2)
    summary = meter.summary()
    assert summary["miou"] == pytest.approx(100 * meter.miou)
    assert summary["per_class"]["a"] == pytest.approx(100 * 5 / 7)


def test_ignore_pixels_are_excluded():
    # Predicting foreground on ignored pixels costs nothing; so does missing them.
    pred, target = _case([0, 1, 2, 3, 4], [0, 1], ignore=[2, 3, 4, 5])
    c = episode_counts(pred, target)
    assert (c.fg_inter, c.fg_union) == (2, 2)
    assert (c.bg_inter, c.bg_union) == (4, 4)  # valid background pixels 6..9 all predicted background
    assert c.iou == 1.0
    # Without the ignore label the same prediction would be worse.
    pred2, target2 = _case([0, 1, 2, 3, 4], [0, 1])
    assert episode_counts(pred2, target2).iou == pytest.approx(2 / 5)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        episode_counts(np.zeros((4, 4), bool), np.zeros((4, 5), np.uint8))


def _reference_intersection_union(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PFENet's ``intersectionAndUnion`` for 2 classes, re-derived with histograms."""
    output = pred.astype(np.int64).ravel().copy()
    target = target.astype(np.int64).ravel()
    output[target == 255] = 255
    inter = output[output == target]
    area_inter = np.histogram(inter, bins=2, range=(0, 1))[0]
    area_out = np.histogram(output[output != 255], bins=2, range=(0, 1))[0]
    area_tgt = np.histogram(target[target != 255], bins=2, range=(0, 1))[0]
    return area_inter, area_out + area_tgt - area_inter


def test_matches_reference_protocol_on_random_episodes():
    rng = np.random.default_rng(0)
    meter = FewShotMeter()
    inter_c: dict[str, float] = {}
    union_c: dict[str, float] = {}
    inter_all = np.zeros(2)
    union_all = np.zeros(2)
    for i in range(30):
        cls = f"c{i % 4}"
        h, w = rng.integers(5, 40, size=2)
        target = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        target[rng.random((h, w)) < 0.1] = 255
        pred = rng.random((h, w)) < rng.random()
        meter.update(cls, pred, target)
        inter, union = _reference_intersection_union(pred, target)
        inter_c[cls] = inter_c.get(cls, 0) + inter[1]
        union_c[cls] = union_c.get(cls, 0) + union[1]
        inter_all += inter
        union_all += union
    expected_miou = np.mean([inter_c[c] / union_c[c] for c in inter_c])
    assert meter.miou == pytest.approx(expected_miou)
    assert meter.fbiou == pytest.approx(np.mean(inter_all / union_all))
    assert meter.episodes == 30


def test_trivial_floors():
    target = np.zeros((4, 5), np.uint8)
    target[:2, :2] = 1  # 4 foreground pixels
    target[3, :] = 255  # 5 ignored -> 15 valid pixels
    meters = trivial_meters([("x", target), ("y", target)])
    fg, bg = meters["all_foreground"], meters["all_background"]
    assert bg.miou == 0.0
    assert bg.fbiou == pytest.approx((0 + 11 / 15) / 2)
    assert fg.per_class()["x"] == pytest.approx(4 / 15)
    assert fg.fbiou == pytest.approx((4 / 15 + 0) / 2)
