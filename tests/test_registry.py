"""Model registry: the shipped file, and local / hub / official entries in temporary registries
(sha256 checks, missing files, offline hub) loaded through :func:`svf_model.registry.load_model`."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from svf_model import apply_svf, build_backbone, official_state_dict
from svf_model.backbones import list_backbones
from svf_model.checkpoint import load_checkpoint, save_checkpoint, trainable_state
from svf_model.heads import build_head, list_heads
from svf_model.model import FewShotSegmenter
from svf_model.registry import adapt_fold, list_models, load_model, read_registry, sha256_of
from svf_model.svf import svf_layers
from svf_model.weights import CheckpointError


def write_registry(folder: Path, models: list[dict], default: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "registry.json"
    path.write_text(json.dumps({"default": default or models[0]["name"], "models": models}))
    return path


def assert_ready_for_adaptation(model: FewShotSegmenter, adapt_modules: list[str]) -> None:
    """Eval mode everywhere, nothing trainable, SVF layers inside every adapt module."""
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    names = [n for n, _ in svf_layers(model.backbone)]
    for module in adapt_modules:
        assert any(n.startswith(module + ".") for n in names), (module, names[:5])


def bounce(*args, **kwargs):
    raise AssertionError("nothing may be built or loaded from a refused file")


# ------------------------------------------------------------------------------------------------
# the shipped registry


def test_shipped_registry_is_well_formed():
    default, entries = read_registry()
    assert list_models()[0] == default
    assert sorted(list_models()) == sorted(entries)
    for entry in entries.values():
        assert entry.method in list_heads(), entry.name
        assert entry.backbone in list_backbones(), entry.name
        assert entry.format in ("svf", "official"), entry.name
        kind = entry.source.get("type")
        assert kind in ("builtin", "local", "hub"), entry.name
        if kind != "builtin":
            assert entry.file and re.fullmatch(r"[0-9a-f]{64}", entry.sha256 or ""), entry.name
        if kind == "hub":
            assert entry.source.get("repo_id"), entry.name
        assert entry.adapt_modules and entry.image_size > 0


def test_default_model_loads_offline_ready_for_adaptation():
    model, entry = load_model()
    assert entry.name == list_models()[0] == model.name
    assert_ready_for_adaptation(model, entry.adapt_modules)
    size = 97
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        logits = model(x, x[None], (x[0, :1] > 0).float()[None])
    assert logits.shape == (1, 2, size, size) and torch.isfinite(logits).all()


@pytest.mark.parametrize(("adapt_grouped", "kind"),
                         [(True, "depthwise"), ("shared", "depthwise shared"), ("kernel", "depthwise kernel")])
def test_adapt_grouped_decomposes_the_depthwise_convs_of_the_adapt_modules_without_changing_outputs(
        adapt_grouped: bool | str, kind: str):
    plain, entry = load_model(adapt_grouped="none")
    assert all(layer.groups == 1 for _, layer in svf_layers(plain.backbone))
    grouped, _ = load_model(adapt_grouped=adapt_grouped)
    plain_names = {name for name, _ in svf_layers(plain.backbone)}
    extra = {name: layer.kind for name, layer in svf_layers(grouped.backbone) if name not in plain_names}
    assert extra and all(k.endswith(kind) for k in extra.values()), extra
    assert all(any(name.startswith(m + ".") for m in entry.adapt_modules) for name in extra)
    x = torch.randn(1, 3, 97, 97)
    with torch.no_grad():
        a = plain(x, x[None], (x[0, :1] > 0).float()[None])
        b = grouped(x, x[None], (x[0, :1] > 0).float()[None])
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_the_default_model_decomposes_its_adapt_blocks_depthwise_filters_kernel_by_kernel():
    """The shipped default adapts each depthwise filter's 3 singular values (with one shot; README,
    "Adaptation"), so its registry entry loads them; ``False`` and ``"none"`` load the plain block."""
    model, entry = load_model()
    assert adapt_fold(entry) == "kernel"
    kinds = {name: layer.kind for name, layer in svf_layers(model.backbone)}
    assert {k for k in kinds.values() if "depthwise" in k} == {"3x3 depthwise kernel"}, kinds
    assert adapt_fold(entry, False) is None and adapt_fold(entry, "none") is None
    assert adapt_fold(entry, True) == "per-group"


@pytest.mark.parametrize(("flag", "recorded"), [([], "kernel"), (["--adapt-grouped", "none"], False)])
def test_evaluate_records_the_depthwise_fold_it_loaded(flag: list[str], recorded: str | bool):
    """``evaluate`` without ``--adapt-grouped`` loads the registry's fold and says so in its config, so
    a run's label does not depend on the registry's default at the time it is summarised."""
    from svf_model.evaluate import build_predictor, parse_args

    args = parse_args(["--data", "unused", "--json", "unused.json", *flag])
    predictor = build_predictor(args)
    assert args.adapt_grouped == recorded and args.model == list_models()[0]
    decomposed = any(layer.groups > 1 for _, layer in svf_layers(predictor.model.backbone))
    assert decomposed == bool(recorded)


def test_evaluate_decomposes_a_checkpoint_files_depthwise_filters_in_the_modules_that_adapt():
    """A model file (here the shipped one, read as a ``--checkpoint``) has no registry entry to say how
    its depthwise convs adapt: ``--adapt-grouped`` decomposes them in the ``modules`` of ``--adapt-set``
    (the far-transfer studies, docs/adaptation.md), and refuses to guess the modules."""
    from svf_model.evaluate import build_predictor, parse_args

    path = Path("checkpoints") / "refine_dual_svf_lite2_fssdev.safetensors"
    common = ["--data", "unused", "--json", "unused.json", "--checkpoint", str(path)]
    plain = build_predictor(parse_args(common))
    assert not any(layer.groups > 1 for _, layer in svf_layers(plain.model.backbone))
    args = parse_args([*common, "--adapt-grouped", "kernel", "--adapt-set", "modules=layer4.1"])
    model = build_predictor(args).model
    depthwise = {name: layer.kind for name, layer in svf_layers(model.backbone) if layer.groups > 1}
    assert depthwise and all(name.startswith("layer4.1.") for name in depthwise), depthwise
    assert set(depthwise.values()) == {"3x3 depthwise kernel"} and args.adapt_grouped == "kernel"
    dense = {name for name, layer in svf_layers(model.backbone) if layer.groups == 1}
    assert dense == {name for name, _ in svf_layers(plain.model.backbone)}  # the file's own values stay
    with pytest.raises(SystemExit, match="modules=layer4.1"):
        build_predictor(parse_args([*common, "--adapt-grouped", "kernel"]))


def test_an_unknown_depthwise_decomposition_is_refused_before_loading():
    with pytest.raises(ValueError, match="adapt_grouped must be"):
        load_model(adapt_grouped="rows")


def test_malformed_registry_and_unknown_name_are_checkpoint_errors(tmp_path):
    bad = tmp_path / "registry.json"
    bad.write_text('{"default": "x", "models": [{"name": "x", "method": "prototype", "colour": 1}]}')
    with pytest.raises(CheckpointError, match="malformed"):
        read_registry(bad)
    good = write_registry(tmp_path / "ok", [{"name": "a", "method": "prototype", "backbone": "efficientnet_lite2"}])
    with pytest.raises(CheckpointError, match="unknown model 'b'"):
        load_model("b", registry=good)
    with pytest.raises(CheckpointError, match="not one of its models"):
        read_registry(write_registry(tmp_path / "nodefault", [{"name": "a", "method": "prototype",
                                                                 "backbone": "efficientnet_lite2"}], "zzz"))


# ------------------------------------------------------------------------------------------------
# local files in this project's format


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """A baseline head (reduce_dim 16) on Lite2 with SVF on layer4 and moved singular values, saved."""
    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite2")
    model = FewShotSegmenter(backbone, build_head("baseline", backbone, reduce_dim=16))
    apply_svf(backbone.layer4, parametrization="exp")
    with torch.no_grad():
        for _, layer in svf_layers(backbone):
            layer.sv.trainable.normal_(0, 0.1)
    path = save_checkpoint(model.eval(), tmp_path_factory.mktemp("ckpt") / "tiny.safetensors",
                           {"head_kwargs": {"reduce_dim": 16}, "image_size": 161, "shots": 1})
    entry = {"name": "tiny-baseline", "method": "baseline", "backbone": "efficientnet_lite2",
             "head_kwargs": {"reduce_dim": 16}, "file": path.name, "sha256": sha256_of(path),
             "source": {"type": "local"}, "format": "svf", "image_size": 161, "adapt_modules": ["layer4.1"]}
    return path, {k: v.clone() for k, v in trainable_state(model).items()}, entry


@pytest.mark.parametrize("fold", ["shared", "kernel"])
def test_a_checkpoint_with_refolded_depthwise_layers_loads_back_the_same(tmp_path, fold):
    """The depthwise convs' decomposition (one filter bank, or each filter as a matrix) is recorded in
    the checkpoint and rebuilt at load: same layers, same singular values, same outputs (a
    per-group rebuild would not even have the same shapes)."""
    torch.manual_seed(1)
    backbone = build_backbone("efficientnet_lite2")
    model = FewShotSegmenter(backbone, build_head("baseline", backbone, reduce_dim=16))
    apply_svf(backbone.layer4, kinds={"1x1", "grouped"}, parametrization="exp", grouped_fold=fold)
    with torch.no_grad():
        for _, layer in svf_layers(backbone):
            layer.sv.trainable.normal_(0, 0.1)
    path = save_checkpoint(model.eval(), tmp_path / f"{fold}.safetensors", {"head_kwargs": {"reduce_dim": 16}})
    loaded, meta = load_checkpoint(path)
    assert meta["svf_grouped_fold"] == fold
    kinds = {name: layer.kind for name, layer in svf_layers(loaded.backbone)}
    assert kinds == {name: layer.kind for name, layer in svf_layers(backbone)}
    assert any(kind.endswith(f"depthwise {fold}") for kind in kinds.values())
    x = torch.randn(1, 3, 97, 97)
    with torch.no_grad():
        assert torch.allclose(loaded(x, x[None], (x[0, :1] > 0).float()[None]),
                              model(x, x[None], (x[0, :1] > 0).float()[None]), atol=1e-5)


def test_missing_local_file_names_where_to_put_it(tmp_path, small_checkpoint):
    _, _, entry = small_checkpoint
    registry = write_registry(tmp_path, [dict(entry, file="absent.safetensors")])
    with pytest.raises(CheckpointError) as err:
        load_model("tiny-baseline", registry=registry)
    assert str(tmp_path / "absent.safetensors") in str(err.value)
    assert "Put the file at" in str(err.value)


def test_local_file_with_right_sha256_loads(tmp_path, small_checkpoint):
    path, state, entry = small_checkpoint
    registry = write_registry(tmp_path / "reg", [entry])  # the file lives elsewhere: pass its folder
    model, got = load_model("tiny-baseline", registry=registry, checkpoint_dir=path.parent)
    assert got.name == "tiny-baseline" and got.image_size == 161
    assert_ready_for_adaptation(model, got.adapt_modules)
    loaded = trainable_state(model)
    assert sorted(loaded) == sorted(state)
    assert any(k.startswith("head.") for k in state) and any(k.endswith(".sv.d") for k in state)
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_tampered_local_file_is_refused_before_loading(tmp_path, small_checkpoint, monkeypatch):
    path, _, entry = small_checkpoint
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of one singular value
    (tmp_path / path.name).write_bytes(bytes(data))
    registry = write_registry(tmp_path, [entry])
    monkeypatch.setattr("svf_model.checkpoint.load_checkpoint", bounce)
    monkeypatch.setattr("svf_model.backbones.build_backbone", bounce)
    with pytest.raises(CheckpointError) as err:
        load_model("tiny-baseline", registry=registry)
    message = str(err.value)
    assert "sha256" in message and "refusing" in message and path.name in message
    assert entry["sha256"][:16] in message and sha256_of(tmp_path / path.name)[:16] in message


# ------------------------------------------------------------------------------------------------
# hub entries offline


def test_hub_entry_offline_fails_fast_with_manual_download_advice(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr("svf_model.backbones.build_backbone", bounce)
    entry = {"name": "hubbed", "method": "baseline", "backbone": "efficientnet_lite2",
             "file": "hubbed.safetensors", "sha256": "0" * 64,
             "source": {"type": "hub", "repo_id": "svf-fewshot/no-such-repo", "filename": "hubbed.safetensors"}}
    registry = write_registry(tmp_path, [entry])
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        load_model("hubbed", registry=registry)
    assert time.perf_counter() - start < 15
    message = str(err.value)
    assert "HF_HUB_OFFLINE" in message and "by hand" in message
    assert str(tmp_path / "hubbed.safetensors") in message and "svf-fewshot/no-such-repo" in message
    assert not (tmp_path / "hubbed.safetensors").exists()


# ------------------------------------------------------------------------------------------------
# official PFENet / SVF checkpoints


def test_official_entry_goes_through_load_official(tmp_path, monkeypatch):
    import svf_model.official

    torch.manual_seed(1)
    head_kwargs = {"reduce_dim": 16, "pyramid_bins": [8, 4]}
    backbone = build_backbone("resnet50_deepstem", weights=None)
    source = FewShotSegmenter(backbone, build_head("pfenet", backbone, **head_kwargs)).eval()
    state = {k: v.clone() for k, v in official_state_dict(source).items()}
    path = tmp_path / "best.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)

    calls = []
    original = svf_model.official.load_official

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(svf_model.official, "load_official", spy)
    # layer1.0 (small, quick to decompose) gets its SVF layers from load_model after loading
    entry = {"name": "pfenet-official", "method": "pfenet", "backbone": "resnet50_deepstem",
             "head_kwargs": head_kwargs, "shot": 1, "file": "best.pth", "sha256": sha256_of(path),
             "source": {"type": "local"}, "format": "official", "adapt_modules": ["layer1.0"]}
    model, got = load_model("pfenet-official", registry=write_registry(tmp_path, [entry]))
    assert len(calls) == 1 and got.format == "official"
    assert_ready_for_adaptation(model, got.adapt_modules)
    loaded = {k: v for k, v in official_state_dict(model).items() if not k.startswith("layer1.0.")}
    assert sorted(loaded) == sorted(k for k in state if not k.startswith("layer1.0."))
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    x = torch.randn(1, 3, 33, 33)
    mask = (torch.rand(1, 1, 33, 33) > 0.5).float()
    with torch.no_grad():
        torch.testing.assert_close(model(x, x[None], mask), source(x, x[None], mask), rtol=1e-4, atol=1e-4)
