"""SVF core: exact decomposition on every conv of three backbones, parametrisations, forms, folding,
freezing and the trainable-parameter count.

Exactness is checked per conv: each conv with ``groups == 1`` gets a random input of its own
``in_channels`` at 9x9 (10x10 for the "same"-padded stems, where TF padding is asymmetric), so the
whole file needs one SVD per conv and no full-resolution forward pass.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from svf_model import build_backbone
from svf_model.svf import (
    SVFConv2d,
    SVFLinear,
    apply_svf,
    fold_svf,
    freeze_batchnorm,
    svf_layers,
    svf_parameters,
    svf_stats,
)

BACKBONES = ("efficientnet_lite2", "resnet50_deepstem", "vgg16_bn")
FORMS = ("three_layer", "recompose")
TOL64 = 1e-5
# Measured worst case over the three backbones (random and real weights): 5.1e-7 in both forms.
TOL32 = 1e-5
SPATIAL = 9

try:
    from timm.layers import Conv2dSame
except ImportError:  # pragma: no cover
    Conv2dSame = ()


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@functools.cache
def _backbone(name: str) -> nn.Module:
    # Only efficientnet_lite2 has embedded (real) weights; the others stay random and offline.
    return build_backbone(name, weights="auto" if name == "efficientnet_lite2" else None).eval()


@functools.cache
def decomposed(name: str) -> list[tuple[str, nn.Conv2d, SVFConv2d, torch.Tensor]]:
    """``(name, float64 conv, its float64 SVF layer, float64 input [1, Ci, 9, 9])`` per groups==1 conv."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for conv_name, conv in _backbone(name).named_modules():
        if isinstance(conv, nn.Conv2d) and conv.groups == 1:
            conv64 = copy.deepcopy(conv).double().requires_grad_(False)
            size = SPATIAL + 1 if isinstance(conv, Conv2dSame) else SPATIAL
            x = torch.randn(1, conv.in_channels, size, size, generator=gen, dtype=torch.float64)
            out.append((conv_name, conv64, SVFConv2d(conv64), x))
    return out


@pytest.mark.parametrize("name", BACKBONES)
def test_every_conv_is_decomposed_exactly_in_float64(name: str) -> None:
    layers = decomposed(name)
    assert len(layers) >= 13
    worst: dict[str, float] = {}
    for conv_name, conv, svf, x in layers:
        co, ci, kh, kw = conv.weight.shape
        assert svf.rank == min(co, ci * kh * kw), conv_name
        assert svf.singular_values().shape == (svf.rank,)
        assert svf.U.dtype == svf.Vh.dtype == torch.float64
        ref = conv(x)
        for form in FORMS:
            svf.form = form
            with torch.enable_grad():
                y = svf(x)
            assert y.requires_grad, "grad enabled + trainable s must take the training path"
            worst[form] = max(worst.get(form, 0.0), rel_err(y, ref))
            assert y.shape == ref.shape
        with torch.no_grad():
            y = svf(x)
        worst["no_grad"] = max(worst.get("no_grad", 0.0), rel_err(y, ref))
    assert max(worst.values()) < TOL64, worst


@pytest.mark.parametrize("name", BACKBONES)
def test_float32_bound(name: str) -> None:
    """The float32 SVF layer (SVD still in float64, factors stored in float32) stays within ``TOL32``."""
    worst = 0.0
    for _, conv64, svf64, x in decomposed(name):
        svf32 = copy.deepcopy(svf64).float()
        assert svf32.U.dtype == svf32.sv.s.dtype == torch.float32
        ref = conv64(x)
        for form in FORMS:
            svf32.form = form
            worst = max(worst, rel_err(svf32(x.float()), ref))
        with torch.no_grad():
            worst = max(worst, rel_err(svf32(x.float()), ref))
    assert worst < TOL32, worst


def test_float32_constructor_matches_float64_path() -> None:
    """Building from a float32 conv gives the same factors as casting the float64 layer."""
    for _, conv64, svf64, x in decomposed("efficientnet_lite2")[:8]:
        svf32 = SVFConv2d(copy.deepcopy(conv64).float())
        torch.testing.assert_close(svf32.U, svf64.U.float())
        torch.testing.assert_close(svf32.singular_values(), svf64.singular_values().float())
        assert rel_err(svf32(x.float()), conv64(x)) < TOL32


@pytest.mark.parametrize("name", BACKBONES)
def test_fold_reproduces_every_conv(name: str) -> None:
    for conv_name, conv, svf, x in decomposed(name):
        plain = svf.to_plain()
        assert type(plain) is type(conv), conv_name  # Conv2dSame stays Conv2dSame
        assert not plain.weight.requires_grad
        assert rel_err(plain(x), conv(x)) < TOL64, conv_name


def test_same_padding_stem_is_exercised() -> None:
    stems = [(n, c, s, x) for n, c, s, x in decomposed("efficientnet_lite2") if isinstance(c, Conv2dSame)]
    assert stems, "efficientnet_lite2 should have a timm Conv2dSame stem"
    for _, conv, svf, _ in stems:
        assert svf.same_pad and conv.stride == (2, 2)
        for size in (9, 10, 11, 64):  # odd and even: symmetric and asymmetric TF padding
            x = torch.randn(2, conv.in_channels, size, size, dtype=torch.float64)
            ref = conv(x)
            for form in FORMS:
                svf.form = form
                assert rel_err(svf(x), ref) < TOL64
            with torch.no_grad():
                assert rel_err(svf(x), ref) < TOL64
            assert rel_err(svf.to_plain()(x), ref) < TOL64


@functools.cache
def _lite2_classifier() -> nn.Linear:
    import timm

    from svf_model.backbones import load_efficientnet_lite_weights

    model = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    load_efficientnet_lite_weights(model, 2)
    return copy.deepcopy(model.classifier).double().requires_grad_(False)


def test_linear_classifier_is_decomposed_exactly() -> None:
    linear = _lite2_classifier()
    svf = SVFLinear(linear)
    assert svf.rank == min(linear.weight.shape) == 1000
    x = torch.randn(4, linear.in_features, dtype=torch.float64)
    ref = linear(x)
    for form in FORMS:
        svf.form = form
        y = svf(x)
        assert y.requires_grad and rel_err(y, ref) < TOL64
    with torch.no_grad():
        assert rel_err(svf(x), ref) < TOL64
    assert rel_err(svf.to_plain()(x), ref) < TOL64
    assert rel_err(svf.float()(x.float()), ref) < TOL32


def test_exp_parametrisation_starts_at_identity_and_trains_d() -> None:
    for _, conv, direct, x in decomposed("efficientnet_lite2")[:12]:
        svf = SVFConv2d(conv, parametrization="exp")
        assert torch.equal(svf.sv.d, torch.zeros_like(svf.sv.d))
        assert svf.sv.trainable is svf.sv.d and not hasattr(svf.sv, "s")
        ref = conv(x)
        g = torch.randn_like(ref)
        for form in FORMS:
            svf.form = direct.form = form
            svf.sv.d.grad = direct.sv.s.grad = None
            y = svf(x)
            assert rel_err(y, ref) < TOL64
            (y * g).sum().backward()
            (direct(x) * g).sum().backward()
            assert svf.sv.d.grad is not None and svf.sv.d.grad.abs().sum() > 0
            # chain rule at d = 0: dL/dd = s0 * dL/ds
            torch.testing.assert_close(svf.sv.d.grad, direct.sv.s.grad * svf.sv.s0, rtol=1e-9, atol=1e-12)
        direct.sv.s.grad = None


def test_both_forms_give_the_same_gradient() -> None:
    for _, conv, svf, x in decomposed("resnet50_deepstem")[:10]:
        g = torch.randn_like(conv(x))
        grads = []
        for form in FORMS:
            svf.form = form
            svf.sv.s.grad = None
            (svf(x) * g).sum().backward()
            grads.append(svf.sv.s.grad.clone())
        svf.sv.s.grad = None
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)
        # 1x1 conv: dL/ds_r = sum_{n,h,w} (U^T g)_r (Vh x)_r
        if conv.kernel_size == (1, 1) and conv.stride == (1, 1):
            ug = torch.einsum("or,nohw->nrhw", svf.U, g)
            vx = torch.einsum("ri,nihw->nrhw", svf.Vh, x)
            torch.testing.assert_close(grads[0], (ug * vx).sum((0, 2, 3)), rtol=1e-8, atol=1e-10)


def test_inference_cache_follows_updates_of_s() -> None:
    _, conv, svf, x = decomposed("vgg16_bn")[3]
    svf = copy.deepcopy(svf)
    with torch.no_grad():
        before = svf(x)
        svf.sv.s.mul_(torch.linspace(0.5, 1.5, svf.rank, dtype=torch.float64))
        after = svf(x)
    assert rel_err(after, before) > 1e-3
    svf.form = "recompose"
    assert rel_err(after, svf(x)) < TOL64
    svf.sv.s.requires_grad_(False)  # frozen s with grad enabled also takes the cached path
    assert not svf(x).requires_grad and rel_err(svf(x), after) < TOL64


def test_fold_svf_on_a_whole_tuned_backbone_with_same_padding() -> None:
    backbone = copy.deepcopy(_backbone("efficientnet_lite2")).double()
    stages = backbone.stages(["layer0", "layer1", "layer2", "layer3", "layer4"])
    apply_svf(stages)
    n_convs = sum(isinstance(m, nn.Conv2d) and m.groups == 1 for m in _backbone("efficientnet_lite2").modules())
    assert len(list(svf_layers(backbone))) == n_convs
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in svf_parameters(backbone):
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(1, 3, 64, 64, generator=gen, dtype=torch.float64)  # even: asymmetric "same" pad
    tuned = backbone(x)["layer4"]
    folded = fold_svf(copy.deepcopy(backbone))
    assert not list(svf_layers(folded))
    assert isinstance(folded.layer0[0], Conv2dSame)
    assert rel_err(folded(x)["layer4"], tuned) < TOL64
    with torch.no_grad():
        assert rel_err(backbone(x)["layer4"], tuned) < TOL64


def _resnet50_svf() -> nn.Module:
    backbone = build_backbone("resnet50", weights=None)
    gen = torch.Generator().manual_seed(0)
    for m in backbone.modules():  # timm zero-inits each block's last BN gamma: no gradient would reach s
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=gen)
    backbone.layer0.requires_grad_(False)
    backbone.layer1.requires_grad_(False)
    apply_svf(backbone.stages(["layer2", "layer3", "layer4"]))
    return backbone


def test_resnet50_layer2_to_4_trains_12544_singular_values_only() -> None:
    plain_total = sum(p.numel() for p in build_backbone("resnet50", weights=None).parameters())
    backbone = _resnet50_svf()
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 12_544
    assert {id(p) for p in trainable} == {id(p) for p in svf_parameters(backbone)}
    stats = svf_stats(backbone)
    assert stats.layers == 42 and stats.trainable == 12_544
    # SVF layers count Co*Ci*k*k (+ bias), frozen BN affine counts too: same total as the plain backbone.
    assert stats.total == plain_total
    assert round(100 * stats.fraction, 3) == 0.053  # of the whole backbone (layer0..layer4)
    assert round(100 * svf_stats(backbone.stages(["layer2", "layer3", "layer4"])).fraction, 3) == 0.054

    def running_stats() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in backbone.state_dict().items()
                if "running" in k and k.startswith(("layer2", "layer3", "layer4"))}

    bn_stats = running_stats()
    assert len(bn_stats) == 2 * 42  # 3 BNs in each of 13 blocks + 3 downsample BNs
    backbone.train()
    x = torch.randn(2, 3, 33, 33)
    backbone(x)["layer4"].sum().backward()
    for name, p in backbone.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    after = running_stats()
    assert all(torch.equal(bn_stats[k], after[k]) for k in bn_stats)


def test_depthwise_convs_are_skipped_unless_grouped_is_asked_for() -> None:
    backbone = copy.deepcopy(_backbone("efficientnet_lite2"))
    depthwise = [n for n, m in backbone.layer3.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    dense = [n for n, m in backbone.layer3.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    assert depthwise and dense
    apply_svf(backbone.layer3)
    modules = dict(backbone.layer3.named_modules())
    assert all(type(modules[n]) is nn.Conv2d and modules[n].groups > 1 for n in depthwise)
    assert sorted(n for n, _ in svf_layers(backbone.layer3)) == sorted(dense)
    apply_svf(backbone.layer3, kinds={"grouped"})
    assert sorted(n for n, _ in svf_layers(backbone.layer3)) == sorted(dense + depthwise)
    layer = dict(svf_layers(backbone.layer3))[depthwise[0]]
    assert layer.kind.endswith("depthwise") and layer.rank == layer.weight_shape[0]


@pytest.mark.parametrize(("groups", "channels", "kernel"), [(8, 8, 3), (4, 8, 3), (2, 6, 1)])
def test_grouped_convs_are_decomposed_group_by_group_exactly(groups: int, channels: int, kernel: int) -> None:
    """A depthwise conv gets one singular value per channel (its filter's norm); any grouped conv is
    rebuilt exactly in float64 by both forward forms, the folded plain conv and the cue components."""
    gen = torch.Generator().manual_seed(groups)
    conv = nn.Conv2d(channels, 2 * channels if kernel == 1 else channels, kernel, padding=kernel // 2,
                     groups=groups, bias=True).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(2, channels, 7, 7, generator=gen, dtype=torch.float64)
    svf = SVFConv2d(conv, parametrization="exp")
    co, ci_g, kh, kw = conv.weight.shape
    assert svf.rank == groups * min(co // groups, ci_g * kh * kw)
    if groups == channels == co:
        norms = conv.weight.reshape(co, -1).norm(dim=1)
        assert torch.allclose(svf.singular_values(), norms)
    ref = conv(x)
    with torch.no_grad():
        assert torch.allclose(svf(x), ref, atol=1e-10)
    for form in ("three_layer", "recompose"):
        svf.form = form
        assert torch.allclose(svf(x), ref, atol=1e-10), form
    assert torch.allclose(svf.to_plain()(x), ref, atol=1e-10)
    assert svf.components(x).shape == (2, svf.rank, 7, 7)
    svf.form = "three_layer"
    svf(x).sum().backward()
    assert svf.sv.d.grad is not None and svf.sv.d.grad.shape == (svf.rank,)


def _assert_exact_in_both_forms_and_folded(svf: SVFConv2d, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``svf`` gives ``conv``'s output on ``x`` in both forms (cached and with gradients) and folded;
    returns that output."""
    ref = conv(x)
    for form in ("three_layer", "recompose"):
        svf.form = form
        with torch.no_grad():
            assert torch.allclose(svf(x), ref, atol=1e-10), form
        svf.sv.d.requires_grad_(True)
        assert torch.allclose(svf(x), ref, atol=1e-10), form
    assert torch.allclose(svf.to_plain()(x), ref, atol=1e-10)
    return ref


@pytest.mark.parametrize(("groups", "channels", "kernel"), [(8, 8, 3), (4, 8, 3)])
def test_grouped_convs_with_a_shared_basis_fold_the_filter_bank_literally(groups: int, channels: int,
                                                                         kernel: int) -> None:
    """``grouped_fold="shared"`` decomposes the weight folded to ``Co x (Ci/g*kh*kw)`` once: rank
    ``min(Co, Ci/g*kh*kw)`` (9 for a 3x3 depthwise conv), the matrix's singular values, exact in both
    forms, folded and in the components; scaling one value changes every channel's filter."""
    gen = torch.Generator().manual_seed(groups + 10)
    conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=groups, bias=True).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(2, channels, 7, 7, generator=gen, dtype=torch.float64)
    svf = SVFConv2d(conv, parametrization="exp", grouped_fold="shared")
    co = conv.weight.shape[0]
    matrix = conv.weight.reshape(co, -1)
    assert svf.rank == min(matrix.shape) and svf.kind.endswith("shared")
    assert torch.allclose(svf.singular_values(), torch.linalg.svdvals(matrix))
    _assert_exact_in_both_forms_and_folded(svf, conv, x)
    assert svf.components(x).shape == (2, svf.rank, 7, 7)
    svf.form = "three_layer"
    svf(x).sum().backward()
    assert svf.sv.d.grad.shape == (svf.rank,) and svf.sv.d.grad.abs().sum() > 0
    with torch.no_grad():
        svf.sv.d[0] = 0.5
    changed = (svf.to_plain().weight - conv.weight).reshape(co, -1).norm(dim=1)
    assert (changed > 1e-6).all()


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_convs_folded_by_kernel_decompose_each_filter_as_a_matrix(stride: int) -> None:
    """``grouped_fold="kernel"``: each channel's 3x3 filter is a 3x3 matrix with 3 singular values
    (its own ``svdvals``), exact in both forms, folded and summed over the components; changing one
    value reshapes that channel's filter (not only its norm) and leaves the other channels alone."""
    gen = torch.Generator().manual_seed(stride)
    channels = 6
    conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=True).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(2, channels, 9, 9, generator=gen, dtype=torch.float64)
    svf = SVFConv2d(conv, parametrization="exp", grouped_fold="kernel")
    assert svf.rank == 3 * channels and svf.kind == "3x3 depthwise kernel"
    filters = conv.weight.detach()[:, 0]
    assert torch.allclose(svf.singular_values(), torch.linalg.svdvals(filters).reshape(-1))
    ref = _assert_exact_in_both_forms_and_folded(svf, conv, x)
    parts = svf.components(x)
    assert parts.shape == (2, svf.rank, *ref.shape[-2:])
    no_bias = ref - conv.bias[None, :, None, None]
    assert torch.allclose(parts.reshape(2, channels, 3, *ref.shape[-2:]).sum(2), no_bias, atol=1e-10)
    svf(x).sum().backward()
    assert svf.sv.d.grad.shape == (svf.rank,) and svf.sv.d.grad.abs().sum() > 0
    with torch.no_grad():
        svf.sv.d[1] = 0.5  # channel 0's second component
    tuned = svf.to_plain().weight.detach()[:, 0]
    assert not torch.allclose(tuned[0] / tuned[0].norm(), filters[0] / filters[0].norm())
    assert torch.allclose(tuned[1:], filters[1:], atol=1e-12)
    with pytest.raises(ValueError, match="needs a depthwise conv"):
        SVFConv2d(nn.Conv2d(8, 8, 3, groups=4), grouped_fold="kernel")
    with pytest.raises(ValueError, match="grouped_fold must be one of"):
        SVFConv2d(conv, grouped_fold="rows")


def test_kinds_1x1_only_touches_1x1_convs() -> None:
    backbone = build_backbone("resnet50", weights=None)
    convs = {n: m.kernel_size for n, m in backbone.layer2.named_modules() if isinstance(m, nn.Conv2d)}
    apply_svf(backbone.layer2, kinds={"1x1"})
    modules = dict(backbone.layer2.named_modules())
    for name, kernel in convs.items():
        if kernel == (1, 1):
            assert isinstance(modules[name], SVFConv2d), name
        else:
            assert type(modules[name]) is nn.Conv2d, name
    assert sum(k == (3, 3) for k in convs.values()) == 4
    with pytest.raises(ValueError, match="unknown SVF kinds"):
        apply_svf(backbone.layer3, kinds={"5x5"})


def test_freeze_batchnorm_keeps_statistics_in_train_mode() -> None:
    stage = freeze_batchnorm(copy.deepcopy(_backbone("efficientnet_lite2").layer1))
    before = copy.deepcopy(stage.state_dict())
    stage.train()
    stage(torch.randn(2, 16, 17, 17))
    assert all(torch.equal(before[k], v) for k, v in stage.state_dict().items())
