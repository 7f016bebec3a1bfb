"""Predictor on real fss-dev photos: shapes, original sizes, determinism, caching, bad inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from svf_model.imageio import InputError
from svf_model.predictor import Predictor
from tests.helpers import fss_pairs, iou, prototype_svf_model

SIZE = 193


@pytest.fixture(scope="module")
def model(lite2):
    return prototype_svf_model(lite2)


@pytest.fixture(scope="module")
def horses(fss_dev):
    return fss_pairs(fss_dev, "horse", 6)


def test_prediction_at_original_size_and_better_than_floors(model, horses):
    pred = Predictor(model, image_size=SIZE)
    pred.set_supports([horses[0][0]], [horses[0][1]])
    ious, floors = [], []
    for img, gt in horses[1:]:
        out = pred.predict(img)
        assert out.mask.shape == gt.shape == out.prob.shape
        assert out.mask.dtype == bool and out.prob.dtype == np.float32
        assert 0.0 <= out.prob.min() <= out.prob.max() <= 1.0
        ious.append(iou(out.mask, gt))
        floors.append(iou(np.ones_like(gt), gt))
    assert np.mean(ious) > np.mean(floors) + 0.1, (ious, floors)


def test_deterministic_and_cached_supports_match_uncached(model, horses):
    a = Predictor(model, image_size=SIZE)
    a.set_supports([h[0] for h in horses[:2]], [h[1] for h in horses[:2]])
    first = a.predict(horses[3][0]).prob
    again = a.predict(horses[3][0]).prob
    np.testing.assert_array_equal(first, again)
    # The same episode through the model's one-shot forward (no cache) gives the same logits.
    b = Predictor(model, image_size=SIZE)
    b.set_supports([h[0] for h in horses[:2]], [h[1] for h in horses[:2]])
    b._cache = None
    np.testing.assert_allclose(b.predict(horses[3][0]).prob, first, atol=1e-5)


def test_flip_averages_the_query_and_its_mirror_and_is_mirror_equivariant(model, horses):
    plain = Predictor(model, image_size=SIZE)
    flip = Predictor(model, image_size=SIZE, flip=True)
    for p in (plain, flip):
        p.set_supports([horses[0][0]], [horses[0][1]])
    query = horses[2][0]
    mirrored = np.ascontiguousarray(query[:, ::-1])
    out = flip.predict(query)
    assert out.prob.shape == query.shape[:2] and out.prob.dtype == np.float32
    expected = (plain.predict(query).prob + plain.predict(mirrored).prob[:, ::-1]) / 2
    np.testing.assert_allclose(out.prob, expected, atol=1e-6)
    np.testing.assert_array_equal(out.mask, out.prob > 0.5)
    assert not np.array_equal(out.prob, plain.predict(query).prob)
    # Segmenting the mirrored photo gives exactly the mirrored result.
    np.testing.assert_array_equal(flip.predict(mirrored).prob, out.prob[:, ::-1])


def test_grey_rgba_and_16bit_queries_work(model, horses):
    pred = Predictor(model, image_size=SIZE)
    pred.set_supports([horses[0][0]], [horses[0][1]])
    img = horses[1][0]
    grey = img.mean(axis=2).astype(np.uint8)
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=2)
    sixteen = img.astype(np.uint16) * 257
    base = pred.predict(img).mask
    assert pred.predict(grey).mask.shape == base.shape
    np.testing.assert_array_equal(pred.predict(rgba).mask, base)
    assert iou(pred.predict(sixteen).mask, base) > 0.95


@pytest.mark.parametrize(
    "masks, message",
    [
        (lambda m: np.zeros_like(m), "empty"),
        (lambda m: np.ones_like(m), "whole image"),
        (lambda m: m[:-5], "same size"),
    ],
)
def test_bad_masks_are_clear_errors(model, horses, masks, message):
    pred = Predictor(model, image_size=SIZE)
    with pytest.raises(InputError, match=message):
        pred.set_supports([horses[0][0]], [masks(horses[0][1])])


def test_shot_limits_and_missing_supports(model, horses):
    pred = Predictor(model, image_size=SIZE, max_shots=2)
    with pytest.raises(InputError, match="no support"):
        pred.predict(horses[0][0])
    with pytest.raises(InputError, match="at most 2"):
        pred.set_supports([h[0] for h in horses[:3]], [h[1] for h in horses[:3]])
    with pytest.raises(InputError, match="at least one"):
        pred.set_supports([], [])


def test_corrupt_file_is_clear_error(model, horses, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    pred = Predictor(model, image_size=SIZE)
    pred.set_supports([horses[0][0]], [horses[0][1]])
    with pytest.raises(InputError, match="not a readable image"):
        pred.predict(bad)


def test_bf16_autocast_close_to_fp32(model, horses):
    fp32 = Predictor(model, image_size=SIZE)
    bf16 = Predictor(model, image_size=SIZE, precision="bf16")
    for p in (fp32, bf16):
        p.set_supports([horses[0][0]], [horses[0][1]])
    a, b = fp32.predict(horses[2][0]), bf16.predict(horses[2][0])
    assert iou(a.mask, b.mask) > 0.9
    assert torch.get_autocast_dtype("cpu") is not None


def test_a_model_used_by_a_predictor_can_still_be_deep_copied(model):
    """Predictors share a lock per model; it lives beside the model, so copying the model (as the
    comparison studies do) keeps working, and the copy gets a lock of its own."""

    from svf_model.predictor import _shared_lock

    Predictor(model, image_size=SIZE)
    twin = copy.deepcopy(model)
    assert _shared_lock(twin) is not _shared_lock(model)
    assert _shared_lock(model) is _shared_lock(model)
