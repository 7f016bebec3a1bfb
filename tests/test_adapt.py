"""SVF adaptation on real shots: only singular values change, reset/cancel/export/import, isolation."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from svf_model import apply_svf, build_backbone
from svf_model.adapt import AdaptConfig, augmented_views
from svf_model.heads import build_head
from svf_model.model import FewShotSegmenter
from svf_model.predictor import Predictor
from svf_model.weights import CheckpointError
from tests.helpers import fss_pairs, load_benchmark, prototype_svf_model

SIZE = 161
FAST = AdaptConfig(steps=3, lr=0.05, image_size=129, time_budget_s=None, gate="off")


@pytest.fixture(scope="module")
def model(lite2):
    return prototype_svf_model(lite2)


@pytest.fixture(scope="module")
def shots(fss_dev):
    return fss_pairs(fss_dev, "video_dog", 4)


def _predictor(model, shots, k=3):
    p = Predictor(model, image_size=SIZE)
    p.set_supports([s[0] for s in shots[:k]], [s[1] for s in shots[:k]])
    return p


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_adaptation_changes_only_singular_values_and_is_deterministic(model, shots):
    before = _snapshot(model)
    p = _predictor(model, shots)
    result = p.adapt(FAST)
    assert result.steps == 3 and not result.cancelled and len(result.losses) == 3
    # The shared model is untouched; the predictor holds its own values.
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    adapted = p.svf_values()
    changed = [k for k in adapted if not torch.equal(adapted[k], p.base_values()[k])]
    assert changed, "adaptation moved no singular value"
    # Loading the predictor's values changes exactly the SVF trainables of the model.
    with p._active():
        during = _snapshot(model)
    differing = {k for k in before if not torch.equal(before[k], during[k])}
    assert differing and all(k.endswith(".sv.d") or k.endswith(".sv.s") for k in differing)
    q = _predictor(model, shots)
    q.adapt(FAST)
    assert all(torch.equal(q.svf_values()[k], adapted[k]) for k in adapted)


def test_reset_restores_exact_predictions(model, shots):
    p = _predictor(model, shots)
    query = shots[3][0]
    original = p.predict(query).prob
    p.adapt(FAST)
    adapted = p.predict(query).prob
    assert not np.array_equal(original, adapted)
    p.reset()
    np.testing.assert_array_equal(p.predict(query).prob, original)


def test_cancel_keeps_previous_state(model, shots):
    p = _predictor(model, shots)
    query = shots[3][0]
    original = p.predict(query).prob
    calls = []
    result = p.adapt(dataclasses.replace(FAST, steps=5),
                     progress=calls.append, should_stop=lambda: len(calls) >= 2)
    assert result.cancelled and result.steps == 2 and [c.step for c in calls] == [1, 2]
    assert not p.adapted
    np.testing.assert_array_equal(p.predict(query).prob, original)


def test_one_shot_views_and_progress(model, shots):
    p = _predictor(model, shots, k=1)
    seen = []
    result = p.adapt(dataclasses.replace(FAST, one_shot="views"), progress=seen.append)
    assert result.steps == 3 and [s.step for s in seen] == [1, 2, 3]
    assert all(np.isfinite(s.loss) and s.seconds >= 0 for s in seen)


def test_one_shot_view_colour_options(shots):
    image, mask = shots[0]
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    mean_t, std_t = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    rgb = torch.from_numpy(np.ascontiguousarray(image[:96, :96])).permute(2, 0, 1).float() / 255
    normalised = (rgb - mean_t) / std_t
    labels = torch.from_numpy(np.ascontiguousarray(mask[:96, :96])).long()
    plain, plain_masks = augmented_views(normalised, labels, 3, mean, std, 5)
    earlier = v2.Compose([  # the views every run before these options used
        v2.RandomResizedCrop(96, scale=(0.45, 1.0), ratio=(0.75, 1.333), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03),
    ])
    torch.manual_seed(5)
    source = tv_tensors.Image((normalised * std_t + mean_t).clamp(0, 1))
    again = torch.stack([earlier(source, tv_tensors.Mask(labels[None]))[0].as_subclass(torch.Tensor)
                         for _ in range(3)])
    assert torch.equal(plain, (again - mean_t) / std_t)  # the defaults are the views every earlier run used
    grey, grey_masks = augmented_views(normalised, labels, 3, mean, std, 5, hue=0.3, grayscale=1.0)
    assert torch.equal(grey_masks[0], plain_masks[0])  # same crop; colour never moves the mask
    grey_rgb = grey * std_t + mean_t
    torch.testing.assert_close(grey_rgb[:, 0], grey_rgb[:, 1], atol=1e-5, rtol=0)
    assert not torch.allclose(plain[:, 0], plain[:, 1], atol=1e-2)


def test_one_shot_adapts_by_default_and_skip_says_why(model, shots):
    assert AdaptConfig().one_shot == "views"
    p = _predictor(model, shots, k=1)
    query = shots[3][0]
    before = p.predict(query).prob
    result = p.adapt(dataclasses.replace(FAST, one_shot="skip"))
    assert result.steps == 0 and "at least 2 shots" in result.skipped
    assert not p.adapted
    np.testing.assert_array_equal(p.predict(query).prob, before)


def test_default_step_is_the_measured_step_for_the_number_of_shots(model, shots):
    """lr=None means ONE_SHOT_LR with one shot and LEAVE_ONE_OUT_LR with more (0.01 both, each
    measured on its own): the same values as those steps set by hand, and not those of another step."""
    from svf_model.adapt import LEAVE_ONE_OUT_LR, ONE_SHOT_LR

    assert AdaptConfig().lr is None and (ONE_SHOT_LR, LEAVE_ONE_OUT_LR) == (0.01, 0.01)
    assert AdaptConfig(lr=0.2).step_size(1) == AdaptConfig(lr=0.2).step_size(5) == 0.2
    for k, step in ((1, ONE_SHOT_LR), (3, LEAVE_ONE_OUT_LR)):
        by_default, by_hand, other = (_predictor(model, shots, k=k) for _ in range(3))
        result = by_default.adapt(dataclasses.replace(FAST, lr=None))
        assert result.lr == step
        by_hand.adapt(dataclasses.replace(FAST, lr=step))
        other.adapt(dataclasses.replace(FAST, lr=3 * step))
        values = by_default.svf_values()
        assert all(torch.equal(values[n], by_hand.svf_values()[n]) for n in values)
        assert any(not torch.equal(values[n], other.svf_values()[n]) for n in values)


def test_sessions_are_isolated(model, shots):
    a, b = _predictor(model, shots), _predictor(model, shots)
    query = shots[3][0]
    b_before = b.predict(query).prob
    a.adapt(FAST)
    np.testing.assert_array_equal(b.predict(query).prob, b_before)
    assert not np.array_equal(a.predict(query).prob, b_before)


def test_export_import_reproduces_adapted_predictions(model, shots, tmp_path):
    p = _predictor(model, shots)
    p.adapt(FAST)
    query = shots[3][0]
    adapted = p.predict(query).prob
    path = tmp_path / "session.safetensors"
    p.export_svf(str(path))
    assert path.stat().st_size < 200_000
    fresh = _predictor(model, shots)
    fresh.import_svf(str(path))
    np.testing.assert_array_equal(fresh.predict(query).prob, adapted)


def test_delta_of_another_backbone_is_refused(model, shots, tmp_path):
    other = prototype_svf_model(build_backbone("efficientnet_lite0"))
    p_other = Predictor(other, image_size=SIZE)
    p_other.set_supports([shots[0][0]], [shots[0][1]])
    path = tmp_path / "lite0.safetensors"
    p_other.export_svf(str(path))
    p = _predictor(model, shots)
    with pytest.raises(CheckpointError):
        p.import_svf(str(path))
    assert not p.adapted


def test_balanced_loss_weighs_foreground_and_background_equally():
    """With ``loss="balanced"`` a small object counts as much as its background; 255 is ignored."""
    from svf_model.adapt import episode_loss

    class Fixed:
        def __init__(self, logits):
            self.logits = logits

        def cross_logits(self, backbone, support, mask, views):  # noqa: ANN001, ANN201
            return self.logits

    logits = torch.zeros(1, 2, 4, 4)
    logits[:, 1] = 2.0  # every pixel says foreground
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, 0] = 1  # one foreground pixel
    target[0, 3, 3] = 255
    model = type("M", (), {"head": Fixed(logits), "backbone": None})()
    episode = (None, None, None, target)
    pixel = torch.nn.functional.cross_entropy(logits, target, ignore_index=255, reduction="none")[0]
    fg, bg = pixel[target[0] == 1].mean(), pixel[target[0] == 0].mean()
    torch.testing.assert_close(episode_loss(model, episode, "balanced"), (fg + bg) / 2)
    torch.testing.assert_close(episode_loss(model, episode, "ce"), (pixel[target[0] != 255]).mean())
    # the one (well predicted) foreground pixel weighs as much as the 14 (wrong) background pixels
    assert episode_loss(model, episode, "balanced") < 0.6 * episode_loss(model, episode, "ce")


def test_prototype_objective_skips_the_refinement_while_adapting(lite2, shots):
    """With a learned refinement on prototype logits, ``objective="prototype"`` (and ``auto``) trains on
    the prototype logits alone, ``"head"`` on the whole head; predictions use the whole head either way."""
    from svf_model.adapt import adapt_svf, adaptation_objective, episode_loss
    from svf_model.preprocess import letterbox_image, letterbox_mask

    backbone = build_backbone("efficientnet_lite2")  # own copy: SVF layers of its own
    head = build_head("prototype_refine", backbone, stages=("layer2", "layer3", "layer4"))
    with torch.no_grad():
        head.refine[-1].weight.copy_(0.1 * torch.randn(head.refine[-1].weight.shape,
                                                       generator=torch.Generator().manual_seed(0)))
    model = FewShotSegmenter(backbone, head)
    apply_svf([backbone.layer4[1]], parametrization="exp")
    model.eval()
    images = torch.stack([letterbox_image(img, 129, backbone.mean, backbone.std) for img, _ in shots[:3]])
    masks = torch.stack([letterbox_mask(mask, 129) for _, mask in shots[:3]]).float()
    with torch.no_grad():
        whole = episode_loss(model, (images, masks), FAST.loss)
        with adaptation_objective(model, "prototype"):
            prototype = episode_loss(model, (images, masks), FAST.loss)
        plain = FewShotSegmenter(backbone, build_head("prototype", backbone, stages=("layer2", "layer3", "layer4")))
        torch.testing.assert_close(prototype, episode_loss(plain.eval(), (images, masks), FAST.loss),
                                   rtol=1e-5, atol=1e-6)
    assert not torch.isclose(whole, prototype)
    assert head._prototype_only is False  # the context restores the head

    config = dataclasses.replace(FAST, image_size=None)
    runs = {}
    for objective in ("auto", "prototype", "head"):
        snapshot = _snapshot(model)
        result = adapt_svf(model, images, masks, dataclasses.replace(config, objective=objective))
        runs[objective] = result.losses
        model.load_state_dict(snapshot)
    assert runs["auto"] == runs["prototype"]
    assert runs["prototype"][0] == pytest.approx(float(prototype), rel=1e-5)
    assert runs["head"][0] == pytest.approx(float(whole), rel=1e-5)
    with pytest.raises(ValueError, match="objective"):
        adapt_svf(model, images, masks, dataclasses.replace(config, objective="refine"))


def test_evaluate_parses_adaptation_options():
    from svf_model.evaluate import parse_adapt_options

    got = parse_adapt_options(["objective=head", "lr=0.01", "steps=5", "image_size=none", "modules=layer4+layer3.5"])
    assert got == {"objective": "head", "lr": 0.01, "steps": 5, "image_size": None, "modules": ["layer4", "layer3.5"]}
    AdaptConfig(**got)
    assert parse_adapt_options(["lr=0.02", "lr=none"]) == {"lr": None}  # lr's default is None: still a float
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_adapt_options(["learning_rate=0.1"])


def test_the_registry_note_on_adaptation_reaches_the_result(model, shots):
    """A model whose registry entry says what adaptation measurably does reports it after adapting."""
    from svf_model.registry import read_registry

    default, entries = read_registry()
    assert "IoU" in entries[default].adapt_note  # the shipped default's measured effect is stated
    p = _predictor(model, shots, k=2)
    model.adapt_note = entries[default].adapt_note
    try:
        assert p.adapt(FAST).note == entries[default].adapt_note
        single = _predictor(model, shots, k=1)
        assert single.adapt(dataclasses.replace(FAST, one_shot="skip")).note is None  # its own message says why
    finally:
        del model.adapt_note


def _manual_support_iou(model, images, masks):
    """Pooled foreground IoU of the leave-one-out predictions, written out directly."""
    from svf_model.model import leave_one_out_index

    inter = union = 0
    with torch.no_grad():
        for i, others in enumerate(leave_one_out_index(images.shape[0])):
            logits = model(images[i:i + 1], images[others][None], masks[others][None])
            pred, truth, valid = logits.argmax(1)[0] == 1, masks[i] == 1, masks[i] != 255
            inter += int((pred & truth & valid).sum())
            union += int(((pred | truth) & valid).sum())
    return inter / union


def test_support_gate_scores_the_shots_and_keeps_or_restores(model, shots):
    """The gate's score is the leave-one-out foreground IoU before and after; an adaptation that does not
    raise it by the margin is undone (predictions exactly as before), one that does is kept."""
    from svf_model.adapt import adapt_svf
    from svf_model.preprocess import letterbox_image, letterbox_mask

    bb = model.backbone
    images = torch.stack([letterbox_image(img, 129, bb.mean, bb.std) for img, _ in shots[:3]])
    masks = torch.stack([letterbox_mask(mask, 129) for _, mask in shots[:3]]).float()
    config = dataclasses.replace(FAST, image_size=None, gate="support")
    snapshot = _snapshot(model)
    before = _manual_support_iou(model, images, masks)

    kept = adapt_svf(model, images, masks, dataclasses.replace(config, gate_margin=-1.0))  # always keeps
    assert not kept.reverted and 0 < before < 1
    assert kept.support_iou_before == pytest.approx(before, abs=1e-6)
    assert kept.support_iou_after == pytest.approx(_manual_support_iou(model, images, masks), abs=1e-6)
    assert any(not torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    assert "cross-check" in kept.gate_message
    model.load_state_dict(snapshot)

    undone = adapt_svf(model, images, masks, dataclasses.replace(config, gate_margin=1.0))  # can never gain 1.0
    assert undone.reverted and undone.steps == 3 and undone.support_iou_after == kept.support_iou_after
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    assert "unchanged" in undone.gate_message

    with pytest.raises(ValueError, match="gate"):
        adapt_svf(model, images, masks, dataclasses.replace(config, gate="loo"))
    with pytest.raises(ValueError, match="loss must be balanced or ce"):
        adapt_svf(model, images, masks, dataclasses.replace(config, loss="auto"))  # the former default
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())


def test_rejected_adaptation_leaves_the_predictor_as_it_was(model, shots):
    p = _predictor(model, shots, k=1)
    query = shots[3][0]
    before = p.predict(query).prob
    result = p.adapt(dataclasses.replace(FAST, one_shot="views", gate="support", gate_margin=1.0))
    assert result.reverted and result.steps == 3 and not p.adapted
    assert 0 <= result.support_iou_before <= 1  # the shot against fresh augmented views of itself
    np.testing.assert_array_equal(p.predict(query).prob, before)


def test_study_comparison_targets_start_from_the_base_singular_values(model, shots):
    """benchmarks/adapt_study.py runs ``bn``/``full`` after ``svf`` on the same shared model: they
    must start from the base values, not from those the ``svf`` variant adapted and predicted with."""
    study = load_benchmark("adapt_study")

    p = _predictor(model, shots)
    query = shots[3][0]
    base = p.predict(query).mask
    p.adapt(dataclasses.replace(FAST, lr=0.5))
    adapted = p.predict(query).mask
    assert not np.array_equal(adapted, base), "the svf adaptation must change the query's mask"
    p.reset()
    untrained = dataclasses.replace(FAST, target="full", steps=0, modules=["layer4.1"])
    mask, reverted = study.adapt_other_target(model, p, untrained, query)
    assert not reverted
    np.testing.assert_array_equal(mask, base)
    np.testing.assert_array_equal(p.predict(query).mask, base)


def test_study_resume_keeps_its_episodes_and_refuses_another_study(fss_dev, tmp_path):
    """``adapt_study.py --resume`` continues from the episodes its JSON holds, and refuses a file
    of another study (other seed, variant settings or episodes) instead of mixing the two."""
    import argparse
    import os

    from svf_model.data.episodes import make_episodes
    from svf_model.data.fss_folder import FSSFolder

    study = load_benchmark("adapt_study")
    classes = ["horse", "video_cows"]
    episodes = make_episodes(FSSFolder(fss_dev), 4, 1, 3, classes=classes)
    args = argparse.Namespace(shots=1, seed=3, grouped="kernel", data=str(fss_dev))
    variants = [study.parse_variant("bn:lr=0.003")]
    name = variants[0][0]
    rows = {name: [{"class": ep.class_name, "query": os.path.relpath(ep.query_path, fss_dev),
                    "iou_before": 0.5, "iou_after": 0.5 + i / 10, "reverted": False, "seconds": 1.0}
                   for i, ep in enumerate(episodes[:2])]}
    path = str(tmp_path / "study.json")
    study.write_json(path, study.summarize(variants, rows), args, 2, "m", 321, classes)

    assert study.resumed_rows(path, args, variants, episodes, "m", 321, classes) == rows
    with pytest.raises(SystemExit, match="seed: file 3, asked 4"):
        study.resumed_rows(path, argparse.Namespace(**{**vars(args), "seed": 4}), variants, episodes, "m", 321,
                           classes)
    with pytest.raises(SystemExit, match="config differs"):
        study.resumed_rows(path, args, [(name, study.parse_variant("bn:lr=0.01")[1])], episodes, "m", 321, classes)
    other = make_episodes(FSSFolder(fss_dev), 4, 1, 4, classes=classes)
    with pytest.raises(SystemExit, match=r"episode \d of"):
        study.resumed_rows(path, args, variants, other, "m", 321, classes)
    with pytest.raises(SystemExit, match="already holds 2 episodes"):
        study.resumed_rows(path, args, variants, episodes[:1], "m", 321, classes)


def test_resumed_study_measures_what_an_uninterrupted_one_does(fss_dev, tmp_path):
    """An ``adapt_study.py`` run stopped after one episode and resumed gives the same per-episode
    figures as one run straight through (each adaptation seeds itself)."""
    study = load_benchmark("adapt_study")
    common = ["--data", str(fss_dev), "--classes", "horse", "video_cows", "--shots", "1", "--seed", "5",
              "--size", "161", "--variants", "svf:steps=2", "bn:steps=2,lr=0.003"]
    straight, resumed = tmp_path / "straight.json", tmp_path / "resumed.json"
    assert study.main([*common, "--episodes", "2", "--json", str(straight)]) == 0
    assert study.main([*common, "--episodes", "1", "--json", str(resumed)]) == 0
    assert study.main([*common, "--episodes", "2", "--json", str(resumed), "--resume"]) == 0

    def figures(path):
        variants = json.loads(path.read_text())["variants"]
        return {name: [{k: v for k, v in e.items() if k != "seconds"} for e in variant["episodes"]]
                for name, variant in variants.items()}

    assert all(len(episodes) == 2 for episodes in figures(resumed).values())
    assert any(e["iou_after"] != e["iou_before"] for episodes in figures(straight).values() for e in episodes), \
        "some adaptation must be kept, or there is nothing to compare"
    assert figures(resumed) == figures(straight)


def test_full_step_subspace_projects_onto_what_svf_can_express(model):
    """benchmarks/full_step_subspace.py splits a weight change into the part SVF can express
    (``U diag(c) V^T``) and the rest: the split must recover an SVF change exactly and leave a rest
    with no SVF part, on the real decomposed convs."""
    from svf_model.svf import svf_layers

    study = load_benchmark("full_step_subspace")

    gen = torch.Generator().manual_seed(0)
    layers = list(svf_layers(model.backbone))
    assert layers
    for _, layer in layers:
        U, Vh = layer.U.double(), layer.Vh.double()
        c0 = torch.randn(U.shape[1], generator=gen, dtype=torch.float64)
        torch.testing.assert_close(study.diagonal_part(U, Vh, (U * c0) @ Vh), c0)
        dW = torch.randn(U.shape[0], Vh.shape[1], generator=gen, dtype=torch.float64)
        c = study.diagonal_part(U, Vh, dW)
        rest = dW - (U * c) @ Vh
        assert study.diagonal_part(U, Vh, rest).norm() < 1e-6 * c.norm()  # U, Vh are float32-orthonormal
        assert 0 < c.norm() < dW.norm()


@pytest.mark.parametrize("target", ["depthwise", "dense"])
def test_depthwise_and_dense_targets_train_only_their_own_weights(model, shots, target):
    """The ``depthwise`` comparison target changes the adapt block's depthwise filters and nothing
    else; ``dense`` changes exactly the convs SVF decomposes (the paper's "fine-tune W" of the same
    layers) and nothing else. BatchNorm stays as it was in both."""

    from svf_model.adapt import adapt_svf
    from svf_model.svf import svf_layers

    m = copy.deepcopy(model)
    block = m.backbone.get_submodule("layer4.1")
    dense = {n: layer.recomposed_weight().detach().reshape(layer.weight_shape).clone()
             for n, layer in svf_layers(block)}
    depthwise = {n: c.weight.detach().clone() for n, c in block.named_modules()
                 if isinstance(c, torch.nn.Conv2d) and c.groups > 1}
    norms = {n: {k: v.clone() for k, v in b.state_dict().items()} for n, b in block.named_modules()
             if "BatchNorm" in type(b).__name__}
    assert dense and depthwise and norms
    trained, frozen = (depthwise, dense) if target == "depthwise" else (dense, depthwise)
    p = _predictor(m, shots)
    config = dataclasses.replace(FAST, target=target, lr=0.01, modules=["layer4.1"])
    adapt_svf(m, p._supports, p._support_masks, config)
    for name, w in trained.items():
        assert not torch.equal(block.get_submodule(name).weight, w), name
    for name, w in frozen.items():
        torch.testing.assert_close(block.get_submodule(name).weight, w)
    for name, state in norms.items():
        for key, value in block.get_submodule(name).state_dict().items():
            assert torch.equal(value, state[key]), (name, key)
    with pytest.raises(ValueError, match="svf, bn, depthwise, dense or full"):
        adapt_svf(m, p._supports, p._support_masks, dataclasses.replace(config, target="lora"))


def test_depthwise_target_without_depthwise_convs_is_refused_before_touching_the_model():
    """ResNet blocks have no depthwise convs: the ``depthwise`` target says so and leaves the SVF
    layers as they were (the comparison targets fold them otherwise)."""
    from svf_model.adapt import adapt_svf
    from svf_model.svf import SVFConv2d

    backbone = build_backbone("resnet50", weights=None).eval()
    m = FewShotSegmenter(backbone, build_head("prototype", backbone, stages=("layer3", "layer4")))
    apply_svf([m.backbone.layer4], parametrization="exp")
    images, masks = torch.randn(2, 3, 65, 65), (torch.rand(2, 65, 65) > 0.5).long()
    config = AdaptConfig(target="depthwise", steps=1, image_size=None, gate="off", modules=["layer4"])
    with pytest.raises(ValueError, match="no grouped or depthwise convs in layer4"):
        adapt_svf(m, images, masks, config)
    assert isinstance(m.backbone.layer4[0].conv1, SVFConv2d)


def test_depthwise_filters_decomposed_kernel_by_kernel_adapt_reset_and_travel_as_values(model, shots, tmp_path):
    """With the adapt block's depthwise conv decomposed kernel by kernel (3 values per channel), the
    predictor adapts those values with the rest; reset restores the predictions exactly; exported
    values reproduce them on a fresh predictor, and the model without that decomposition refuses them.
    The copy is made after a Predictor used the model, so its recorded base values must be extended
    to the new layers."""

    from svf_model.svf import apply_svf

    _predictor(model, shots)  # records the model's base values, which a deep copy carries along
    m = copy.deepcopy(model)
    apply_svf([m.backbone.layer4[1]], kinds={"grouped"}, parametrization="exp", grouped_fold="kernel")
    p = _predictor(m, shots)
    query = shots[3][0]
    original = p.predict(query).prob
    p.adapt(dataclasses.replace(FAST, grouped="always"))
    changed = _changed_layers(p)
    assert any("conv_dw" in k for k in changed) and any("conv_pw" in k for k in changed), changed
    adapted = p.predict(query).prob
    assert not np.array_equal(adapted, original)
    path = tmp_path / "kernel.safetensors"
    p.export_svf(str(path))
    fresh = _predictor(m, shots)
    fresh.import_svf(str(path))
    np.testing.assert_array_equal(fresh.predict(query).prob, adapted)
    p.reset()
    np.testing.assert_array_equal(p.predict(query).prob, original)
    plain = _predictor(model, shots)
    with pytest.raises(CheckpointError, match="does not fit this model's SVF layers"):
        plain.import_svf(str(path))
    assert not plain.adapted


def _changed_layers(predictor: Predictor) -> set[str]:
    return {k for k, v in predictor.svf_values().items() if not torch.equal(v, predictor.base_values()[k])}


@pytest.fixture(scope="module")
def kernel_model(model):
    m = copy.deepcopy(model)
    apply_svf([m.backbone.layer4[1]], kinds={"grouped"}, parametrization="exp", grouped_fold="kernel")
    return m


@pytest.mark.parametrize(("grouped", "k", "trains"),
                         [("one_shot", 1, True), ("one_shot", 2, False), ("always", 2, True), ("never", 1, False)])
def test_decomposed_depthwise_values_train_as_the_config_says(kernel_model, shots, grouped, k, trains):
    """``AdaptConfig.grouped``: the depthwise conv's values train with one shot only (the default),
    always or never; the other SVF layers of the block train in every case."""
    p = _predictor(kernel_model, shots, k)
    p.adapt(dataclasses.replace(FAST, grouped=grouped))
    changed = _changed_layers(p)
    assert any("conv_pw" in key for key in changed), changed
    assert any("conv_dw" in key for key in changed) == trains, changed


def test_grouped_lr_scale_scales_only_the_depthwise_step(kernel_model, shots):
    """One layer-normalised step from the same values: the depthwise values move ``grouped_lr_scale``
    times as far, the dense convs' values exactly as far."""
    moves = []
    for scale in (1.0, 2.0):
        p = _predictor(kernel_model, shots, 1)
        p.adapt(dataclasses.replace(FAST, steps=1, grouped_lr_scale=scale))
        base = p.base_values()
        moves.append({k: v - base[k] for k, v in p.svf_values().items() if not torch.equal(v, base[k])})
    assert moves[0].keys() == moves[1].keys()
    assert any("conv_dw" in k for k in moves[0]) and any("conv_pw" in k for k in moves[0])
    for key, move in moves[0].items():
        factor = 2.0 if "conv_dw" in key else 1.0
        torch.testing.assert_close(moves[1][key], factor * move, rtol=1e-5, atol=1e-7)


def test_an_unknown_grouped_setting_is_refused_before_training(kernel_model, shots):
    p = _predictor(kernel_model, shots, 2)
    with pytest.raises(ValueError, match="grouped must be one of one_shot, always, never"):
        p.adapt(dataclasses.replace(FAST, grouped="sometimes"))
    assert not p.adapted and not _changed_layers(p)
