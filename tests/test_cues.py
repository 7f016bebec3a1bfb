"""Cue analysis: changes sorted, top-k sorted, cue maps at the image size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svf_model.adapt import AdaptConfig
from svf_model.cue_report import cue_report, layer_changes
from svf_model.cues import cue_maps, singular_value_changes
from svf_model.predictor import Predictor
from svf_model.preprocess import fitted_size, letterbox_image
from tests.helpers import fss_pairs, prototype_svf_model


@pytest.fixture(scope="module")
def adapted(lite2, fss_dev):
    shots = fss_pairs(fss_dev, "horse", 4)
    p = Predictor(prototype_svf_model(lite2), image_size=161)
    p.set_supports([s[0] for s in shots[:3]], [s[1] for s in shots[:3]])
    p.adapt(AdaptConfig(steps=3, lr=0.05, image_size=129, time_budget_s=None, gate="off"))
    return p, shots


def test_changes_sorted_and_topk_sorted(adapted):
    p, _ = adapted
    changes = singular_value_changes(p.model.backbone, p.base_values(), p.svf_values())
    assert len(changes) == 2 and changes[0].score >= changes[1].score > 0
    layer = changes[0]
    assert layer.label.startswith("layer4.1.0.conv_p") and layer.label.endswith("(1x1)")
    rising, falling = layer.top(8, rising=True), layer.top(8, rising=False)
    assert [c for _, c in rising] == sorted((c for _, c in rising), reverse=True) and rising[0][1] > 0
    assert [c for _, c in falling] == sorted(c for _, c in falling) and falling[0][1] < 0
    np.testing.assert_allclose(layer.relative, (layer.after - layer.before) / layer.before)
    bars = layer.bar_chart(30)
    assert len(bars["index"]) == 30 and bars["before"] == sorted(bars["before"], reverse=True)


def test_cue_maps_have_image_size(adapted):
    p, shots = adapted
    img = shots[3][0]
    h, w = img.shape[:2]
    x = letterbox_image(img, 161, p.model.backbone.mean, p.model.backbone.std)[None]
    layer = singular_value_changes(p.model.backbone, p.base_values(), p.svf_values())[0]
    idx = [i for i, _ in layer.top(4)]
    with p._active():
        maps = cue_maps(p.model.backbone, layer.name, x, idx, (h, w), fitted_size(h, w, 161))
    assert maps.shape == (len(idx), h, w) and maps.dtype == np.float32
    assert np.allclose(maps.reshape(len(idx), -1).max(1), 1.0) and maps.min() >= 0.0
    assert not torch.equal(torch.from_numpy(maps[0]), torch.from_numpy(maps[-1]))


def test_layer_changes_lists_only_the_adapted_layers(lite2, fss_dev):
    shots = fss_pairs(fss_dev, "horse", 2)
    p = Predictor(prototype_svf_model(lite2, svf_on="layer4"), image_size=129)
    p.set_supports([s[0] for s in shots], [s[1] for s in shots])
    every = singular_value_changes(p.model.backbone, p.base_values(), p.svf_values())
    assert [c.name for c in layer_changes(p)] == [c.name for c in every] and not any(c.changed for c in every)
    p.adapt(AdaptConfig(steps=2, lr=0.05, image_size=97, time_budget_s=None, gate="off", modules=["layer4.1"]))
    changes = layer_changes(p)
    assert len(every) > len(changes) == 2
    assert all(c.name.startswith("layer4.1.") and c.changed for c in changes)
    assert changes[0].score >= changes[1].score > 0


def test_cue_foreground_benchmark_scores_the_panels_maps_against_the_labels(adapted):
    """benchmarks/cue_foreground.py: a map's foreground contrast is its mean on the object minus on the
    background (ignored pixels left out), scored for every adapted layer and the panel's default."""
    from svf_model.data.episodes import Episode
    from tests.helpers import load_benchmark

    bench = load_benchmark("cue_foreground")
    p, shots = adapted
    label = shots[3][1].astype(np.uint8)
    assert bench.foreground_contrast(label.astype(np.float32), label) == 1.0
    assert bench.foreground_contrast(1 - label.astype(np.float32), label) == -1.0
    ignored = label.copy()
    ignored[label == 0] = 255  # no background left to compare with
    assert np.isnan(bench.foreground_contrast(label.astype(np.float32), ignored))

    masks = [s[1].astype(np.uint8) for s in shots[:3]]
    ep = Episode("horse", [], "", [s[0] for s in shots[:3]], masks, shots[3][0], label)
    scored = bench.score_episode(p, ep, 2, np.random.default_rng(0))
    changes = [c for c in layer_changes(p) if c.changed]
    assert set(scored) == {c.label for c in changes} | {bench.PANEL_LAYER}
    assert scored[bench.PANEL_LAYER]["layer"] == changes[0].label
    for name in (c.label for c in changes):
        for where in ("query", "support"):
            values = scored[name][where]
            assert all(-1 <= values[kind] <= 1 for kind in ("rising", "falling", "random")), values
    panel = cue_report(p, ep.query, changes[0], 2, changes)  # what the app's panel draws
    assert scored[changes[0].label]["query"]["rising"] == pytest.approx(
        np.mean([bench.foreground_contrast(c.heat, label) for c in panel.rising]), abs=1e-6)
    rows = [{"reverted": False, "layers": scored}, {"reverted": True, "layers": {}}]
    summary = bench.summarize(rows)[f"{changes[0].label} | query"]
    cell = scored[changes[0].label]["query"]
    assert summary["episodes"] == 1
    assert summary["rising_minus_falling"]["mean"] == pytest.approx(100 * (cell["rising"] - cell["falling"]))
