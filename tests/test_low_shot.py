"""Low-shot singular values: a model file may carry a second set of singular values that the
Predictor uses, with the prototype logits, for fewer shots than ``low_shot_below`` and as the fallback
when the supports' cross-check favours them (compose, checkpoint round trip, refusals, switching with
the number of shots on a shared model, the fallback on real photos, adaptation and Reset from them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from svf_model.adapt import AdaptConfig
from svf_model.checkpoint import build_from_meta, load_checkpoint, read_checkpoint, save_checkpoint
from svf_model.compose import compose_checkpoints
from svf_model.delta import set_svf_state
from svf_model.predictor import Predictor
from svf_model.weights import CheckpointError
from tests.helpers import fss_pairs, iou

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
REFINE = CHECKPOINTS / "refine_svf_lite2_fssdev.safetensors"  # head + values trained together, min_shots 2
PROTOTYPE = CHECKPOINTS / "prototype_svf_lite2_fssdev.safetensors"  # values trained for the prototype logits
SIZE = 161
ASSETS = Path(__file__).resolve().parents[1] / "assets"
FAST = AdaptConfig(steps=2, lr=0.05, image_size=129, time_budget_s=None, gate="off")

pytestmark = pytest.mark.usefixtures("one_thread")


def _values(path: Path) -> dict[str, torch.Tensor]:
    """``<layer>.d`` -> singular values stored in a model file (its ``backbone.*`` tensors)."""
    tensors, _ = read_checkpoint(path)
    return {k[len("backbone."):].replace(".sv.", "."): v for k, v in tensors.items() if k.startswith("backbone.")}


@pytest.fixture(scope="module")
def composed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("low_shot") / "dual.safetensors"
    return compose_checkpoints(REFINE, REFINE, out, low_shot=PROTOTYPE)


@pytest.fixture(scope="module")
def horses(fss_dev):
    return fss_pairs(fss_dev, "horse", 4)


def test_compose_stores_the_low_shot_values_and_they_load_back(composed):
    model, meta = load_checkpoint(composed)
    low = model.low_shot_values
    assert low is not None and low.below == 2 == meta["low_shot_below"]  # the head's min_shots
    expected = _values(PROTOTYPE)
    assert low.state.keys() == expected.keys()
    assert all(torch.equal(low.state[k], expected[k]) for k in expected)
    # The model's own values stay those of the refine file, and they differ from the low-shot ones.
    own = _values(REFINE)
    assert all(torch.equal(model.get_parameter(f"backbone.{k.rpartition('.')[0]}.sv.d"), v) for k, v in own.items())
    assert any(not torch.equal(own[k], expected[k]) for k in own)
    # A model without low-shot values saves and loads without them.
    plain, plain_meta = load_checkpoint(REFINE)
    assert plain.low_shot_values is None and "low_shot_below" not in plain_meta


def test_low_shot_values_that_do_not_fit_are_refused(composed, tmp_path):
    meta = {**read_checkpoint(PROTOTYPE)[1], "svf_stages": ["layer3", "layer4"]}
    other = save_checkpoint(build_from_meta(meta), tmp_path / "layer34.safetensors", meta)
    with pytest.raises(CheckpointError, match="do not fit"):
        compose_checkpoints(REFINE, REFINE, tmp_path / "bad.safetensors", low_shot=other)
    with pytest.raises(CheckpointError, match="low_shot_below >= 2"):
        compose_checkpoints(REFINE, REFINE, tmp_path / "bad.safetensors", low_shot=PROTOTYPE, low_shot_below=1)
    # A changed byte in the low-shot values is caught by the file's checksum.
    data = bytearray(composed.read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    start = next(v["data_offsets"][0] for k, v in header.items() if k.startswith("low_shot."))
    data[8 + size + start] ^= 0xFF
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tampered)


def test_predictor_uses_the_low_shot_values_below_their_shot_count(composed, horses):
    dual, _ = load_checkpoint(composed)
    refine, _ = load_checkpoint(REFINE)
    manual, _ = load_checkpoint(REFINE)
    set_svf_state(manual.backbone, dual.low_shot_values.state)
    query = horses[3][0]
    shots = [horses[0], horses[1]]

    def prob(model, k: int, predictor: Predictor | None = None) -> np.ndarray:
        p = predictor or Predictor(model, image_size=SIZE, device="cpu")
        p.set_supports([im for im, _ in shots[:k]], [m for _, m in shots[:k]])
        return p.predict(query).prob

    one_low, two_own = prob(manual, 1), prob(refine, 2)
    assert not np.allclose(prob(refine, 1), one_low, atol=1e-3)  # the two value sets really differ
    switching = Predictor(dual, image_size=SIZE, device="cpu")
    other = Predictor(dual, image_size=SIZE, device="cpu")  # shares the model, loads its own values
    for _ in range(2):
        np.testing.assert_allclose(prob(dual, 1, switching), one_low, atol=1e-5)
        np.testing.assert_allclose(prob(dual, 2, other), two_own, atol=1e-5)
        np.testing.assert_allclose(prob(dual, 2, switching), two_own, atol=1e-5)
        np.testing.assert_allclose(prob(dual, 1, other), one_low, atol=1e-5)


def test_one_shot_adaptation_starts_from_the_low_shot_values_and_reset_restores_them(composed, horses):
    model, _ = load_checkpoint(composed)
    model.adapt_modules = ["layer4.1"]
    p = Predictor(model, image_size=SIZE, device="cpu")
    p.set_supports([horses[0][0]], [horses[0][1]])
    before = p.predict(horses[3][0]).prob
    low = model.low_shot_values.state
    assert all(torch.equal(p.base_values()[k], low[k]) for k in low)
    result = p.adapt(FAST)
    assert result.steps == 2 and p.adapted
    base, adapted = p.base_values(), p.svf_values()
    assert all(torch.equal(base[k], low[k]) for k in low)  # what the cue panel compares with
    moved = [k for k in adapted if not torch.equal(adapted[k], base[k])]
    assert moved and all(k.startswith("layer4.1.") for k in moved)
    p.reset()
    np.testing.assert_array_equal(p.predict(horses[3][0]).prob, before)


def _asset(name: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    image = np.asarray(Image.open(ASSETS / "photos" / name).convert("RGB"))
    return image, np.asarray(Image.open(ASSETS / "masks" / f"{Path(name).stem}.png")) > 127


def test_fallback_to_the_low_shot_values_when_the_supports_cross_check_favours_them(tmp_path):
    """Portraits (the app's example photos): the learned refinement under-segments these people, and
    the cross-check on the two supports says so, so the predictor falls back to the prototype logits
    with the low-shot values - exactly ``prototype-svf-lite2``'s prediction, and a much better one."""
    size = 321  # the refinement runs from 257 px on
    supports = [_asset("grace_hopper.jpg"), _asset("camera.png")]
    query, truth = _asset("astronaut.jpg")
    with_fallback = compose_checkpoints(REFINE, REFINE, tmp_path / "fallback.safetensors", low_shot=PROTOTYPE,
                                        low_shot_fallback_margin=0.1)
    never = compose_checkpoints(REFINE, REFINE, tmp_path / "never.safetensors", low_shot=PROTOTYPE,
                                low_shot_fallback_margin=1.0)
    results = {}
    for name, path in (("fallback", with_fallback), ("never", never), ("refine", REFINE), ("prototype", PROTOTYPE)):
        model, _ = load_checkpoint(path)
        p = Predictor(model, image_size=size, device="cpu")
        p.set_supports([im for im, _ in supports], [m for _, m in supports])
        results[name] = (p, p.predict(query).prob)
    fallback, never_p = results["fallback"][0], results["never"][0]
    assert fallback.model.low_shot_values.fallback_margin == 0.1
    own, plain = fallback.fallback_scores
    assert plain > own + 0.1 and fallback.uses_low_shot_values
    assert never_p.fallback_scores == pytest.approx((own, plain)) and not never_p.uses_low_shot_values
    np.testing.assert_allclose(results["fallback"][1], results["prototype"][1], atol=1e-5)
    np.testing.assert_allclose(results["never"][1], results["refine"][1], atol=1e-5)
    assert iou(results["fallback"][1] > 0.5, truth) > iou(results["refine"][1] > 0.5, truth) + 0.15

    # The check and the encoding share the backbone's work: each shot runs the blocks before the
    # first SVF block once, and the SVF blocks once per value set.
    model, _ = load_checkpoint(with_fallback)
    with model.backbone.memoize() as memo:
        Predictor(model, image_size=size, device="cpu").set_supports([im for im, _ in supports],
                                                                     [m for _, m in supports])
    assert (memo.misses, memo.resumed) == (2, 2) and memo.hits > 0

    # Adapting from the fallback starts from the low-shot values and keeps the prototype logits.
    low = fallback.model.low_shot_values.state
    fallback.adapt(FAST)
    assert fallback.adapted and fallback.uses_low_shot_values
    assert all(torch.equal(fallback.base_values()[k], low[k]) for k in low)
    fallback.reset()
    np.testing.assert_array_equal(fallback.predict(query).prob, results["fallback"][1])

    # Up to low_shot_fallback_up_to shots only: with 3 supports the check does not run.
    limited = compose_checkpoints(REFINE, REFINE, tmp_path / "limited.safetensors", low_shot=PROTOTYPE,
                                  low_shot_fallback_margin=0.1, low_shot_fallback_up_to=2)
    model, meta = load_checkpoint(limited)
    assert meta["low_shot_fallback_up_to"] == 2 == model.low_shot_values.fallback_up_to
    p = Predictor(model, image_size=size, device="cpu")
    p.set_supports([im for im, _ in supports], [m for _, m in supports])
    assert p.uses_low_shot_values and p.fallback_scores == pytest.approx((own, plain))
    three = [*supports, (query, truth)]
    p.set_supports([im for im, _ in three], [m for _, m in three])
    assert p.fallback_scores is None and not p.uses_low_shot_values

    with pytest.raises(CheckpointError, match="fallback_margin"):
        compose_checkpoints(REFINE, REFINE, tmp_path / "bad.safetensors", low_shot=PROTOTYPE,
                            low_shot_fallback_margin=1.5)
    with pytest.raises(CheckpointError, match="fallback_up_to"):
        compose_checkpoints(REFINE, REFINE, tmp_path / "bad.safetensors", low_shot=PROTOTYPE,
                            low_shot_fallback_margin=0.1, low_shot_fallback_up_to=1)
