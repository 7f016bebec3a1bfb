"""The backbone's feature memo gives the plain forward's results, never stale ones, and skips work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svf_model import apply_svf, build_backbone
from svf_model.data.episodes import make_episodes
from svf_model.data.fss_folder import FSSFolder
from svf_model.delta import set_svf_state, svf_state
from svf_model.evaluate import evaluate
from svf_model.heads import build_head
from svf_model.model import FewShotSegmenter
from svf_model.predictor import Predictor
from svf_model.svf import svf_layers
from tests.helpers import fss_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def svf_lite2():
    backbone = build_backbone("efficientnet_lite2").eval()
    apply_svf(backbone.layer4, parametrization="exp")
    backbone.requires_grad_(False)  # as loaded for inference: nothing trains
    return backbone


@pytest.fixture(scope="module")
def photos(fss_dev):
    """Three real letterbox-free crops ``[3, 3, 97, 97]`` normalised like the backbone wants."""
    pairs = fss_pairs(fss_dev, "horse", 3)
    x = torch.stack([torch.from_numpy(img[:97, :97].copy()).permute(2, 0, 1).float() / 255 for img, _ in pairs])
    return (x - 0.5) / 0.5


def last_block_layer(backbone):
    return next(m for n, m in svf_layers(backbone) if n.startswith("layer4.1"))


def assert_same_features(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


def test_memo_matches_plain_forward_and_serves_repeated_images(svf_lite2, photos):
    with torch.no_grad():
        plain = svf_lite2(photos)
        with svf_lite2.memoize() as memo:
            first = svf_lite2(photos)
            assert (memo.hits, memo.misses) == (0, 3)
            again = svf_lite2(photos[[2, 0]])  # a new batch of images seen before
            assert (memo.hits, memo.misses) == (2, 3)
    assert_same_features(first, plain)
    assert_same_features(again, {k: v[[2, 0]] for k, v in plain.items()})
    assert svf_lite2._memo is None  # the memo ends with its context


def test_changed_weights_are_never_served_stale(svf_lite2, photos):
    """Changed singular values re-run the blocks from the first SVF block on (the memo's anchor);
    a changed weight before it re-runs everything. Either way the result is the plain forward's."""
    layer = last_block_layer(svf_lite2)
    early = svf_lite2.layer1[0]  # a plain block before the anchor
    early_weight = next(early.parameters())
    saved = layer.sv.trainable.detach().clone(), early_weight.detach().clone()
    try:
        with torch.no_grad(), svf_lite2.memoize() as memo:
            svf_lite2(photos)
            layer.sv.trainable.add_(0.3)  # in place, like an optimiser step or set_svf_state
            changed = svf_lite2(photos)
            assert (memo.misses, memo.resumed, memo.hits) == (3, 3, 0)
            assert_same_features(changed, _plain(svf_lite2, photos))
            early_weight.mul_(1.1)
            changed_early = svf_lite2(photos)
            assert (memo.misses, memo.resumed) == (6, 3)
        assert_same_features(changed_early, _plain(svf_lite2, photos))
    finally:
        with torch.no_grad():
            layer.sv.trainable.copy_(saved[0])
            early_weight.copy_(saved[1])


def _plain(backbone, x):
    """The backbone's forward without any memo."""
    memo, backbone._memo = backbone._memo, None
    try:
        with torch.no_grad():
            return backbone(x)
    finally:
        backbone._memo = memo


def test_switching_value_sets_shares_the_frozen_prefix(svf_lite2, photos):
    """Two sets of singular values in turn (as the 2-shot fallback check, Adapt and Reset do): the
    blocks before the first SVF block run once per image, values seen before are served again, and
    the stage outputs shared by the stored cuts are counted once."""
    own = svf_state(svf_lite2)
    other = {k: v + 0.1 for k, v in own.items()}
    try:
        with torch.no_grad(), svf_lite2.memoize() as memo:
            first = svf_lite2(photos[:1])
            one_image = memo.bytes
            for state in (other, own, other):
                set_svf_state(svf_lite2, state)
                svf_lite2(photos[:1])
            assert (memo.misses, memo.resumed, memo.hits) == (1, 1, 2)
            assert len(memo) == 3  # the anchor's entry and one per set of values
            assert memo.bytes == one_image + first["layer4"].numel() * 4  # only a new layer4 output
            set_svf_state(svf_lite2, own)
            assert_same_features(svf_lite2(photos[:1]), first)
    finally:
        set_svf_state(svf_lite2, own)


def test_adaptation_prefix_is_reused_after_the_last_block_changes(svf_lite2, photos):
    """Training the last block stores the frozen prefix; after the step, a no-grad forward resumes
    from it (only the last block runs) and equals the plain forward; gradients equal plain ones."""
    layer = last_block_layer(svf_lite2)
    saved = layer.sv.trainable.detach().clone()
    try:
        layer.sv.trainable.requires_grad_(True)
        svf_lite2(photos)["layer4"].square().mean().backward()
        plain_grad = layer.sv.trainable.grad.clone()
        layer.sv.trainable.grad = None
        with svf_lite2.memoize() as memo:
            svf_lite2(photos)["layer4"].square().mean().backward()
            torch.testing.assert_close(layer.sv.trainable.grad, plain_grad, rtol=1e-4, atol=1e-7)
            layer.sv.trainable.requires_grad_(False)
            with torch.no_grad():
                layer.sv.trainable.sub_(0.2 * layer.sv.trainable.grad.sign())
                after = svf_lite2(photos)
            assert memo.resumed == 3 and memo.misses == 3
        with torch.no_grad():
            assert_same_features(after, svf_lite2(photos))
    finally:
        layer.sv.trainable.requires_grad_(False)
        layer.sv.trainable.grad = None
        with torch.no_grad():
            layer.sv.trainable.copy_(saved)


def test_memo_stays_within_its_budget(svf_lite2, photos):
    with torch.no_grad(), svf_lite2.memoize() as memo:
        svf_lite2(photos[:1])
        one_image = memo.bytes
    budget = int(2.5 * one_image)
    with torch.no_grad(), svf_lite2.memoize(max_bytes=budget) as memo:
        for i in range(3):
            svf_lite2(photos[i : i + 1])
        assert memo.bytes <= budget and len(memo) == 4  # the oldest image was evicted (2 cuts each)
        svf_lite2(photos[2:3])
        assert memo.hits == 1  # the newest one is still there
        svf_lite2(photos[0:1])
        assert memo.misses == 4


def test_evaluation_with_and_without_memo_scores_the_same(fss_dev):
    backbone = build_backbone("efficientnet_lite2").eval()
    model = FewShotSegmenter(backbone, build_head("prototype", backbone))
    episodes = make_episodes(FSSFolder(fss_dev, ["video_cows"]), 6, 2, seed=3)  # 13 photos: reuse
    runs = []
    for memo_bytes in (0, 1 << 30):
        predictor = Predictor(model, image_size=129, device="cpu")
        runs.append(evaluate(predictor, episodes, progress=False, memo_bytes=memo_bytes))
    assert backbone._memo is None
    np.testing.assert_allclose([e["iou"] for e in runs[0]["episodes"]],
                               [e["iou"] for e in runs[1]["episodes"]], atol=1e-4)
    assert len({p for e in runs[0]["episodes"] for p in (*e["supports"], e["query"])}) < 18


def test_cue_maps_see_their_layer_even_when_the_image_is_memoised(svf_lite2, photos):
    from svf_model.cues import cue_maps

    name = next(n for n, _ in svf_lite2.named_modules() if n.startswith("layer4.0") and n.endswith("conv_pw"))
    plain = cue_maps(svf_lite2, name, photos[:1], [0, 1, 2], (97, 97))
    with torch.no_grad(), svf_lite2.memoize() as memo:
        svf_lite2(photos[:1])
        memoised = cue_maps(svf_lite2, name, photos[:1], [0, 1, 2], (97, 97))
        assert memo.hits == 1  # served up to the hooked block, which ran for real
    np.testing.assert_allclose(memoised, plain, atol=1e-6)
