"""Episodic meta-training of a few-shot head, with SVF on chosen backbone stages or a frozen backbone.

Command line::

    python -m svf_model.train --config configs/fssdev_lite2_svf.yaml [--set key=value ...] [--resume]
    torchrun --nproc_per_node 2 -m svf_model.train --config configs/tiny_test.yaml   # DDP

Every option is a field of :class:`TrainConfig` (documented in the YAML files under ``configs/``).
What trains: the head's parameters and, with ``mode: svf``, the singular values of the SVF stages;
everything else in the backbone (BatchNorm included) is frozen. For comparison (the SVF paper's
ablation), ``mode: full`` trains every parameter of those stages instead and ``mode: bn`` their
BatchNorm affine parameters (running statistics stay frozen; :class:`svf_model.model.TunedWeights`).
Loss: cross-entropy (ignore 255) on the main logits + ``aux_weight`` x the mean cross-entropy of the
auxiliary logits (PFENet).

Outputs in ``out``: ``model.safetensors`` (final: head + singular values, see
:mod:`svf_model.checkpoint`), ``best.safetensors`` (best validation mIoU), ``last.pt`` (resume
state, loadable with ``torch.load(weights_only=True)``), ``log.csv``, ``config.yaml``, TensorBoard
events (if ``tensorboard`` is importable), ``val_epochN.json``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from .backbones import STAGES, Backbone, build_backbone
from .checkpoint import matching_singular_values, read_checkpoint, save_checkpoint, trainable_state
from .data import (
    Coco20i,
    EpisodeDataset,
    EpisodeSource,
    FSSFolder,
    Letterbox,
    Pascal5i,
    TrainAugment,
    collate_episodes,
    list_classes,
    make_episodes,
    split_classes,
)
from .data.transforms import resize_logits
from .heads import build_head
from .losses import LOSSES, segmentation_loss
from .model import FewShotSegmenter, TunedWeights
from .svf import apply_svf, freeze_batchnorm, svf_parameters, svf_stats
from .weights import CheckpointError

logger = logging.getLogger("svf_model.train")


@dataclass
class TrainConfig:
    """Training options; see ``configs/*.yaml`` for the documented defaults."""

    # output / reproducibility
    out: str = "runs/default"
    seed: int = 0
    # data
    data: str = "folder"  # folder | pascal | coco
    data_root: str = "../shared/data/fss-dev"
    train_classes: list[str] | None = None
    val_classes: list[str] | None = None
    val_fraction: float = 0.2
    split_seed: int = 0
    fold: int = 0
    coco_split: str = "interleaved"
    exclude_novel: bool = True
    train_list: str | None = None
    val_list: str | None = None
    index_cache: str | None = None
    # model
    backbone: str = "efficientnet_lite2"
    backbone_weights: str = "imagenet"
    method: str = "pfenet"
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    mode: str = "svf"  # svf | frozen | full | bn (full, bn: comparison; svf_stages = the tuned stages)
    svf_stages: list[str] = field(default_factory=lambda: ["layer3", "layer4"])
    svf_kinds: list[str] = field(default_factory=lambda: ["1x1", "3x3"])
    parametrization: str = "direct"
    init_singular_values: str | None = None  # model file whose singular values start the SVF layers
    train_singular_values: bool = True  # false: they stay as initialised, only the head trains
    # episodes
    shots: int = 1
    image_size: int = 321
    batch_size: int = 4
    episodes_per_epoch: int = 1000
    epochs: int = 20
    sampling: str = "class"
    augment: bool = True
    scale: tuple[float, float] = (0.9, 1.1)
    rotate: float = 10.0
    color_jitter: float = 0.0
    # optimisation
    lr: float = 0.015
    head_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    svf_weight_decay: float | None = None
    scheduler: str = "cosine"  # cosine | poly | constant
    warmup_steps: int = 0
    min_lr: float = 0.0
    aux_weight: float = 1.0
    loss: str = "ce"  # ce | balanced (per episode: foreground and background pixels weigh the same)
    grad_clip: float | None = None
    # validation
    val_episodes: int = 100
    val_shots: int | None = None
    val_size: int | None = None
    val_seed: int = 0
    val_every: int = 1
    # runtime
    device: str = "auto"
    threads: int | None = None
    num_workers: int = 0
    amp: bool = False
    cache_features: bool = False
    cache_until: str = "layer2"
    log_every: int = 20
    tensorboard: bool = True
    find_unused_parameters: bool = False

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {', '.join(sorted(names))}")
        cfg = cls(**raw)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--set expects key=value, got {item!r}")
            raw[key.strip()] = yaml.safe_load(value)
        return cls.from_dict(raw)

    def validate(self) -> None:
        if self.mode not in ("svf", "frozen", *TunedWeights.KINDS):
            raise ValueError(f"mode must be svf, frozen, full or bn, got {self.mode!r}")
        if self.data not in ("folder", "pascal", "coco"):
            raise ValueError(f"data must be folder, pascal or coco, got {self.data!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.scheduler not in ("cosine", "poly", "constant"):
            raise ValueError(f"scheduler must be cosine, poly or constant, got {self.scheduler!r}")
        bad = [s for s in self.svf_stages if s not in STAGES]
        if bad:
            raise ValueError(f"unknown svf_stages {bad}; stages are {STAGES}")
        if self.cache_features:
            if self.augment:
                raise ValueError("cache_features needs augment: false (features are cached per image)")
            if self.cache_until not in STAGES[:-1]:
                raise ValueError(f"cache_until must be one of {STAGES[:-1]}")
            first_svf = min(STAGES.index(s) for s in self.svf_stages) if self.svf_stages else len(STAGES)
            if (self.trains_singular_values or self.tunes_weights) and STAGES.index(self.cache_until) >= first_svf:
                raise ValueError("cache_until must come before every SVF stage or tuned stage "
                                 "(cached stages must be frozen)")
        if self.init_singular_values and self.mode != "svf":
            raise ValueError("init_singular_values needs mode: svf (a frozen backbone has no SVF layers)")
        self.scale = tuple(self.scale)  # type: ignore[assignment]

    @property
    def trains_singular_values(self) -> bool:
        return self.mode == "svf" and self.train_singular_values

    @property
    def tunes_weights(self) -> bool:
        """A comparison mode that trains backbone weights (``full``, ``bn``) instead of singular values."""
        return self.mode in TunedWeights.KINDS

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scale"] = list(self.scale)
        return d


# ---------------------------------------------------------------------------------------------
# distributed helpers


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    """Set up DDP when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local), device


# ---------------------------------------------------------------------------------------------
# data / model


def build_sources(cfg: TrainConfig) -> tuple[EpisodeSource, EpisodeSource]:
    """Training and validation sources (disjoint classes)."""
    if cfg.data == "pascal":
        kw = dict(min_area=2048, index_cache=cfg.index_cache)
        return (Pascal5i(cfg.data_root, cfg.fold, "train", cfg.train_list, cfg.exclude_novel, **kw),
                Pascal5i(cfg.data_root, cfg.fold, "val", cfg.val_list, **kw))
    if cfg.data == "coco":
        kw = dict(class_split=cfg.coco_split, index_cache=cfg.index_cache)
        return (Coco20i(cfg.data_root, cfg.fold, "train", list_file=cfg.train_list, exclude_novel=cfg.exclude_novel,
                        **kw),
                Coco20i(cfg.data_root, cfg.fold, "val", list_file=cfg.val_list, **kw))
    classes = list_classes(cfg.data_root)
    if cfg.train_classes is None and cfg.val_classes is None:
        train, val = split_classes(classes, cfg.val_fraction, cfg.split_seed)
    else:
        val = cfg.val_classes or [c for c in classes if c not in set(cfg.train_classes or [])]
        train = cfg.train_classes or [c for c in classes if c not in set(val)]
    overlap = sorted(set(train) & set(val))
    if overlap:
        raise ValueError(f"train and val classes overlap: {overlap}")
    return FSSFolder(cfg.data_root, train), FSSFolder(cfg.data_root, val)


def build_model(cfg: TrainConfig) -> FewShotSegmenter:
    """Backbone (frozen, BN frozen) + head; with ``mode: svf`` SVF layers on ``svf_stages``; with
    ``full``/``bn`` those stages' weights / BatchNorm affine parameters trainable instead."""
    weights = None if cfg.backbone_weights == "random" else cfg.backbone_weights
    backbone = build_backbone(cfg.backbone, weights=weights)
    head = build_head(cfg.method, backbone, **cfg.head_kwargs)
    for p in backbone.parameters():
        p.requires_grad_(False)
    if cfg.mode == "svf":
        apply_svf(backbone.stages(cfg.svf_stages), kinds=cfg.svf_kinds, parametrization=cfg.parametrization)
    freeze_batchnorm(backbone)
    model = FewShotSegmenter(backbone, head)
    if cfg.init_singular_values:
        load_singular_values(model, cfg.init_singular_values)
    if not cfg.train_singular_values:
        for p in svf_parameters(backbone):
            p.requires_grad_(False)
    if cfg.tunes_weights:
        model.tuned_weights = TunedWeights(cfg.mode, tuple(cfg.svf_stages))
        for p in model.tuned_weights.tensors(backbone).values():
            p.requires_grad_(True)
    return model


def load_singular_values(model: FewShotSegmenter, path: str | os.PathLike) -> None:
    """Set every SVF layer of ``model`` to the singular values stored in the model file ``path``
    (checksum verified). The file must hold exactly these SVF layers, with the same shapes and
    parametrisation, for the same backbone; its head is ignored. Raises :class:`CheckpointError`."""
    tensors, meta = read_checkpoint(path)
    name = Path(path).name
    if meta.get("backbone") != model.backbone.name:
        raise CheckpointError(f"{name} holds singular values of {meta.get('backbone')}, not {model.backbone.name}")
    stored = matching_singular_values(model, tensors, name)
    with torch.no_grad():
        for key, value in trainable_state(model).items():
            if key in stored:
                value.copy_(stored[key])


def checkpoint_meta(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "backbone": cfg.backbone,
        "backbone_weights": cfg.backbone_weights,
        "method": cfg.method,
        "head_kwargs": cfg.head_kwargs,
        "svf_stages": cfg.svf_stages if cfg.mode == "svf" else [],
        "svf_kinds": cfg.svf_kinds if cfg.mode == "svf" else [],
        **({"tuned_weights": cfg.mode, "tuned_stages": cfg.svf_stages} if cfg.tunes_weights else {}),
        "parametrization": cfg.parametrization,
        **({"singular_values_from": Path(cfg.init_singular_values).name} if cfg.init_singular_values else {}),
        **({} if cfg.train_singular_values else {"singular_values_trained": "false"}),
        "image_size": cfg.val_size or cfg.image_size,
        "shots": cfg.shots,
        "training_data": f"{cfg.data}:{Path(cfg.data_root).name}"
        + (f":fold{cfg.fold}" if cfg.data != "folder" else ""),
    }


class PrefixFeatureCache:
    """Caches the frozen ``layer0..cache_until`` output of each (letterboxed, unaugmented) image.

    The training model then runs on a view of the backbone whose cached stages are identities and
    whose input is the cached feature map. Valid only for heads that read stages at or after
    ``cache_until`` (PFENet, baseline, BAM read layer2..layer4; the prototype head layer3/4).
    Features are kept on the CPU in ``float16``: e.g. EfficientNet-Lite2 at 321 px holds
    48 x 41 x 41 values per image at layer2 (~160 kB).
    """

    def __init__(self, backbone: Backbone, until: str, dtype: torch.dtype = torch.float16) -> None:
        self.stages = [getattr(backbone, s) for s in STAGES[: STAGES.index(until) + 1]]
        self.until = until
        self.dtype = dtype
        self.store: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """``images [N, 3, S, S]`` -> cached features ``[N, C, h, w]`` (float32, images' device)."""
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        if missing:
            x = images[missing]
            for stage in self.stages:
                x = stage(x)
            for i, feat in zip(missing, x, strict=True):
                self.store[keys[i]] = feat.to("cpu", self.dtype)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([self.store[k] for k in keys]).to(images.device, torch.float32)

    def view(self, backbone: Backbone) -> Backbone:
        """A backbone sharing the later stages of ``backbone``, identities before."""
        n = STAGES.index(self.until) + 1
        stages = [nn.Identity() for _ in range(n)] + [getattr(backbone, s) for s in STAGES[n:]]
        view = Backbone(backbone.name, stages, [backbone.channels[s] for s in STAGES],
                        [backbone.strides[s] for s in STAGES], backbone.mean, backbone.std)
        view.pretrained = backbone.pretrained
        return view


class EpisodeLoss(nn.Module):
    """``(query, supports, support_masks, query_mask) -> (loss, main, aux)``; the module DDP wraps."""

    def __init__(self, model: FewShotSegmenter, aux_weight: float = 1.0, loss: str = "ce") -> None:
        super().__init__()
        self.model = model
        self.aux_weight = aux_weight
        self.loss = loss

    def forward(self, query: torch.Tensor, supports: torch.Tensor, support_masks: torch.Tensor,
                query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = self.model.encode_supports(supports, support_masks)
        logits, aux = self.model.segment(query, cache, return_aux=True)
        size = query_mask.shape[-2:]
        main = segmentation_loss(resize_logits(logits.float(), size), query_mask, self.loss, per_sample=True)
        if aux:
            aux_loss = torch.stack([segmentation_loss(resize_logits(a.float(), size), query_mask, self.loss,
                                                      per_sample=True) for a in aux]).mean()
        else:
            aux_loss = main.new_zeros(())
        return main + self.aux_weight * aux_loss, main.detach(), aux_loss.detach()


def lr_lambda(cfg: TrainConfig, total_steps: int):  # noqa: ANN201 - Callable[[int], float]
    """Multiplier of the base LR at step ``t``: linear warm-up, then cosine / poly(0.9) / constant
    down to ``min_lr``."""

    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        floor = cfg.min_lr / cfg.lr if cfg.lr else 0.0
        if cfg.scheduler == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        if cfg.scheduler == "poly":
            return floor + (1 - floor) * (1 - t) ** 0.9
        return 1.0

    return fn


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# validation / logging


def validate(model: FewShotSegmenter, source: EpisodeSource, cfg: TrainConfig, device: torch.device) -> dict:
    """Evaluate a copy of ``model`` on the fixed validation episodes (``val_seed``)."""
    from .evaluate import evaluate, make_predictor

    shots = cfg.val_shots or cfg.shots
    episodes = make_episodes(source, cfg.val_episodes, shots, cfg.val_seed)
    frozen = copy.deepcopy(model).eval()
    predictor = make_predictor(frozen, cfg.val_size or cfg.image_size, str(device))
    return evaluate(predictor, episodes, progress=False, relpath=source.relpath,
                    config={"shots": shots, "episodes": cfg.val_episodes, "seed": cfg.val_seed})


class CsvLog:
    FIELDS = ("epoch", "step", "lr", "loss", "main_loss", "aux_loss", "val_miou", "val_fbiou", "seconds")

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            with path.open("w", newline="") as fh:
                csv.writer(fh).writerow(self.FIELDS)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as fh:
            csv.writer(fh).writerow([row.get(k, "") for k in self.FIELDS])


def _tensorboard(out: Path, enabled: bool):  # noqa: ANN202
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))


# ---------------------------------------------------------------------------------------------
# training


def train(cfg: TrainConfig, resume: str | os.PathLike | bool | None = None) -> dict[str, Any]:
    """Run training; returns ``{"out", "epochs", "best_miou", "history"}`` (rank 0's view)."""
    dist_info, device = init_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed + dist_info.rank)
    out = Path(cfg.out)
    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    train_source, val_source = build_sources(cfg)
    model = build_model(cfg).to(device)
    if cfg.tunes_weights:
        params_backbone = list(model.tuned_weights.tensors(model.backbone).values())
    else:
        params_backbone = svf_parameters(model.backbone) if cfg.trains_singular_values else []
    params_head = [p for p in model.head.parameters() if p.requires_grad]
    if not params_backbone and not params_head:
        raise ValueError(f"nothing to train: head {cfg.method!r} has no parameters and mode is {cfg.mode!r}")
    if dist_info.main:
        fixed = "" if cfg.trains_singular_values or cfg.mode != "svf" else " (singular values fixed)"
        logger.info("%s%s; head parameters: %d", svf_stats(model.backbone), fixed, sum(p.numel() for p in params_head))
        if cfg.tunes_weights:
            logger.info("comparison mode %s: %d backbone weights of %s train", cfg.mode,
                        sum(p.numel() for p in params_backbone), ", ".join(cfg.svf_stages))
    groups = []
    if params_backbone:
        wd = cfg.weight_decay if cfg.svf_weight_decay is None else cfg.svf_weight_decay
        groups.append({"params": params_backbone, "lr": cfg.lr, "weight_decay": wd, "name": "backbone"})
    if params_head:
        groups.append({"params": params_head, "lr": cfg.head_lr or cfg.lr, "weight_decay": cfg.weight_decay,
                       "name": "head"})
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)

    mean, std = model.backbone.mean, model.backbone.std
    transform = (TrainAugment(cfg.image_size, mean, cfg.scale, cfg.rotate, color_jitter=cfg.color_jitter)
                 if cfg.augment else Letterbox(cfg.image_size, mean))
    dataset = EpisodeDataset(train_source, cfg.shots, cfg.episodes_per_epoch, transform, cfg.seed, mode=cfg.sampling)
    sampler = (torch.utils.data.DistributedSampler(dataset, dist_info.world, dist_info.rank, shuffle=False,
                                                   drop_last=True) if dist_info.enabled else None)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, shuffle=False, num_workers=cfg.num_workers,
        collate_fn=partial(collate_episodes, size=cfg.image_size, mean=mean, std=std), drop_last=True,
        persistent_workers=cfg.num_workers > 0, worker_init_fn=_worker_init,
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("episodes_per_epoch is smaller than batch_size x processes: no step per epoch")
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

    feature_cache = PrefixFeatureCache(model.backbone, cfg.cache_until) if cfg.cache_features else None
    train_model = FewShotSegmenter(feature_cache.view(model.backbone), model.head) if feature_cache else model
    step_module: nn.Module = EpisodeLoss(train_model, cfg.aux_weight, cfg.loss)
    if dist_info.enabled:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters)

    start_epoch, best, history = 0, -1.0, []
    resume_path = out / "last.pt" if resume is True else (Path(resume) if resume else None)
    if resume_path is not None:
        start_epoch, best, history = _load_resume(resume_path, model, optimizer, scheduler)
        if dist_info.main:
            logger.info("resumed from %s at epoch %d", resume_path, start_epoch)

    log = CsvLog(out / "log.csv") if dist_info.main else None
    writer = _tensorboard(out, cfg.tensorboard) if dist_info.main else None
    meta = checkpoint_meta(cfg)
    for epoch in range(start_epoch, cfg.epochs):
        dataset.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        model.backbone.eval()  # frozen BN / no dropout in the backbone, always
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64)
        for i, batch in enumerate(loader):
            query, supports = batch["query"].to(device), batch["supports"].to(device)
            smasks, qmask = batch["support_masks"].to(device), batch["query_mask"].to(device)
            if feature_cache is not None:
                b, k = supports.shape[:2]
                query = feature_cache(query, batch["query_paths"])
                flat_paths = [p for paths in batch["support_paths"] for p in paths]
                supports = feature_cache(supports.flatten(0, 1), flat_paths).unflatten(0, (b, k))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                loss, main_loss, aux_loss = step_module(query, supports, smasks, qmask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            sums += torch.tensor([loss.item(), main_loss.item(), aux_loss.item()], dtype=torch.float64)
            step = epoch * steps_per_epoch + i + 1
            if dist_info.main and (step % cfg.log_every == 0 or i + 1 == steps_per_epoch):
                logger.info("epoch %d step %d/%d loss %.4f (main %.4f aux %.4f) lr %.5f", epoch + 1, i + 1,
                            steps_per_epoch, loss.item(), main_loss.item(), aux_loss.item(),
                            scheduler.get_last_lr()[0])
                if writer is not None:
                    writer.add_scalar("train/loss", loss.item(), step)
                    writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
        if dist_info.enabled:
            dist.all_reduce(sums)
            sums /= dist_info.world
        means = (sums / steps_per_epoch).tolist()
        row = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "lr": scheduler.get_last_lr()[0],
               "loss": means[0], "main_loss": means[1], "aux_loss": means[2]}
        if dist_info.main:
            if cfg.val_episodes > 0 and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                result = validate(model, val_source, cfg, device)
                row.update(val_miou=result["miou"], val_fbiou=result["fbiou"])
                (out / f"val_epoch{epoch + 1}.json").write_text(_json(result))
                if writer is not None:
                    writer.add_scalar("val/miou", result["miou"], epoch + 1)
                    writer.add_scalar("val/fbiou", result["fbiou"], epoch + 1)
                if result["miou"] > best:
                    best = result["miou"]
                    save_checkpoint(model, out / "best.safetensors", {**meta, "val_miou": f"{best:.3f}"})
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            log.write(row)  # type: ignore[union-attr]
            logger.info("epoch %d: loss %.4f val mIoU %s (%.1f s)", epoch + 1, row["loss"],
                        f"{row['val_miou']:.2f}" if "val_miou" in row else "-", row["seconds"])
            _save_resume(out / "last.pt", model, optimizer, scheduler, epoch + 1, best, history, cfg)
        if dist_info.enabled:
            dist.barrier()
    if dist_info.main:
        save_checkpoint(model, out / "model.safetensors", meta)
        if writer is not None:
            writer.close()
        if feature_cache is not None:
            logger.info("feature cache: %d images, %d hits, %d misses", len(feature_cache.store),
                        feature_cache.hits, feature_cache.misses)
    if dist_info.enabled:
        dist.barrier()
        dist.destroy_process_group()
    return {"out": str(out), "epochs": cfg.epochs, "best_miou": best, "history": history}


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=1)


def _save_resume(path: Path, model: FewShotSegmenter, optimizer: torch.optim.Optimizer,
                 scheduler: Any, epoch: int, best: float, history: list, cfg: TrainConfig) -> None:
    """Resume state: only tensors and plain Python values (``torch.load(weights_only=True)``)."""
    state = {
        "trainable": {k: v.detach().cpu().clone() for k, v in trainable_state(model).items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "best_miou": best,
        "history": history,
        "config": cfg.to_dict(),
        "torch_rng": torch.get_rng_state(),  # dropout in the head: resuming continues the same stream
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_resume(path: Path, model: FewShotSegmenter, optimizer: torch.optim.Optimizer,
                 scheduler: Any) -> tuple[int, float, list]:
    from .weights import CheckpointError

    if not path.is_file():
        raise CheckpointError(f"resume file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    own = trainable_state(model)
    if set(own) != set(state["trainable"]):
        raise CheckpointError(f"{path} does not fit this model (different head or SVF layers)")
    with torch.no_grad():
        for key, value in state["trainable"].items():
            own[key].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]), float(state["best_miou"]), list(state["history"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m svf_model.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML file (see configs/)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys (YAML values); repeat or list several")
    p.add_argument("--out", help="output folder (overrides the config's out)")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="resume from OUT/last.pt, or from the given file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")
    overrides = list(args.set) + ([f"out={args.out}"] if args.out else [])
    cfg = TrainConfig.from_yaml(args.config, overrides)
    return train(cfg, resume=args.resume)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
