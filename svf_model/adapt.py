"""On-the-fly SVF adaptation to a user's shots: only the backbone's singular values train.

Episodes come from the supports alone:

* ``K >= 2``: leave-one-out - each support is the query of the other ``K - 1``.
* ``K = 1``: the support against augmented views of itself (scale/crop, flip, colour jitter).

By default a gate then scores the whole head on the supports before and after (``AdaptConfig.gate``)
and undoes an adaptation that did not raise that score.

The head and everything else stay frozen; BatchNorms are frozen by :func:`svf_model.apply_svf`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from .losses import segmentation_loss
from .model import FewShotSegmenter
from .svf import svf_layers, within

ONE_SHOT_MESSAGE = (
    "Adapt needs at least 2 shots: with one shot it can only learn from augmented copies of that "
    "shot, which did not help clearly on held-out classes (prototype-svf-lite2, 300 episodes: -0.3 IoU "
    "points, 15 % of them lost more than 5; refine-svf-lite2 with the support gate, 300 episodes: +0.6, "
    "s.e. 0.5). Add another shot and adapt again."
)
ONE_SHOT_LR = 0.01  # AdaptConfig.lr's default with one shot (adaptation against augmented views)
LEAVE_ONE_OUT_LR = 0.01  # and with two or more shots (leave-one-out episodes); 0.03 before 2026-12-06


def default_step_text() -> str:
    """The default step as a user reads it (labels, help texts): one number while both shot counts
    share it, else both with the shots each is for."""
    if ONE_SHOT_LR == LEAVE_ONE_OUT_LR:
        return f"{ONE_SHOT_LR:g}"
    return f"{ONE_SHOT_LR:g} with 1 shot, {LEAVE_ONE_OUT_LR:g} with more"


GROUPED_TRAINING = ("one_shot", "always", "never")


@dataclass
class AdaptConfig:
    """Adaptation settings (defaults chosen by measurement; see docs/adaptation.md).

    Attributes:
        steps: optimiser steps. With the shipped default model 30 instead of 10 made more episodes
            lose more than 5 IoU points at 1 shot (25 % against 13 %) and at 5 shots (docs/adaptation.md).
        lr: step size on ``d`` (``s = s0 exp(d)``); for the ``direct`` parametrisation it is scaled by
            each layer's mean singular value, so it is a relative step in both cases. ``None`` (the
            default): :data:`ONE_SHOT_LR` with one shot, :data:`LEAVE_ONE_OUT_LR` with two or more
            (:meth:`step_size`), each chosen on held-out fss-dev classes with the shipped default model
            (benchmarks/adapt_study.py; docs/adaptation.md). At 1 shot, 0.01 gained more than 0.03 on
            fss-dev's 15 held-out classes (+0.5 against +0.0 over 1,000 paired episodes, fewer losses; a
            fresh set of 300 then confirmed it: paired +0.5 +- 0.3) and half as much on kinds the recipe
            never saw (+0.5 against +1.1). At 5 shots, 0.01 against 0.03 (the default until
            2026-12-06, chosen on an earlier model): paired +0.6 +- 0.3 over 560 episodes in three
            sets, and 7 % against 13 % of them losing more than 5 IoU points.
        image_size: side the supports are resized to while adapting (smaller is faster).
        time_budget_s: stop early after this many seconds (``None``: no limit).
        seed: seeds the augmentations and anything random.
        views: number of augmented views for 1-shot episodes.
        view_hue: largest hue shift of the 1-shot views' colour jitter (0..0.5 of the colour wheel).
        view_grayscale: probability that a 1-shot view is turned grey.
        one_shot: ``"views"`` (1 shot: adapt against augmented views of the shot, with the support
            gate checking on fresh views) or ``"skip"`` (do nothing and say why). With the shipped
            default model, the gate and the 1-shot step lr 0.01, 1,300 held-out 1-shot episodes of
            fss-dev's 15 classes changed by +0.5 IoU points (s.e. 0.14; 8 % lost more than 5), every
            kind of class gaining (animals, vehicles and pedestrians +0.6, garments +0.3,
            road/fence +0.9); on 19 kinds the recipe never saw (far-transfer split) +0.5 (s.e.
            0.25, 300 episodes) (docs/adaptation.md).
        optimizer: ``"layer_sgd"`` (gradient descent with each layer's gradient scaled to unit RMS:
            a scale-free step that keeps the relative sizes of the changes within a layer, which the
            cue panel shows) or ``"adam"`` (per-value normalisation: every value moves by about
            ``lr`` per step, so the changes carry little information about the components).
        modules: backbone module paths whose SVF layers adapt (e.g. ``["layer4.1"]``); ``None``:
            every SVF layer of the backbone. The predictor fills it from the model's registry entry.
        grouped: when the singular values of decomposed grouped (depthwise) convs train, for a model
            that decomposes them (registry ``adapt_grouped``): ``"one_shot"`` (with one shot only),
            ``"always"`` or ``"never"``. With the shipped default model and each depthwise filter
            decomposed (``adapt_grouped="kernel"``), 1 shot: +1.18 IoU points against +0.56 without
            them (paired +0.62 +- 0.14 over 1,020 held-out episodes in five sets, 7 % against 6 %
            losing more than 5); 5 shots: +0.64 +- 0.30 more, but 16.5 % against 11.5 % of 685
            episodes losing more than 5, at the 5-shot step then, 0.03; at today's, 0.01: +0.23
            +- 0.31 more, 13 % against 7 % of 380 episodes losing more than 5 (docs/adaptation.md).
        grouped_lr_scale: the step of the decomposed grouped convs' values relative to ``lr`` (when
            they train). With the shipped default model, 3 at 1 shot changed nothing on average
            (paired +0.02 +- 0.17 over 600 held-out episodes, 10 % against 8 % losing more than 5);
            0.33 at 5 shots gained less than the common step (paired -0.48 +- 0.39 over 385)
            (docs/adaptation.md).
        target: what trains: ``"svf"`` (singular values: the method), or for comparison ``"bn"``
            (BatchNorm affine of the SVF stages), ``"depthwise"`` (the filters of their grouped /
            depthwise convs, which SVF leaves whole), ``"dense"`` (every weight of exactly the convs
            whose singular values SVF trains, BatchNorm frozen as for SVF: the paper's "fine-tune
            W" of the same layers) and ``"full"`` (every weight of those stages).
            The comparison targets modify the model they are given: pass a copy.
        loss: ``"balanced"`` (the mean of the foreground and the background pixels'
            cross-entropies, so a small object weighs as much as its background) or ``"ce"`` (pixel
            cross-entropy). Measured on held-out fss-dev classes (docs/adaptation.md): with plain
            cross-entropy, 1-shot adaptation against views lost about 6 IoU points on average; with
            5 shots, the default model and the gate, 300 episodes: balanced +0.8 (s.e. 0.5), ce -0.5,
            paired +1.3 +- 0.6 for balanced.
        objective: whose logits the loss is computed on: ``"head"`` (the model's own head) or
            ``"prototype"`` (for a head with a learned refinement on prototype logits, such as
            ``prototype_refine``: the prototype logits alone, without priors or refinement; the
            predictions after adaptation still use the whole head). ``"auto"``: ``prototype`` when
            the head offers it (``head.prototype_only()``), else ``head``. With the default model
            ``head`` costs 2.3x the time of ``prototype`` (benchmarks/adapt_step.py: the priors
            compare every query position with every support position in each leave-one-out step)
            and did not clearly gain more (docs/adaptation.md).
        gate: ``"support"``: after training, score the whole head on the supports before and after
            (pooled foreground IoU of the leave-one-out predictions; with one shot, of the shot
            against fresh augmented views it did not train on) and keep the adaptation only if the
            score rose by more than ``gate_margin``; otherwise restore the singular values and say so
            (``AdaptResult.reverted``). ``"off"``: always keep. The score uses only the supports.
        gate_margin: IoU (0..1) the support score must gain for the adaptation to be kept.
    """

    steps: int = 10
    lr: float | None = None
    image_size: int | None = 321
    time_budget_s: float | None = 60.0
    seed: int = 0
    views: int = 4
    view_hue: float = 0.03
    view_grayscale: float = 0.0
    one_shot: str = "views"
    optimizer: str = "layer_sgd"
    modules: list[str] | None = None
    grouped: str = "one_shot"
    grouped_lr_scale: float = 1.0
    target: str = "svf"
    loss: str = "balanced"
    objective: str = "auto"
    gate: str = "support"
    gate_margin: float = 0.0

    def step_size(self, shots: int) -> float:
        """The learning rate used with ``shots`` supports: ``lr``, or by default :data:`ONE_SHOT_LR` with
        one shot and :data:`LEAVE_ONE_OUT_LR` with more."""
        if self.lr is not None:
            return self.lr
        return ONE_SHOT_LR if shots == 1 else LEAVE_ONE_OUT_LR

    def trains_grouped(self, shots: int) -> bool:
        """Whether the values of decomposed grouped convs train with ``shots`` supports."""
        if self.grouped not in GROUPED_TRAINING:
            raise ValueError(f"grouped must be one of {', '.join(GROUPED_TRAINING)}, got {self.grouped!r}")
        return self.grouped == "always" or (self.grouped == "one_shot" and shots == 1)

    def resolved(self, shots: int) -> AdaptConfig:
        """A copy with ``lr`` set to :meth:`step_size` for ``shots`` supports (what runs record)."""
        return dataclasses.replace(self, lr=self.step_size(shots))


def parse_config_options(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=0.01", "one_shot=views", "modules=layer4+layer3.5"]`` -> :class:`AdaptConfig` keyword
    arguments, each typed like the field's default (``none`` -> None; ``+`` separates modules).

    Raises:
        ValueError: an item that is not ``KEY=VALUE`` with an AdaptConfig field as ``KEY``.
    """
    hints = typing.get_type_hints(AdaptConfig)
    kinds = {f.name: _value_type(hints[f.name]) for f in dataclasses.fields(AdaptConfig)}
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in kinds:
            raise ValueError(f"{item!r}: expected KEY=VALUE with an AdaptConfig field as KEY")
        kind = kinds[key]
        if value.lower() == "none":
            options[key] = None
        elif key == "modules":
            options[key] = value.split("+")
        elif kind is bool:
            options[key] = value.lower() in ("1", "true", "yes")
        elif kind is int:
            options[key] = int(float(value))
        elif kind is float:
            options[key] = float(value)
        else:
            options[key] = value
    return options


def _value_type(hint: Any) -> type:  # noqa: ANN401
    """The type a field annotated ``hint`` holds when it is not None (``float | None`` -> float)."""
    kinds = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
    return typing.get_origin(kinds[0]) or kinds[0]


class LayerNormalizedSGD(torch.optim.Optimizer):
    """SGD whose step for each parameter tensor is ``lr * g / rms(g)``.

    One tensor is one layer's singular values, so the step size does not depend on the layer's
    gradient scale while the values inside a layer keep their relative gradient sizes.
    """

    def __init__(self, params, lr: float = 0.01, eps: float = 1e-12) -> None:  # noqa: ANN001
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim.Optimizer signature
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad
                    p.sub_(g / (g.pow(2).mean().sqrt() + group["eps"]), alpha=group["lr"])
        return None


@dataclass
class AdaptProgress:
    step: int
    steps: int
    loss: float
    seconds: float


@dataclass
class AdaptResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    cancelled: bool = False
    out_of_time: bool = False
    skipped: str | None = None
    note: str | None = None  # what adaptation measurably does to this model (registry ``adapt_note``)
    support_iou_before: float | None = None  # gate scores (``AdaptConfig.gate``), IoU 0..1
    support_iou_after: float | None = None
    reverted: bool = False  # the gate restored the singular values
    lr: float | None = None  # the learning rate used (AdaptConfig.step_size)

    def gate_fields(self) -> dict[str, Any]:
        """``{"reverted", "support_iou_before", "support_iou_after"}`` for reports (scores None without a gate)."""
        return {"reverted": self.reverted, "support_iou_before": self.support_iou_before,
                "support_iou_after": self.support_iou_after}

    @property
    def gate_message(self) -> str | None:
        """What the gate decided, for people (``None`` without a gate)."""
        if self.support_iou_before is None or self.support_iou_after is None:
            return None
        scores = f"{100 * self.support_iou_before:.1f} -> {100 * self.support_iou_after:.1f} % IoU on the shots"
        if self.reverted:
            return f"adaptation did not improve the shots' cross-check ({scores}): the model is unchanged"
        return f"shots' cross-check {scores}"


def _resize(supports: torch.Tensor, masks: torch.Tensor, size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if size is None or size == supports.shape[-1]:
        return supports, masks
    x = F.interpolate(supports, (size, size), mode="bilinear", align_corners=False, antialias=True)
    m = F.interpolate(masks[:, None], (size, size), mode="nearest-exact")[:, 0]
    return x, m


def augmented_views(
    image: torch.Tensor,
    mask: torch.Tensor,
    n: int,
    mean: tuple,
    std: tuple,
    generator_seed: int,
    hue: float = 0.03,
    grayscale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` jointly augmented views of one normalised ``image [3, S, S]`` and ``mask [S, S]``
    (random resized crop, flip, colour jitter with hue shifts up to ``hue``, grey with probability
    ``grayscale``).

    Returns ``views [n, 3, S, S]`` (normalised) and ``masks [n, S, S]`` (255 where undefined).
    """
    size = image.shape[-1]
    mean_t = torch.tensor(mean, device=image.device)[:, None, None]
    std_t = torch.tensor(std, device=image.device)[:, None, None]
    rgb = (image * std_t + mean_t).clamp(0, 1)
    steps = [
        v2.RandomResizedCrop(size, scale=(0.45, 1.0), ratio=(0.75, 1.333), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=hue),
    ]
    if grayscale > 0:  # only then: RandomGrayscale draws a number even at p=0, which would change the views
        steps.append(v2.RandomGrayscale(grayscale))
    transform = v2.Compose(steps)
    state = torch.random.get_rng_state()
    torch.manual_seed(generator_seed)
    views, masks = [], []
    try:
        for _ in range(n):
            img_t, msk_t = transform(tv_tensors.Image(rgb), tv_tensors.Mask(mask[None]))
            views.append((img_t.as_subclass(torch.Tensor) - mean_t) / std_t)
            masks.append(msk_t.as_subclass(torch.Tensor)[0])
    finally:
        torch.random.set_rng_state(state)
    return torch.stack(views), torch.stack(masks)


def adapted_layers(
    model: FewShotSegmenter, modules: list[str] | None, grouped: bool = True
) -> list[tuple[str, object]]:
    """The SVF layers of ``model.backbone`` inside ``modules`` (all of them when ``None``), without
    those of grouped convs unless ``grouped``."""
    layers = list(svf_layers(model.backbone))
    if modules is not None:
        layers = [(n, m) for n, m in layers if within(n, modules)]
    if not grouped:
        layers = [(n, m) for n, m in layers if m.groups == 1]
    if not layers:
        which = "" if grouped else " (grouped convs' values left out)"
        raise ValueError(f"no SVF layers to adapt in {modules or 'the backbone'}{which}")
    return layers


@contextlib.contextmanager
def _only_singular_values_train(
    model: FewShotSegmenter, config: AdaptConfig, grouped: bool = True
) -> Iterator[list[tuple[torch.nn.Parameter, float]]]:
    """Make exactly the SVF parameters of ``config.modules`` trainable (grouped convs' only if
    ``grouped``); restore every ``requires_grad`` afterwards. Yields ``(parameter, step scale)`` pairs;
    grouped convs' scales are multiplied by ``config.grouped_lr_scale``."""
    layers = adapted_layers(model, config.modules, grouped)
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for _, layer in layers:
        p = layer.sv.trainable
        p.requires_grad_(True)
        scale = 1.0 if layer.sv.parametrization == "exp" else float(layer.sv.s0.abs().mean())
        params.append((p, scale * (config.grouped_lr_scale if layer.groups > 1 else 1.0)))
    try:
        yield params
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


BASELINE_TARGETS = ("bn", "depthwise", "dense", "full")


def _stage_parameters(roots: list[torch.nn.Module], target: str) -> list[torch.nn.Parameter]:
    """The weights of ``roots`` that ``target`` (``bn``, ``depthwise`` or ``full``) trains; BatchNorm's
    affine buffers become parameters on the way."""
    params = []
    for root in roots:
        for module in root.modules():
            if "BatchNorm" in type(module).__name__:
                if target == "depthwise":
                    continue
                for key in ("weight", "bias"):
                    value = module._buffers.pop(key, None)
                    if value is not None:
                        setattr(module, key, torch.nn.Parameter(value.clone()))
                    tensor = getattr(module, key, None)
                    if isinstance(tensor, torch.nn.Parameter):
                        params.append(tensor)
            elif target == "full":
                params.extend(module.parameters(recurse=False))
            elif target == "depthwise" and isinstance(module, torch.nn.Conv2d) and module.groups > 1:
                params.append(module.weight)
    return params


def _baseline_target(target: str):
    """Comparison targets (see ``AdaptConfig.target``) on the stages that hold SVF layers: those
    layers are folded back to plain convs and the chosen weights become trainable parameters (BN
    stays in eval). ``dense`` takes the decomposed grouped convs only where SVF would train their
    values (the trainer's ``grouped``)."""
    if target not in BASELINE_TARGETS:
        raise ValueError(f"target must be svf, {', '.join(BASELINE_TARGETS[:-1])} or full, got {target!r}")

    @contextlib.contextmanager
    def trainer(
        model: FewShotSegmenter, config: AdaptConfig, grouped: bool = True
    ) -> Iterator[list[tuple[torch.nn.Parameter, float]]]:
        from .svf import fold_svf

        stages = sorted({name.rsplit(".", 1)[0] for name, _ in adapted_layers(model, config.modules)})
        decomposed = [name for name, _ in adapted_layers(model, config.modules, grouped)]
        roots = [model.backbone.get_submodule(s) for s in stages]
        if target == "depthwise" and not any(getattr(m, "groups", 1) > 1 for r in roots for m in r.modules()):
            raise ValueError(f"target 'depthwise': no grouped or depthwise convs in {', '.join(stages)}")
        fold_svf(roots)
        for p in model.parameters():
            p.requires_grad_(False)
        if target == "dense":
            params = [p for name in decomposed for p in model.backbone.get_submodule(name).parameters(recurse=False)]
        else:
            params = _stage_parameters(roots, target)
        for p in params:
            p.requires_grad_(True)
        yield [(p, 1.0) for p in params]

    return trainer


def episode_loss(model: FewShotSegmenter, episode: tuple[torch.Tensor, ...], loss: str = "balanced") -> torch.Tensor:
    """Loss of one batch of adaptation episodes (``loss``: ``ce`` or ``balanced``, see AdaptConfig and
    :func:`svf_model.losses.segmentation_loss`; 255 ignored)."""
    head, backbone = model.head, model.backbone
    if len(episode) == 2:
        images, masks = episode
        logits = head.leave_one_out_logits(backbone, images, masks)
        target = masks
    else:
        support, support_mask, views, view_masks = episode
        logits = head.cross_logits(backbone, support, support_mask, views)
        target = view_masks
    logits = F.interpolate(logits, target.shape[-2:], mode="bilinear", align_corners=True)
    return segmentation_loss(logits, target, loss)


@torch.no_grad()
def support_score(model: FewShotSegmenter, episode: tuple[torch.Tensor, ...]) -> float:
    """Pooled foreground IoU (0..1) of the whole head on an adaptation episode: the leave-one-out
    predictions (``(images, masks)``) or the shot against views (``(support, mask, views, masks)``);
    255 ignored. 1.0 when there is no foreground anywhere and none is predicted."""
    head, backbone = model.head, model.backbone
    if len(episode) == 2:
        images, target = episode
        logits = head.leave_one_out_logits(backbone, images, target)
    else:
        support, support_mask, views, target = episode
        logits = head.cross_logits(backbone, support, support_mask, views)
    logits = F.interpolate(logits, target.shape[-2:], mode="bilinear", align_corners=True)
    pred, valid = logits.argmax(1) == 1, target != 255
    truth = target == 1
    inter = (pred & truth & valid).sum().item()
    union = ((pred | truth) & valid).sum().item()
    return inter / union if union else 1.0


def adaptation_objective(model: FewShotSegmenter, objective: str) -> contextlib.AbstractContextManager:
    """Context in which ``model.head`` computes the logits the adaptation loss uses (see
    ``AdaptConfig.objective``)."""
    if objective not in ("auto", "head", "prototype"):
        raise ValueError(f"objective must be auto, head or prototype, got {objective!r}")
    prototype_only = getattr(model.head, "prototype_only", None)
    if objective == "head" or (objective == "auto" and prototype_only is None):
        return contextlib.nullcontext()
    if prototype_only is None:
        raise ValueError(f"the {type(model.head).__name__} head has no prototype-only objective")
    return prototype_only()


def adapt_svf(
    model: FewShotSegmenter,
    supports: torch.Tensor,
    masks: torch.Tensor,
    config: AdaptConfig,
    progress: Callable[[AdaptProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> AdaptResult:
    """Fine-tune the singular values of ``model.backbone`` in place on episodes built from the supports.

    Args:
        model: a segmenter whose backbone holds SVF layers (the stages to adapt).
        supports: ``[K, 3, S, S]`` normalised, letterboxed support images.
        masks: ``[K, S, S]`` with 1 fg, 0 bg, 255 ignore.
        config: see :class:`AdaptConfig`.
        progress: called after every step.
        should_stop: polled between steps; when it returns True the singular values are restored
            to their values at the call and the result says ``cancelled``.
    """
    start = time.perf_counter()
    k = supports.shape[0]
    config = config.resolved(k)
    if k == 1 and config.one_shot == "skip":
        return AdaptResult(0, 0.0, skipped=ONE_SHOT_MESSAGE)
    torch.manual_seed(config.seed)
    images, labels = _resize(supports, masks, config.image_size)
    if config.gate not in ("off", "support"):
        raise ValueError(f"gate must be off or support, got {config.gate!r}")
    if k >= 2:
        episode = check = (images, labels)
    else:
        mean, std = model.backbone.mean, model.backbone.std
        colour = {"hue": config.view_hue, "grayscale": config.view_grayscale}
        views, view_masks = augmented_views(images[0], labels[0], config.views, mean, std, config.seed, **colour)
        episode = (images, labels, views, view_masks)
        if config.gate != "off":
            fresh, fresh_masks = augmented_views(
                images[0], labels[0], config.views, mean, std, config.seed + 1, **colour
            )
            check = (images, labels, fresh, fresh_masks)

    if config.loss not in ("ce", "balanced"):
        raise ValueError(f"loss must be balanced or ce, got {config.loss!r}")
    was_training = model.training
    model.eval()
    result = AdaptResult(0, 0.0, lr=config.lr)
    train_grouped = config.trains_grouped(k)
    trainer = _only_singular_values_train if config.target == "svf" else _baseline_target(config.target)
    objective = adaptation_objective(model, config.objective)
    with trainer(model, config, train_grouped) as params, model.backbone.memoize():
        initial = [p.detach().clone() for p, _ in params]
        if config.gate != "off":
            result.support_iou_before = support_score(model, check)
        _train(model, episode, params, config, objective, result, start, progress, should_stop)
        if config.gate != "off" and not result.cancelled and result.steps:
            result.support_iou_after = support_score(model, check)
            result.reverted = result.support_iou_after <= result.support_iou_before + config.gate_margin
        if result.cancelled or result.reverted:
            with torch.no_grad():
                for (p, _), p0 in zip(params, initial, strict=True):
                    p.copy_(p0)
    model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


def _train(
    model: FewShotSegmenter,
    episode: tuple[torch.Tensor, ...],
    params: list[tuple[torch.nn.Parameter, float]],
    config: AdaptConfig,
    objective: contextlib.AbstractContextManager,
    result: AdaptResult,
    start: float,
    progress: Callable[[AdaptProgress], None] | None,
    should_stop: Callable[[], bool] | None,
) -> None:
    """The optimisation loop of :func:`adapt_svf`; fills ``result`` (steps, losses, cancelled, out_of_time)."""
    with objective:
        groups = [{"params": [p], "lr": config.lr * scale} for p, scale in params]
        optimizer = torch.optim.Adam(groups) if config.optimizer == "adam" else LayerNormalizedSGD(groups)
        for step in range(config.steps):
            if should_stop is not None and should_stop():
                result.cancelled = True
                break
            if config.time_budget_s is not None and time.perf_counter() - start > config.time_budget_s:
                result.out_of_time = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss = episode_loss(model, episode, config.loss)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for p, _ in params:
                    if p.dim() and not torch.isfinite(p).all():
                        raise FloatingPointError("adaptation diverged (non-finite singular values)")
            result.steps = step + 1
            result.losses.append(float(loss.detach()))
            if progress is not None:
                progress(AdaptProgress(step + 1, config.steps, result.losses[-1], time.perf_counter() - start))
