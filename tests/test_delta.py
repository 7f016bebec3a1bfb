"""SVF deltas: tuned singular values saved, checked against their base and loaded; in-memory state."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from svf_model import build_backbone, load_svf_delta, save_svf_delta
from svf_model.delta import set_svf_state, svf_hash, svf_state
from svf_model.svf import apply_svf, svf_layers, svf_parameters
from svf_model.weights import CheckpointError

STAGES = ["layer3", "layer4"]
BASE = "efficientnet_lite0"


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _pretrained_state() -> dict[str, torch.Tensor]:
    return build_backbone(BASE).state_dict()


def svf_model(parametrization: str = "direct", stages: tuple[str, ...] = tuple(STAGES), weights: str = "real"):
    """Lite0 with its embedded ImageNet weights (or random ones), SVF on ``stages``, eval mode."""
    backbone = build_backbone(BASE, weights=None)
    if weights == "real":
        backbone.load_state_dict(_pretrained_state())
    backbone.requires_grad_(False)
    apply_svf(backbone.stages(list(stages)), parametrization=parametrization)
    return backbone.eval()


def tune(backbone, seed: int = 0) -> None:
    """Move every singular value by up to +-20%, as a few steps of fine-tuning would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in svf_layers(backbone):
            factor = 1 + 0.2 * (2 * torch.rand(layer.rank, generator=gen) - 1)
            if layer.sv.parametrization == "direct":
                layer.sv.s.mul_(factor)
            else:
                layer.sv.d.add_(torch.log(factor))


def singular_values(backbone) -> dict[str, torch.Tensor]:
    return {n: layer.singular_values().detach().clone() for n, layer in svf_layers(backbone)}


def features(backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone(x)["layer4"]


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def tuned_file(tmp_path_factory, image):
    """``(path, tuned model, its layer4 output)``."""
    model = svf_model()
    tune(model)
    path = save_svf_delta(model, tmp_path_factory.mktemp("delta") / "cat.safetensors", base_name=BASE)
    return path, model, features(model, image)


def test_roundtrip_restores_the_tuned_model(tuned_file, image) -> None:
    path, tuned, expected = tuned_file
    fresh = svf_model()
    before = features(fresh, image)  # fills the no-grad weight cache, which loading must invalidate
    assert not torch.allclose(before, expected, atol=1e-3)
    metadata = load_svf_delta(fresh, path, base_name=BASE)
    assert metadata["base_name"] == BASE and metadata["parametrization"] == "direct"
    assert metadata["svf_hash"] == svf_hash(fresh) and len(metadata["svf_hash"]) == 64
    for name, s in singular_values(tuned).items():
        assert torch.equal(singular_values(fresh)[name], s), name
    torch.testing.assert_close(features(fresh, image), expected)


def test_file_holds_only_s_and_s0_per_layer(tuned_file) -> None:
    path, tuned, _ = tuned_file
    layers = dict(svf_layers(tuned))
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor(f"{next(iter(layers))}.s0").shape == (next(iter(layers.values())).rank,)
    assert keys == {f"{n}.{k}" for n in layers for k in ("s", "s0")}
    ranks = sum(layer.rank for layer in layers.values())
    weights = sum(layer.U.numel() + layer.Vh.numel() for layer in layers.values())
    assert path.stat().st_size < 4 * 2 * ranks + 64 * len(keys) + 4096
    assert path.stat().st_size < 0.01 * 4 * weights


def test_refuses_another_base_name(tuned_file) -> None:
    path, _, _ = tuned_file
    with pytest.raises(CheckpointError, match="efficientnet_lite2"):
        load_svf_delta(svf_model(), path, base_name="efficientnet_lite2")


def test_refuses_another_layer_set(tuned_file) -> None:
    path, _, _ = tuned_file
    with pytest.raises(CheckpointError, match="does not fit"):
        load_svf_delta(svf_model(stages=("layer4",)), path)


def test_refuses_wrong_shapes(tuned_file, tmp_path) -> None:
    path, _, _ = tuned_file
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    key = next(k for k in tensors if k.endswith(".s"))
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match="rank"):
        load_svf_delta(svf_model(), tmp_path / "cut.safetensors")


def test_refuses_another_decomposition(tuned_file) -> None:
    path, _, _ = tuned_file
    random_base = svf_model(weights="random")
    before = singular_values(random_base)
    with pytest.raises(CheckpointError, match="svf_hash differs"):
        load_svf_delta(random_base, path, base_name=BASE)
    assert all(torch.equal(before[n], s) for n, s in singular_values(random_base).items())


def _as_if_decomposed_elsewhere(model, s0_noise: float) -> None:
    """Flip the signs of some (u_r, v_r) pairs - W is unchanged - and perturb s0 by ``s0_noise``."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, layer in svf_layers(model):
            flip = torch.where(torch.rand(layer.rank, generator=gen) < 0.5, -1.0, 1.0)
            layer.U.mul_(flip)
            layer.Vh.mul_(flip[:, None])
            layer.sv.s0.mul_(1 + s0_noise * (2 * torch.rand(layer.rank, generator=gen) - 1))


def test_accepts_other_lapack_signs_with_a_warning(tuned_file, image) -> None:
    path, _, expected = tuned_file
    elsewhere = svf_model()
    _as_if_decomposed_elsewhere(elsewhere, s0_noise=1e-5)
    with pytest.warns(UserWarning, match="svf_hash differs but every s0 matches"):
        load_svf_delta(elsewhere, path, base_name=BASE)
    torch.testing.assert_close(features(elsewhere, image), expected, rtol=1e-4, atol=1e-4)

    drifted = svf_model()
    _as_if_decomposed_elsewhere(drifted, s0_noise=1e-2)
    with pytest.raises(CheckpointError, match="s0 differs"):
        load_svf_delta(drifted, path, base_name=BASE)


@pytest.mark.parametrize(("saved_as", "loaded_as"), [("exp", "direct"), ("direct", "exp"), ("exp", "exp")])
def test_parametrisations_interchange(tmp_path, image, saved_as: str, loaded_as: str) -> None:
    source = svf_model(saved_as)
    tune(source, seed=1)
    path = save_svf_delta(source, tmp_path / "d.safetensors", base_name=BASE)
    target = svf_model(loaded_as)
    assert svf_hash(target) == svf_hash(source)
    metadata = load_svf_delta(target, path, base_name=BASE)
    assert metadata["parametrization"] == saved_as
    for name, s in singular_values(source).items():
        torch.testing.assert_close(singular_values(target)[name], s, rtol=1e-6, atol=0)
    torch.testing.assert_close(features(target, image), features(source, image), rtol=1e-5, atol=1e-5)
    if saved_as == loaded_as == "exp":  # the file holds d itself: the same decomposition gets it bit for bit
        assert all(torch.equal(v, svf_state(source)[k]) for k, v in svf_state(target).items())
        assert torch.equal(features(target, image), features(source, image))


def test_exp_file_whose_d_and_s_disagree_is_refused(tmp_path) -> None:
    source = svf_model("exp")
    tune(source, seed=2)
    path = save_svf_delta(source, tmp_path / "d.safetensors", base_name=BASE)
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    key = next(k for k in tensors if k.endswith(".d"))
    assert set(tensors) == {f"{n}.{k}" for n, _ in svf_layers(source) for k in ("s", "s0", "d")}
    tensors[key] = tensors[key] + 0.1
    save_file(tensors, str(tmp_path / "altered.safetensors"), metadata=metadata)
    target = svf_model("exp")
    before = svf_state(target)
    with pytest.raises(CheckpointError, match="does not give"):
        load_svf_delta(target, tmp_path / "altered.safetensors", base_name=BASE)
    assert all(torch.equal(v, before[k]) for k, v in svf_state(target).items())


def test_unreadable_and_foreign_files(tmp_path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_svf_delta(svf_model(), garbage)
    weights = tmp_path / "backbone.safetensors"
    save_file({"layer0.0.weight": torch.zeros(2, 3, 3, 3)}, str(weights))
    with pytest.raises(CheckpointError, match="not an SVF delta"):
        load_svf_delta(svf_model(), weights)
    with pytest.raises(CheckpointError, match="not found"):
        load_svf_delta(svf_model(), tmp_path / "nope.safetensors")


@pytest.mark.parametrize("parametrization", ["direct", "exp"])
def test_svf_state_resets_training_exactly(image, parametrization: str) -> None:
    model = svf_model(parametrization)
    initial = svf_state(model)
    suffix = "s" if parametrization == "direct" else "d"
    assert set(initial) == {f"{n}.{suffix}" for n, _ in svf_layers(model)}
    reference = features(model, image)

    params = svf_parameters(model)
    optimiser = torch.optim.SGD(params, lr=0.05)
    for _ in range(2):
        optimiser.zero_grad()
        model(image)["layer4"].pow(2).mean().backward()
        optimiser.step()
    tuned_state = svf_state(model)
    tuned = features(model, image)
    assert not torch.allclose(tuned, reference, atol=1e-4)

    set_svf_state(model, initial)
    assert all(p is q for p, q in zip(params, svf_parameters(model), strict=True))
    assert all(torch.equal(svf_state(model)[k], v) for k, v in initial.items())
    assert torch.equal(features(model, image), reference)
    set_svf_state(model, tuned_state)  # e.g. switching back to another session
    assert torch.equal(features(model, image), tuned)


def test_svf_state_converts_and_checks() -> None:
    exp_model, direct_model = svf_model("exp"), svf_model("direct")
    tune(exp_model, seed=2)
    set_svf_state(direct_model, svf_state(exp_model))  # d -> s = s0 exp(d)
    for name, s in singular_values(exp_model).items():
        torch.testing.assert_close(singular_values(direct_model)[name], s)

    state = svf_state(direct_model)
    with pytest.raises(ValueError, match="missing layers"):
        set_svf_state(direct_model, dict(list(state.items())[1:]))
    key = next(iter(state))
    with pytest.raises(ValueError, match="rank"):
        set_svf_state(direct_model, {**state, key: state[key][:-1]})
    with pytest.raises(ValueError, match="positive"):
        set_svf_state(exp_model, {**state, key: -state[key]})
