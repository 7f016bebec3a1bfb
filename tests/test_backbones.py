"""Backbones: embedded ImageNet weights work offline, stage shapes, local weight files, clear failures."""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from safetensors.torch import save_file
from torch import nn

from svf_model import build_backbone, list_backbones
from svf_model.backbones import BackboneWeightsError, load_efficientnet_lite_weights
from svf_model.weights import CheckpointError

CAT_CLASSES = set(range(281, 288))  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat, cougar, lynx


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's 2 cores are shared; 2 threads only add contention
    yield
    torch.set_num_threads(threads)


def chelsea(size: int) -> torch.Tensor:
    """scikit-image's cat photo, timm's eval transform (bicubic resize, crop 0.89), ``[1, 3, size, size]`` in [0, 1]."""
    from skimage.data import chelsea as load

    img = torch.from_numpy(load()).permute(2, 0, 1)
    img = TF.resize(img, int(size / 0.89), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return (TF.center_crop(img, size).float() / 255)[None]


@pytest.mark.parametrize(("variant", "size"), [(0, 224), (2, 260)])
def test_embedded_efficientnet_lite_classifies_a_cat_offline(variant: int, size: int) -> None:
    import timm

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).eval()
    load_efficientnet_lite_weights(model, variant)
    backbone = build_backbone(f"efficientnet_lite{variant}").eval()
    assert backbone.pretrained
    x = backbone.normalize(chelsea(size))
    with torch.no_grad():
        top3 = model(x).topk(3).indices[0].tolist()
        # The same weights through our dilated (stride 8) layer0..layer4 plus timm's head still see a cat.
        feats = backbone(x)["layer4"]
        top3_backbone = model.forward_head(model.bn2(model.conv_head(feats))).topk(3).indices[0].tolist()
    assert set(top3) & CAT_CLASSES, top3
    assert set(top3_backbone) & CAT_CLASSES, top3_backbone
    assert torch.equal(backbone.layer0[0].weight, model.conv_stem.weight)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2", "resnet50", "resnet50_deepstem",
                                  "vgg16_bn"])
def test_stage_channels_and_strides(name: str) -> None:
    assert name in list_backbones()
    backbone = build_backbone(name, weights=None).eval()
    assert backbone.strides["layer4"] == (16 if name == "vgg16_bn" else 8)
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 65, 65))
    assert list(feats) == ["layer0", "layer1", "layer2", "layer3", "layer4"]
    for stage, feat in feats.items():
        expected = math.ceil(65 / backbone.strides[stage])
        assert feat.shape == (1, backbone.channels[stage], expected, expected), (stage, feat.shape)


def _randomised(name: str) -> dict[str, torch.Tensor]:
    """A state dict (timm layout) that differs from every fresh random init."""
    import timm

    model = timm.create_model(name, pretrained=False)
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_file_in_timm_layout_loads(tmp_path, suffix: str) -> None:
    state = _randomised("resnet50")
    path = tmp_path / f"resnet50{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    backbone = build_backbone("resnet50", weights=path)
    assert backbone.pretrained
    assert torch.equal(backbone.layer0[0].weight, state["conv1.weight"])
    assert torch.equal(backbone.layer3[2].conv2.weight, state["layer3.2.conv2.weight"])
    assert torch.equal(backbone.layer4[0].downsample[1].running_var, state["layer4.0.downsample.1.running_var"])


def test_local_file_in_stage_layout_loads(tmp_path) -> None:
    source = build_backbone("efficientnet_lite0", weights=None)
    gen = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in source.state_dict().items()}
    path = tmp_path / "lite0_stages.safetensors"
    save_file(state, str(path))
    backbone = build_backbone("efficientnet_lite0", weights=path)
    assert backbone.pretrained
    loaded = backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_corrupt_or_tampered_files_fail_clearly(tmp_path) -> None:
    good = build_backbone("efficientnet_lite0", weights=None).state_dict()
    path = tmp_path / "ok.safetensors"
    save_file(dict(good), str(path))

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        build_backbone("efficientnet_lite0", weights=truncated)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="garbage.pth"):
        build_backbone("efficientnet_lite0", weights=garbage)

    pickled = tmp_path / "code.pth"  # an arbitrary pickled object is refused, never unpickled
    torch.save({"state_dict": good, "hook": nn.Identity()}, pickled)
    with pytest.raises(CheckpointError, match="code.pth"):
        build_backbone("efficientnet_lite0", weights=pickled)

    reshaped = dict(good)
    reshaped["layer0.0.weight"] = reshaped["layer0.0.weight"][:8].clone()
    save_file(reshaped, str(tmp_path / "reshaped.safetensors"))
    with pytest.raises(BackboneWeightsError, match="size mismatch"):
        build_backbone("efficientnet_lite0", weights=tmp_path / "reshaped.safetensors")

    renamed = {f"encoder.{k}": v for k, v in good.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(BackboneWeightsError, match="layout"):
        build_backbone("efficientnet_lite0", weights=tmp_path / "renamed.safetensors")

    with pytest.raises(CheckpointError, match="not found"):
        build_backbone("efficientnet_lite0", weights=tmp_path / "missing.safetensors")


def test_hub_weights_offline_imagenet_raises_fast_and_auto_warns() -> None:
    start = time.perf_counter()
    with pytest.raises(BackboneWeightsError, match="resnet50"):
        build_backbone("resnet50", weights="imagenet")
    assert time.perf_counter() - start < 30, "offline mode should fail without network retries"
    with pytest.raises(BackboneWeightsError, match="resnet50_v2"):
        build_backbone("resnet50_deepstem", weights="imagenet")
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        backbone = build_backbone("resnet50", weights="auto")
    assert not backbone.pretrained
