"""PFENet / SVF-baseline / BAM heads against the official layouts, and official checkpoint loading.

Expected key names and shapes below are transcribed from the official code (dvlab-research/PFENet
``model/PFENet.py``, ``model/resnet.py``, ``model/vgg.py``; chunbolang/BAM ``model/BAM.py``,
``model/PSPNet.py``, ``model/PPM.py``, ``model/ASPP.py``; zechao-li/SVF-pytorch ``svf.py``), not
generated from the heads under test.
"""

from __future__ import annotations

import copy
import json
from math import floor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from svf_model import build_backbone, load_official, official_state_dict
from svf_model.heads import build_head
from svf_model.heads.blocks import prior_mask
from svf_model.model import FewShotSegmenter
from svf_model.svf import SVFConv2d, svf_layers
from svf_model.weights import CheckpointError

BACKBONES = ("resnet50_deepstem", "vgg16_bn")
METHODS = ("pfenet", "baseline", "bam")
FEA_DIM = {"resnet50_deepstem": 1024 + 512, "vgg16_bn": 512 + 256}
HIGH_DIM = {"resnet50_deepstem": 2048, "vgg16_bn": 512}
SIZE = 65  # (H - 1) % 8 == 0 as the official models require
SMALL = 33  # same rule; for the many-forward tests
FAST_BINS = {"pyramid_bins": (9, 5, 3, 2)}  # PFENet's FEM at (60, 30, 15, 8) costs ~9 GMAC whatever the input
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ------------------------------------------------------------------------------------------------
# facts from the official code


def official_backbone_keys(name: str) -> dict[str, tuple[int, ...]]:
    """layer0..layer4 keys/shapes of PFENet's deep-base ResNet-50 or sliced VGG16-BN."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        keys.update({f"{prefix}.{k}": (() if k == "num_batches_tracked" else (c,)) for k in BN})

    if name == "resnet50_deepstem":
        for idx, (cin, cout) in zip((0, 3, 6), ((3, 64), (64, 64), (64, 128)), strict=True):
            keys[f"layer0.{idx}.weight"] = (cout, cin, 3, 3)
            bn(f"layer0.{idx + 1}", cout)
        inplanes = 128
        for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True), start=1):
            for b in range(blocks):
                p = f"layer{layer}.{b}"
                keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
                for i, c in ((1, planes), (2, planes), (3, planes * 4)):
                    bn(f"{p}.bn{i}", c)
                if b == 0:
                    keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                    bn(f"{p}.downsample.1", planes * 4)
                inplanes = planes * 4
        return keys
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    features, cin = [], 3
    for v in cfg:
        if v == "M":
            features.append(("pool",))
        else:
            features += [("conv", cin, v), ("bn", v), ("relu",)]
            cin = v
    for stage, (a, b) in enumerate(((0, 7), (7, 14), (14, 24), (24, 34), (34, 43))):
        for i, f in enumerate(features[a:b]):
            if f[0] == "conv":
                keys[f"layer{stage}.{i}.weight"] = (f[2], f[1], 3, 3)
                keys[f"layer{stage}.{i}.bias"] = (f[2],)
            elif f[0] == "bn":
                bn(f"layer{stage}.{i}", f[1])
    return keys


def official_head_keys(method: str, fea_dim: int, high_dim: int, shot: int = 1) -> dict[str, tuple[int, ...]]:
    d = 256
    keys = {"down_query.0.weight": (d, fea_dim, 1, 1), "down_supp.0.weight": (d, fea_dim, 1, 1)}
    if method == "pfenet":
        for i in range(4):
            keys[f"init_merge.{i}.0.weight"] = (d, 2 * d + 1, 1, 1)
            keys[f"beta_conv.{i}.0.weight"] = (d, d, 3, 3)
            keys[f"beta_conv.{i}.2.weight"] = (d, d, 3, 3)
            keys[f"inner_cls.{i}.0.weight"] = (d, d, 3, 3)
            keys[f"inner_cls.{i}.3.weight"] = (2, d, 1, 1)
            keys[f"inner_cls.{i}.3.bias"] = (2,)
        for i in range(3):
            keys[f"alpha_conv.{i}.0.weight"] = (d, 2 * d, 1, 1)
        keys.update({"res1.0.weight": (d, 4 * d, 1, 1), "res2.0.weight": (d, d, 3, 3), "res2.2.weight": (d, d, 3, 3),
                     "cls.0.weight": (d, d, 3, 3), "cls.3.weight": (2, d, 1, 1), "cls.3.bias": (2,)})
        return keys
    keys["init_merge.0.weight"] = (d, 2 * d + 1, 1, 1)
    for i in range(5):
        keys[f"ASPP_meta.layer6_{i}.0.weight"] = (d, d, 1, 1) if i < 2 else (d, d, 3, 3)
        keys[f"ASPP_meta.layer6_{i}.0.bias"] = (d,)
    keys.update({"res1_meta.0.weight": (d, 5 * d, 1, 1), "res2_meta.0.weight": (d, d, 3, 3),
                 "res2_meta.2.weight": (d, d, 3, 3), "cls_meta.0.weight": (d, d, 3, 3),
                 "cls_meta.3.weight": (2, d, 1, 1), "cls_meta.3.bias": (2,)})
    if method == "bam":
        keys.update({"gram_merge.weight": (1, 2, 1, 1), "cls_merge.weight": (1, 2, 1, 1)})
        for i in range(4):  # PPM bins (1, 2, 3, 6), reduction fea_dim / 4
            keys[f"learner_base.0.features.{i}.1.weight"] = (high_dim // 4, high_dim, 1, 1)
            keys.update({f"learner_base.0.features.{i}.2.{k}": (() if k == "num_batches_tracked" else (high_dim // 4,))
                         for k in BN})
        keys["learner_base.1.0.weight"] = (512, 2 * high_dim, 3, 3)
        keys.update({f"learner_base.1.1.{k}": (() if k == "num_batches_tracked" else (512,)) for k in BN})
        keys.update({"learner_base.1.4.weight": (16, 512, 1, 1), "learner_base.1.4.bias": (16,)})
        if shot > 1:  # kshot_trans_dim = 2 in the official configs
            keys.update({"kshot_rw.0.weight": (2, shot, 1, 1), "kshot_rw.0.bias": (2,),
                         "kshot_rw.2.weight": (shot, 2, 1, 1), "kshot_rw.2.bias": (shot,)})
    return keys


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def backbones() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: build_backbone(name, weights=None).eval() for name in BACKBONES}


@pytest.fixture(scope="module")
def episode(fss_dev: Path) -> dict[str, torch.Tensor]:
    """One real 5-shot episode (class ``horse``) at 65x65, ImageNet-normalised."""
    counts = json.loads((fss_dev / "classes.json").read_text())
    cls = "horse" if "horse" in counts else sorted(counts)[0]
    stems = sorted(p.stem for p in (fss_dev / cls).glob("*.jpg"))[:6]
    imgs, masks = [], []
    for stem in stems:
        rgb = Image.open(fss_dev / cls / f"{stem}.jpg").convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
        m = Image.open(fss_dev / cls / f"{stem}.png").convert("L").resize((SIZE, SIZE), Image.NEAREST)
        imgs.append(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255)
        masks.append(torch.from_numpy((np.asarray(m) > 127).astype(np.float32)))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x = (torch.stack(imgs) - mean) / std
    y = torch.stack(masks)
    assert y[1:].sum() > 0
    return {"query": x[:1], "supports": x[1:][None], "masks": y[1:][None]}


@pytest.fixture(scope="module")
def small_episode(episode) -> dict[str, torch.Tensor]:
    """The same episode at 33x33."""
    return {"query": F.interpolate(episode["query"], (SMALL, SMALL), mode="bilinear", align_corners=True),
            "supports": F.interpolate(episode["supports"][0], (SMALL, SMALL), mode="bilinear",
                                      align_corners=True)[None],
            "masks": F.interpolate(episode["masks"], (SMALL, SMALL), mode="nearest")}


def make_model(backbones, method: str, backbone: str, seed: int, **kw) -> FewShotSegmenter:
    torch.manual_seed(seed)
    bb = copy.deepcopy(backbones[backbone])
    head = build_head(method, bb, **kw)
    for p in head.parameters():  # make every head weight differ between seeds, merges included
        p.data.add_(0.05 * torch.randn_like(p))
    for name, buf in head.named_buffers():
        if "running_var" in name:
            buf.uniform_(0.5, 2.0)
        elif "running_mean" in name:
            buf.normal_(0, 0.1)
    return FewShotSegmenter(bb, head).eval()


def save_official(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "best.pth") -> Path:
    path = tmp_path / name
    torch.save({"state_dict": {"module." + k: v.clone() for k, v in state.items()}}, path)
    return path


# ------------------------------------------------------------------------------------------------
# layouts


@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_matches_official_layout(backbones, backbone):
    model = FewShotSegmenter(backbones[backbone], build_head("baseline", backbones[backbone]))
    ours = {k: tuple(v.shape) for k, v in official_state_dict(model).items() if k.startswith("layer")}
    assert ours == official_backbone_keys(backbone)
    with torch.no_grad():
        sizes = {k: v.shape[-1] for k, v in backbones[backbone](torch.zeros(1, 3, SIZE, SIZE)).items()}
    if backbone == "resnet50_deepstem":
        assert sizes == {"layer0": 17, "layer1": 17, "layer2": 9, "layer3": 9, "layer4": 9}
        for stage, dilation in (("layer3", 2), ("layer4", 4)):
            for n, m in getattr(backbones[backbone], stage).named_modules():
                if n.endswith("conv2"):
                    assert (m.dilation, m.padding, m.stride) == ((dilation,) * 2, (dilation,) * 2, (1, 1))
                if n.endswith("downsample.0"):
                    assert m.stride == (1, 1)
    else:  # ceil_mode=True max-pooling as PFENet's vgg.py: 65 -> 33 -> 17 -> 9 -> 5
        assert sizes == {"layer0": 33, "layer1": 17, "layer2": 9, "layer3": 5, "layer4": 5}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method", METHODS)
def test_head_matches_official_layout(backbones, method, backbone):
    bb = backbones[backbone]
    for shot in (1, 5) if method == "bam" else (1,):
        head = build_head(method, bb, shot=shot)
        model = FewShotSegmenter(bb, head)
        ours = {k: tuple(v.shape) for k, v in official_state_dict(model).items() if not k.startswith("layer")}
        assert ours == official_head_keys(method, FEA_DIM[backbone], HIGH_DIM[backbone], shot)
    if backbone == "resnet50_deepstem":
        assert ours["down_query.0.weight"] == (256, 1536, 1, 1)
        learnable = sum(p.numel() for n, p in head.named_parameters() if not n.startswith("learner_base"))
        # PFENet paper: 10.8M learnable parameters; BAM paper: 4.9M (its meta learner, = the baseline).
        assert round(learnable / 1e6, 1) == {"pfenet": 10.8, "baseline": 4.9, "bam": 4.9}[method]


# ------------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method", METHODS)
def test_load_official_reproduces_predictions(backbones, episode, small_episode, tmp_path, method, backbone):
    shot = 5 if method == "bam" and backbone == "vgg16_bn" else 1  # BAM 5-shot covers kshot_rw
    # one case at the official FEM scales and 65x65, the others cheaper
    official = method == "pfenet" and backbone == "resnet50_deepstem"
    kw = FAST_BINS if method == "pfenet" and not official else {}
    source = make_model(backbones, method, backbone, seed=1, shot=shot, **kw)
    state = official_state_dict(source)
    path = save_official(tmp_path, state)
    target = backbone if method == "pfenet" else copy.deepcopy(backbones[backbone])  # name and instance
    loaded = load_official(path, method, target, shot=shot, **kw)
    assert not loaded.training
    ep, size = (episode, SIZE) if official else (small_episode, SMALL)
    q, s, m = ep["query"], ep["supports"][:, :shot], ep["masks"][:, :shot]
    with torch.no_grad():
        expected, got = source(q, s, m), loaded(q, s, m)
    assert got.shape == (1, 2, size, size)
    assert torch.equal(got, expected)
    assert expected.flatten(2).std(2).min() > 0  # not a constant map
    reloaded = official_state_dict(loaded)
    assert reloaded.keys() == state.keys() and all(torch.equal(reloaded[k], state[k]) for k in state)


def test_load_official_is_strict(backbones, tmp_path):
    model = make_model(backbones, "pfenet", "vgg16_bn", seed=3)
    state = official_state_dict(model)

    def fails(bad: dict, *needles: str, method: str = "pfenet", shot: int = 1) -> None:
        with pytest.raises(CheckpointError) as err:
            load_official(save_official(tmp_path, bad), method, copy.deepcopy(backbones["vgg16_bn"]),
                          shot=shot)
        for needle in needles:
            assert needle in str(err.value)

    fails({k: v for k, v in state.items() if k != "down_query.0.weight"}, "missing keys", "down_query.0.weight")
    fails({k: v for k, v in state.items() if k != "layer3.6.weight"}, "missing keys", "layer3.6.weight")
    fails({**state, "extra.weight": torch.zeros(1)}, "unexpected keys", "extra.weight")
    fails({**state, "cls.3.weight": torch.zeros(3, 256, 1, 1)}, "shape mismatches", "cls.3.weight", "(3, 256, 1, 1)")
    bam5 = official_state_dict(make_model(backbones, "bam", "vgg16_bn", seed=3, shot=5))
    fails(bam5, "kshot_rw.0.weight", "shot=K", method="bam", shot=1)
    # num_batches_tracked counters are optional (pre-0.4.1 checkpoints lack them)
    load_official(save_official(tmp_path, {k: v for k, v in state.items() if "num_batches" not in k}),
                  "pfenet", copy.deepcopy(backbones["vgg16_bn"]))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_official(tmp_path / "junk.pth", "pfenet", backbones["vgg16_bn"])


def test_bam_base_classes_read_from_checkpoint(backbones, tmp_path):
    model = make_model(backbones, "bam", "vgg16_bn", seed=4, base_classes=61)  # COCO-20i base learner
    loaded = load_official(save_official(tmp_path, official_state_dict(model)), "bam",
                           copy.deepcopy(backbones["vgg16_bn"]))
    assert loaded.head.learner_base[1][4].out_channels == 61


# ------------------------------------------------------------------------------------------------
# forward behaviour


@pytest.mark.parametrize("method", METHODS)
def test_forward_shapes_and_aux(backbones, small_episode, method):
    n = SMALL
    model = make_model(backbones, method, "resnet50_deepstem", seed=5, **(FAST_BINS if method == "pfenet" else {}))
    ep = small_episode
    for b, k in ((2, 1), (1, 5)):
        q = ep["query"].expand(b, -1, -1, -1)
        s, m = ep["supports"][:, :k].expand(b, -1, -1, -1, -1), ep["masks"][:, :k].expand(b, -1, -1, -1)
        with torch.no_grad():
            out = model(q, s, m)
        assert out.shape == (b, 2, n, n) and torch.isfinite(out).all()
    q, s, m = ep["query"].expand(2, -1, -1, -1), s[:, :2].expand(2, -1, -1, -1, -1), m[:, :2].expand(2, -1, -1, -1)
    model.backbone.requires_grad_(False)
    model.train()
    logits, aux = model.segment(q, model.encode_supports(s, m), return_aux=True)
    assert logits.shape == (2, 2, n, n)
    expected_aux = {"pfenet": [(2, 2, n, n)] * 4, "baseline": [], "bam": [(2, 2, n, n), (2, 16, n, n)]}[method]
    assert [tuple(a.shape) for a in aux] == expected_aux
    loss = F.cross_entropy(logits, (m[:, 0] > 0).long()) + sum(a[:, :2].mean() for a in aux)
    loss.backward()
    assert model.head.down_query[0].weight.grad.abs().sum() > 0
    if method == "bam":  # base learner frozen; in training its map excludes the episode's own base class
        assert not any(p.requires_grad for p in model.head.learner_base.parameters())
        cache = model.encode_supports(s, m)
        torch.manual_seed(0)
        plain = model.segment(q, cache)
        torch.manual_seed(0)
        own = model.segment(q, {**cache, "base_class_index": torch.tensor([2, 5])})
        assert torch.equal(own[:, 1], plain[:, 1]) and not torch.allclose(own[:, 0], plain[:, 0])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_segment_resizes_like_official(backbones, episode, backbone):
    """The official eval forward returns logits interpolated (bilinear, align_corners=True) to
    ((H-1)/8*8+1, (W-1)/8*8+1); for such inputs that is the query size, which segment() returns."""
    model = make_model(backbones, "pfenet", backbone, seed=6, **FAST_BINS)
    with torch.no_grad():
        cache = model.encode_supports(episode["supports"][:, :1], episode["masks"][:, :1])
        raw = model.head.segment(model.backbone, episode["query"], cache)
        ours = model.segment(episode["query"], cache)
    assert raw.shape[-1] == {"resnet50_deepstem": 9, "vgg16_bn": 5}[backbone]
    h = int((SIZE - 1) / 8 * 8 + 1)
    assert torch.equal(ours, F.interpolate(raw, size=(h, h), mode="bilinear", align_corners=True))


def test_prior_mask_is_max_cosine_min_max_normalised():
    torch.manual_seed(7)
    q, s = torch.randn(2, 16, 5, 4), torch.randn(2, 3, 16, 6, 5)
    s[:, :, :, :2] = 0  # masked-out support positions
    prior = prior_mask(q, s)
    for b in range(2):
        for k in range(3):
            cos = F.cosine_similarity(q[b].flatten(1)[:, :, None], s[b, k].flatten(1)[:, None, :], dim=0)
            best = cos.max(1).values
            ref = (best - best.min()) / (best.max() - best.min())
            torch.testing.assert_close(prior[b, k].flatten(), ref, atol=1e-5, rtol=0)


def test_bam_kshot_reweighting_is_order_invariant(backbones, small_episode):
    episode = small_episode
    model = make_model(backbones, "bam", "vgg16_bn", seed=8, shot=5)
    s, m = episode["supports"], episode["masks"]
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        a = model(episode["query"], s, m)
        b = model(episode["query"], s[:, perm], m[:, perm])
        cache = model.encode_supports(s, m)
        est = torch.rand(1, 5)
        w = model.head.shot_weights(est)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.allclose(w.sum(1), torch.ones(1)) and w.std() > 0  # learned, not uniform
    torch.testing.assert_close(model.head.shot_weights(est[:, perm]), w[:, perm])
    assert cache["supp_gram"].shape == (1, 5, 256, 256)  # layer2 Gram matrices
    assert torch.equal(model.head.shot_weights(torch.rand(1, 3)), torch.full((1, 3), 1 / 3))


# ------------------------------------------------------------------------------------------------
# SVF checkpoints


def svd_official(weight: torch.Tensor, rng: torch.Generator) -> dict[str, torch.Tensor]:
    """zechao-li/SVF-pytorch resolver on one conv: rank floor(min(Co, Ci*k*k) / 4) * 4, then a
    "fine-tuned" vector_S (scaled singular values)."""
    co, ci, kh, kw = weight.shape
    rank = max(floor(min(co, ci * kh * kw) / 4) * 4, 1)
    u, s, vh = torch.linalg.svd(weight.reshape(co, -1).double(), full_matrices=False)
    s = s[:rank] * (1 + 0.2 * torch.rand(rank, generator=rng, dtype=torch.float64))
    return {"conv_V.weight": vh[:rank].reshape(rank, ci, kh, kw).float(), "vector_S": s.reshape(1, rank, 1, 1).float(),
            "conv_U.weight": u[:, :rank, None, None].float()}


@pytest.mark.parametrize("backbone,stages", [
    ("vgg16_bn", ("layer0", "layer2")),  # rank-24 stem conv, conv biases, two stages
    pytest.param("vgg16_bn", ("layer0", "layer1", "layer2", "layer3", "layer4"), marks=pytest.mark.slow),
    pytest.param("resnet50_deepstem", ("layer2", "layer3", "layer4"), marks=pytest.mark.slow),
])
def test_svf_checkpoint_round_trip(backbones, episode, tmp_path, backbone, stages):
    source = make_model(backbones, "baseline", backbone, seed=9)
    plain = official_state_dict(source)
    rng = torch.Generator().manual_seed(0)
    ckpt, recomposed = {}, {}
    for key, value in plain.items():
        if key.split(".")[0] in stages and value.dim() == 4:  # every conv of an SVF stage
            prefix = key[: -len(".weight")]
            parts = svd_official(value, rng)
            ckpt.update({f"{prefix}.{k}": v for k, v in parts.items()})
            r = parts["vector_S"].shape[1]
            recomposed[key] = ((parts["conv_U.weight"][:, :, 0, 0] * parts["vector_S"].view(1, r))
                               @ parts["conv_V.weight"].reshape(r, -1)).reshape(value.shape)
        elif key.split(".")[0] in stages and key.endswith(".bias") and key[:-5] + ".weight" in plain \
                and plain[key[:-5] + ".weight"].dim() == 4:
            ckpt[key[: -len(".bias")] + ".conv_U.bias"] = value
        else:
            ckpt[key] = value
    assert {f"{stages[-1]}.0.conv_V.weight", f"{stages[-1]}.0.conv1.conv_V.weight"} & ckpt.keys()
    loaded = load_official(save_official(tmp_path, ckpt), "baseline", copy.deepcopy(backbones[backbone]))

    layers = dict(svf_layers(loaded))
    assert {n.split(".")[1] for n in layers} == set(stages)
    assert all(isinstance(layer, SVFConv2d) for layer in layers.values())
    if backbone == "vgg16_bn":
        assert layers["backbone.layer0.0"].rank == 24  # 3*3*3 = 27 rounded down to a multiple of 4
    for stage in stages:  # only singular values train in SVF stages
        trainable = [n for n, p in getattr(loaded.backbone, stage).named_parameters() if p.requires_grad]
        assert trainable and all(n.endswith(".sv.s") for n in trainable)
    reloaded = official_state_dict(loaded)
    counters = {k for k in (*ckpt, *reloaded) if k.endswith("num_batches_tracked")}  # optional both ways
    assert reloaded.keys() - counters == ckpt.keys() - counters
    for k in reloaded.keys() & ckpt.keys():
        assert torch.equal(reloaded[k], ckpt[k]), k

    with torch.no_grad():
        for key, w in recomposed.items():  # reference: plain convs with the recomposed weights
            source.backbone.get_parameter(key).copy_(w)
        q, s, m = episode["query"], episode["supports"][:, :1], episode["masks"][:, :1]
        torch.testing.assert_close(loaded(q, s, m), source(q, s, m), atol=2e-4, rtol=1e-3)
