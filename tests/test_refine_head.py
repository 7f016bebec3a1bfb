"""The learned prototype-refinement head: starts as the prototype head, its fast leave-one-out and
cross paths equal the generic ones, it learns on real episodes, and its checkpoints round-trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from svf_model.checkpoint import load_checkpoint, save_checkpoint, trainable_state
from svf_model.heads import build_head
from svf_model.heads.refine import PrototypeRefineHead
from svf_model.model import FewShotHead, FewShotSegmenter
from svf_model.preprocess import letterbox_image, letterbox_mask
from tests.helpers import fss_pairs

STAGES = ("layer2", "layer3", "layer4")


@pytest.fixture(scope="module")
def shots(fss_dev, lite2, one_thread) -> tuple[torch.Tensor, torch.Tensor]:
    """Four real ``horse`` photos letterboxed to 161 px: images ``[4, 3, 161, 161]``, masks ``[4, 161, 161]``."""
    pairs = fss_pairs(fss_dev, "horse", 4)
    images = torch.stack([letterbox_image(img, 161, lite2.mean, lite2.std) for img, _ in pairs])
    masks = torch.stack([letterbox_mask(mask, 161) for _, mask in pairs]).float()
    return images, masks


def randomised(head: PrototypeRefineHead, seed: int = 0) -> PrototypeRefineHead:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        last = head.refine[-1]
        last.weight.copy_(0.1 * torch.randn(last.weight.shape, generator=gen))
    return head


def test_untrained_refine_head_is_the_prototype_head(lite2, shots):
    images, masks = shots
    refine = FewShotSegmenter(lite2, build_head("prototype_refine", lite2, stages=STAGES)).eval()
    proto = FewShotSegmenter(lite2, build_head("prototype", lite2, stages=STAGES)).eval()
    with torch.no_grad():
        a = refine(images[3:], images[None, :3], masks[None, :3])
        b = proto(images[3:], images[None, :3], masks[None, :3])
    assert torch.equal(a, b)


def test_fast_paths_equal_the_generic_ones(lite2, shots):
    images, masks = shots
    head = randomised(build_head("prototype_refine", lite2, stages=STAGES)).eval()
    with torch.no_grad():
        fast = head.leave_one_out_logits(lite2, images, masks)
        generic = FewShotHead.leave_one_out_logits(head, lite2, images, masks)
        cross = head.cross_logits(lite2, images[:2], masks[:2], images[2:])
        cross_generic = FewShotHead.cross_logits(head, lite2, images[:2], masks[:2], images[2:])
    assert fast.shape == (4, 2, 21, 21)
    assert fast.abs().max() > 1  # the refinement is not a no-op here
    torch.testing.assert_close(fast, generic, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cross, cross_generic, rtol=1e-5, atol=1e-5)


def test_refinement_learns_on_real_leave_one_out_episodes(lite2, shots):
    """20 SGD steps on the refinement alone lower the leave-one-out loss on real photos by > 10 %."""
    images, masks = shots
    head = build_head("prototype_refine", lite2, stages=STAGES)
    with torch.no_grad():
        feat, feat_prior = head.features(lite2, images)
    per_shot = head.cache_from_features(feat, feat_prior, masks)
    others = torch.tensor([[j for j in range(4) if j != i] for i in range(4)])
    cache = {k: t[others] for k, t in per_shot.items()}
    target = F.interpolate(masks[:, None], feat.shape[-2:], mode="nearest")[:, 0].long()
    opt = torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(head.logits_from_features(feat, feat_prior, cache), target, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_checkpoint_round_trip(shots, tmp_path):
    from svf_model.checkpoint import build_from_meta

    images, masks = shots
    meta = {"backbone": "efficientnet_lite2", "backbone_weights": "imagenet", "method": "prototype_refine",
            "head_kwargs": {"stages": list(STAGES)}, "svf_stages": [], "image_size": 161, "shots": 1}
    model = build_from_meta(meta)  # its own backbone: the shared fixture may carry other tests' SVF layers
    randomised(model.head)
    model.eval()
    path = save_checkpoint(model, tmp_path / "refine.safetensors", meta)
    loaded, got = load_checkpoint(path)
    assert got["method"] == "prototype_refine"
    with torch.no_grad():
        assert torch.equal(model(images[3:], images[None, :3], masks[None, :3]),
                           loaded(images[3:], images[None, :3], masks[None, :3]))


def test_region_prior_equals_the_masked_prior(lite2, shots):
    """The gathered computation gives PFENet's prior on masked features (incl. an empty region)."""
    from svf_model.heads.blocks import prior_mask
    from svf_model.heads.refine import region_prior
    from svf_model.model import resize_mask

    images, masks = shots
    with torch.no_grad():
        f4 = lite2(images)["layer4"]
    fg, bg = resize_mask(masks, f4.shape[-2:])
    fg[3] = 0  # a shot whose foreground vanished at feature size
    support, weight = torch.stack([f4[1:], f4[1:]]), torch.stack([fg[1:], bg[1:]])  # B=2, K=3
    query = f4[:1].expand(2, -1, -1, -1)
    # float32 sums in another order: 1.0e-5 apart has been seen with both cores busy
    torch.testing.assert_close(region_prior(query, support, weight), prior_mask(query, support * weight),
                               rtol=0, atol=1e-4)


def test_region_prior_gradient_equals_the_dense_prior_gradient(lite2, shots):
    """Under autograd (adaptation with the whole head as objective, meta-training) the gathered prior
    gives the values and the gradients of PFENet's prior on masked features."""
    from svf_model.heads.blocks import prior_mask
    from svf_model.heads.refine import region_prior
    from svf_model.model import resize_mask

    images, masks = shots
    with torch.no_grad():
        f4 = lite2(images)["layer4"].double()
    fg, _ = resize_mask(masks, f4.shape[-2:])
    weight = fg[1:].double()[None]  # [1, 3, 1, h, w]
    grads = []
    for prior in (region_prior, lambda q, s, w: prior_mask(q, s * w)):
        query = f4[:1].clone().requires_grad_(True)
        support = f4[None, 1:].clone().requires_grad_(True)
        out = prior(query, support, weight)
        torch.manual_seed(0)
        (out * torch.randn_like(out)).sum().backward()
        grads.append((out.detach(), query.grad, support.grad))
    for mine, dense in zip(*grads, strict=True):
        assert mine.abs().sum() > 0
        torch.testing.assert_close(mine, dense, rtol=1e-6, atol=1e-9)


def test_min_shots_keeps_single_shots_on_the_prototype_logits(lite2, shots):
    images, masks = shots
    head = randomised(build_head("prototype_refine", lite2, stages=STAGES, min_shots=2)).eval()
    model = FewShotSegmenter(lite2, head).eval()
    proto = FewShotSegmenter(lite2, build_head("prototype", lite2, stages=STAGES)).eval()
    with torch.no_grad():
        assert torch.equal(model(images[3:], images[None, :1], masks[None, :1]),
                           proto(images[3:], images[None, :1], masks[None, :1]))
        two = model(images[3:], images[None, :2], masks[None, :2])
        assert not torch.allclose(two, proto(images[3:], images[None, :2], masks[None, :2]))


def test_compose_takes_singular_values_from_one_file_and_the_head_from_another(tmp_path):
    from svf_model.checkpoint import build_from_meta
    from svf_model.compose import compose_checkpoints
    from svf_model.svf import svf_layers
    from svf_model.weights import CheckpointError

    meta = {"backbone": "efficientnet_lite2", "backbone_weights": "imagenet", "image_size": 161, "shots": 1}
    sv_meta = {**meta, "method": "prototype", "head_kwargs": {"stages": list(STAGES)}, "svf_stages": ["layer4"],
               "parametrization": "exp"}
    sv_model = build_from_meta(sv_meta)
    for _, layer in svf_layers(sv_model.backbone):
        layer.sv.trainable.data.normal_(0, 0.1)
    sv_file = save_checkpoint(sv_model, tmp_path / "sv.safetensors", sv_meta)
    head_meta = {**meta, "method": "prototype_refine", "head_kwargs": {"stages": list(STAGES)}, "svf_stages": []}
    head_model = build_from_meta(head_meta)
    randomised(head_model.head)
    head_file = save_checkpoint(head_model, tmp_path / "head.safetensors", head_meta)
    out = compose_checkpoints(sv_file, head_file, tmp_path / "both.safetensors", {"min_shots": 2})
    model, got = load_checkpoint(out)
    assert got["method"] == "prototype_refine" and got["head_kwargs"]["min_shots"] == 2
    assert got["svf_stages"] == ["layer4"]
    sv = {k: v for k, v in trainable_state(sv_model).items() if k.startswith("backbone.")}
    state = trainable_state(model)
    assert sv and all(torch.equal(state[k], v) for k, v in sv.items())
    assert all(torch.equal(state[k], v) for k, v in trainable_state(head_model).items() if k.startswith("head."))
    with pytest.raises(CheckpointError, match="unknown|fit|keyword|unexpected"):
        compose_checkpoints(sv_file, head_file, tmp_path / "bad.safetensors", {"no_such_option": 1})
