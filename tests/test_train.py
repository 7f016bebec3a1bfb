"""Episodic training: config, what trains, feature caching, checkpoints, resume, DDP (torchrun)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from svf_model.checkpoint import load_checkpoint, save_checkpoint, trainable_state
from svf_model.data import EpisodeDataset, Letterbox, collate_episodes
from svf_model.svf import is_frozen_batchnorm
from svf_model.train import EpisodeLoss, PrefixFeatureCache, TrainConfig, build_model, build_sources, train
from svf_model.weights import CheckpointError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_test.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(fss_dev: Path, out: Path, *overrides: str) -> TrainConfig:
    return TrainConfig.from_yaml(TINY, [f"data_root={fss_dev}", f"out={out}", *overrides])


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_every_config_parses_and_bad_keys_fail():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        TrainConfig.from_yaml(path)
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="augment"):
        TrainConfig.from_dict({"cache_features": True, "augment": True})
    with pytest.raises(ValueError, match="before every SVF stage"):
        TrainConfig.from_dict({"cache_features": True, "augment": False, "cache_until": "layer3",
                               "svf_stages": ["layer3", "layer4"]})


def test_far_transfer_split_trains_on_clothing_and_street_and_holds_out_every_other_class(fss_dev):
    """The far-transfer configs (README, "Far transfer") keep every animal, vehicle and person-in-action
    class out of training, and the three recipes share one split."""
    splits = set()
    for path in sorted((REPO / "configs").glob("far_*.yaml")):
        train_src, val_src = build_sources(TrainConfig.from_yaml(path, [f"data_root={fss_dev}"]))
        assert all(c.startswith(("clothing_", "street_")) for c in train_src.classes), path.name
        assert "horse" in val_src.classes and all(c == "horse" or c.startswith("video_") for c in val_src.classes)
        assert len(train_src.classes) + len(val_src.classes) == len([d for d in fss_dev.iterdir() if d.is_dir()])
        splits.add((tuple(train_src.classes), tuple(val_src.classes)))
    assert len(splits) == 1


def test_repeated_set_options_all_apply():
    from svf_model.train import parse_args

    args = parse_args(["--config", "c.yaml", "--set", "out=a", "--set", "augment=true", "epochs=2"])
    assert args.set == ["out=a", "augment=true", "epochs=2"]


def test_only_singular_values_and_head_train(fss_dev, tmp_path):
    cfg = tiny(fss_dev, tmp_path, "svf_stages=[layer3, layer4]")
    model = build_model(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("head.") for n in trainable)
    backbone = [n for n in trainable if n.startswith("backbone.")]
    assert backbone and all(n.endswith(".sv.s") for n in backbone)
    assert {n.split(".")[1] for n in backbone} == {"layer3", "layer4"}
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(is_frozen_batchnorm(m) for m in bns)

    frozen = build_model(tiny(fss_dev, tmp_path, "mode=frozen"))
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    train_src, val_src = build_sources(cfg)
    assert not set(train_src.classes) & set(val_src.classes)


def test_two_stage_training_keeps_the_loaded_singular_values_and_trains_only_the_head(fss_dev, tmp_path):
    first = tmp_path / "svf"
    train(tiny(fss_dev, first, "epochs=1", "val_episodes=0", "augment=false"))
    stage_one = load_file(first / "model.safetensors")
    second = tmp_path / "head"
    cfg = tiny(fss_dev, second, "epochs=1", "val_episodes=0", "augment=false", "seed=1",
               f"init_singular_values={first / 'model.safetensors'}", "train_singular_values=false")
    model = build_model(cfg)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    initial_head = {k: v.clone() for k, v in trainable_state(model).items() if k.startswith("head.")}
    train(cfg)
    stage_two = load_file(second / "model.safetensors")
    values = [k for k in stage_one if k.startswith("backbone.")]
    assert values and all(torch.equal(stage_two[k], stage_one[k]) for k in values)
    assert any(v.abs().sum() > 0 for k, v in stage_one.items() if k in values)  # stage one moved them
    assert any(not torch.equal(stage_two[k], v) for k, v in initial_head.items())
    _, meta = load_checkpoint(second / "model.safetensors")
    assert meta["singular_values_from"] == "model.safetensors" and meta["singular_values_trained"] == "false"
    # Fixed singular values may sit inside the cached stages.
    TrainConfig.from_dict({"cache_features": True, "augment": False, "cache_until": "layer3",
                           "svf_stages": ["layer3", "layer4"], "train_singular_values": False})

    with pytest.raises(CheckpointError, match="SVF layers"):
        build_model(tiny(fss_dev, second, "svf_stages=[layer3, layer4]",
                         f"init_singular_values={first / 'model.safetensors'}"))
    with pytest.raises(CheckpointError, match="SVF layers"):  # s stored, d expected
        build_model(tiny(fss_dev, second, "parametrization=exp",
                         f"init_singular_values={first / 'model.safetensors'}"))
    with pytest.raises(CheckpointError, match="not found"):
        build_model(tiny(fss_dev, second, f"init_singular_values={tmp_path / 'missing.safetensors'}"))
    with pytest.raises(ValueError, match="needs mode: svf"):
        tiny(fss_dev, second, "mode=frozen", f"init_singular_values={first / 'model.safetensors'}")


@pytest.mark.parametrize("mode", ["full", "bn"])
def test_comparison_modes_tune_backbone_weights_and_store_them(fss_dev, tmp_path, mode):
    """The paper's ablation: ``full`` trains every parameter of the stage, ``bn`` its BatchNorm
    affine; the model file stores them, and loading it rebuilds exactly the trained backbone."""
    import warnings

    from svf_model.backbones import build_backbone
    from svf_model.svf import svf_layers

    cfg = tiny(fss_dev, tmp_path, f"mode={mode}", "epochs=1", "val_episodes=0", "augment=false")
    model = build_model(cfg)
    tuned = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert tuned and all(n.startswith("layer4.") for n in tuned) and not list(svf_layers(model.backbone))
    bn_names = {f"{n}.{k}" for n, m in model.backbone.named_modules() for k in ("weight", "bias")
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and n.startswith("layer4.")}
    assert (tuned == bn_names) if mode == "bn" else (tuned > bn_names)
    assert all(is_frozen_batchnorm(m) for m in model.backbone.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))  # running statistics stay fixed

    train(cfg)
    stored = load_file(tmp_path / "model.safetensors")
    assert {k[len("backbone."):] for k in stored if k.startswith("backbone.")} == tuned
    pretrained = build_backbone("efficientnet_lite2").state_dict()
    assert any(not torch.equal(stored[f"backbone.{n}"], pretrained[n]) for n in tuned)  # training moved them
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the untouched backbone's fingerprint matches
        loaded, meta = load_checkpoint(tmp_path / "model.safetensors")
    assert meta["tuned_weights"] == mode and meta["tuned_stages"] == ["layer4"]
    state = loaded.backbone.state_dict()
    assert all(torch.equal(state[n], stored[f"backbone.{n}"]) for n in tuned)
    assert all(torch.equal(state[k], v) for k, v in pretrained.items() if k not in tuned)
    with pytest.raises(ValueError, match="mode must be"):
        tiny(fss_dev, tmp_path, "mode=everything")


def test_feature_cache_gives_the_same_loss_and_gradients(fss_dev, tmp_path):
    torch.manual_seed(0)
    cfg = tiny(fss_dev, tmp_path, "augment=false", "cache_features=true", "cache_until=layer2")
    model = build_model(cfg).eval()  # eval: no dropout, so both passes are comparable
    train_src, _ = build_sources(cfg)
    ds = EpisodeDataset(train_src, 2, 2, Letterbox(cfg.image_size, model.backbone.mean), seed=0)
    batch = collate_episodes([ds[0], ds[1]], cfg.image_size, model.backbone.mean, model.backbone.std)
    q, s, sm, qm = batch["query"], batch["supports"], batch["support_masks"], batch["query_mask"]

    full = EpisodeLoss(model)
    loss_full = full(q, s, sm, qm)[0]
    loss_full.backward()
    grads_full = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()

    cache = PrefixFeatureCache(model.backbone, "layer2")
    view = type(model)(cache.view(model.backbone), model.head)
    paths = [p for ps in batch["support_paths"] for p in ps]
    feats_s = cache(s.flatten(0, 1), paths).unflatten(0, s.shape[:2])
    feats_q = cache(q, batch["query_paths"])
    assert feats_q.shape[1] == model.backbone.channels["layer2"]
    loss_cached = EpisodeLoss(view)(feats_q, feats_s, sm, qm)[0]
    loss_cached.backward()
    grads_cached = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    assert loss_cached.item() == pytest.approx(loss_full.item(), rel=1e-2)
    for a, b in zip(grads_full, grads_cached, strict=True):  # equal up to the float16 cache's rounding
        assert a.abs().sum() > 0
        assert (a - b).norm() <= 0.03 * a.norm()
    assert cache(q, batch["query_paths"]) is not None and cache.hits == len(batch["query_paths"])


def test_tiny_training_runs_resumes_and_evaluates(fss_dev, tmp_path):
    common = ("scheduler=constant", "epochs=2")
    run_a = tmp_path / "a"
    result = train(tiny(fss_dev, run_a, *common))
    for name in ("model.safetensors", "best.safetensors", "last.pt", "log.csv", "config.yaml", "val_epoch2.json"):
        assert (run_a / name).is_file(), name
    rows = _rows(run_a / "log.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(float(r["loss"]) > 0 for r in rows)
    assert result["history"][-1]["val_miou"] >= 0
    state = torch.load(run_a / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2

    # Resume to a third epoch; it must equal a straight three-epoch run.
    resumed = train(tiny(fss_dev, run_a, "scheduler=constant", "epochs=3"), resume=True)
    assert [r["epoch"] for r in _rows(run_a / "log.csv")] == ["1", "2", "3"]
    assert len(resumed["history"]) == 3
    straight = tmp_path / "b"
    train(tiny(fss_dev, straight, "scheduler=constant", "epochs=3"))
    a, b = load_file(run_a / "model.safetensors"), load_file(straight / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key

    # The model file rebuilds the trained model and evaluates through the CLI.
    model, meta = load_checkpoint(run_a / "model.safetensors")
    assert meta["method"] == "pfenet" and meta["svf_stages"] == ["layer4"] and meta["image_size"] == 97
    assert all(k.startswith(("head.", "backbone.layer4.")) for k in a)
    for key, value in trainable_state(model).items():
        assert torch.equal(value, a[key])
    from svf_model.adapt import AdaptConfig
    from svf_model.evaluate import main as evaluate_main

    out = tmp_path / "eval.json"
    evaluate_main(["--checkpoint", str(run_a / "model.safetensors"), "--data", str(fss_dev), "--classes",
                   "video_cows", "street_sky", "--shots", "2", "--episodes", "2", "--json", str(out), "--quiet",
                   "--adapt", "--adapt-steps", "1", "--adapt-set", "image_size=97"])
    report = json.loads(out.read_text())
    assert report["config"]["size"] == 97 and len(report["episodes"]) == 2
    assert all("iou_before" in e and "support_iou_before" in e for e in report["episodes"])
    used = report["config"]["adapt_config"]  # every AdaptConfig field, options and defaults resolved
    assert (used["steps"], used["lr"], used["image_size"]) == (1, AdaptConfig().step_size(2), 97)
    assert used["loss"] == AdaptConfig().loss and used["gate"] == AdaptConfig().gate


def _small_model():
    from svf_model import apply_svf, build_backbone
    from svf_model.heads import build_head
    from svf_model.model import FewShotSegmenter

    backbone = build_backbone("efficientnet_lite0", weights=None).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    apply_svf(backbone.stages(["layer4"]), parametrization="exp")
    head = build_head("pfenet", backbone, reduce_dim=8, pyramid_bins=[4, 2])
    with torch.no_grad():
        for _, layer in __import__("svf_model").svf_layers(backbone):
            layer.sv.trainable.uniform_(-0.1, 0.1)
    return FewShotSegmenter(backbone, head).eval()


def test_checkpoint_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    model = _small_model()
    meta = {"head_kwargs": {"reduce_dim": 8, "pyramid_bins": [4, 2]}, "image_size": 65, "shots": 1,
            "backbone_weights": "random"}
    path = save_checkpoint(model, tmp_path / "m.safetensors", meta)
    with pytest.warns(UserWarning, match="fingerprint"):  # a fresh random backbone is other weights
        loaded, info = load_checkpoint(path)
    assert info["parametrization"] == "exp" and info["svf_stages"] == ["layer4"] and info["shots"] == 1
    # The head and the singular values are restored exactly.
    for key, value in trainable_state(model).items():
        assert torch.equal(trainable_state(loaded)[key], value)

    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one byte of tensor data
    (tmp_path / "tampered.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path / "tampered.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "truncated.safetensors")
    wrong = save_checkpoint(model, tmp_path / "wrong.safetensors", {**meta, "head_kwargs": {"reduce_dim": 16}})
    with pytest.raises(CheckpointError, match="does not fit|shape"):
        load_checkpoint(wrong)


def test_same_outputs_after_reload(tmp_path, lite2):
    from svf_model import apply_svf, build_backbone
    from svf_model.heads import build_head
    from svf_model.model import FewShotSegmenter

    torch.manual_seed(1)
    backbone = build_backbone("efficientnet_lite2")
    for p in backbone.parameters():
        p.requires_grad_(False)
    apply_svf(backbone.stages(["layer4"]))
    model = FewShotSegmenter(backbone, build_head("baseline", backbone, reduce_dim=8)).eval()
    with torch.no_grad():
        for p in __import__("svf_model").svf_parameters(model.backbone):
            p.mul_(1.05)
    path = save_checkpoint(model, tmp_path / "m.safetensors", {"head_kwargs": {"reduce_dim": 8}, "image_size": 65})
    loaded, _ = load_checkpoint(path)
    x, s, m = torch.randn(1, 3, 65, 65), torch.randn(1, 1, 3, 65, 65), (torch.rand(1, 1, 65, 65) > 0.5).float()
    with torch.no_grad():
        assert torch.allclose(model(x, s, m), loaded(x, s, m), atol=1e-5)


def test_torchrun_two_processes(fss_dev, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "svf_model.train", "--config", str(TINY), "--out", str(out),
           "--set", f"data_root={fss_dev}", "epochs=1", "episodes_per_epoch=8", "val_episodes=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    rows = _rows(out / "log.csv")
    assert len(rows) == 1 and rows[0]["step"] == "2"  # 8 episodes / (2 processes x batch 2)
    assert "Traceback" not in proc.stderr
