"""The shipped default model on an accelerator: the same masks as on the CPU, and Adapt there behaves
as on the CPU (only singular values change, reset is exact, the values travel to a CPU session).

Marked ``gpu``: skipped without CUDA. ``SVF_TEST_ACCELERATOR=cpu`` runs them with the CPU standing in
for the accelerator, to check the tests themselves before spending device time
(``benchmarks/device_check.py`` runs them on a lent GPU).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from svf_model.adapt import AdaptConfig
from svf_model.predictor import Predictor
from svf_model.registry import load_model
from tests.helpers import fss_pairs, iou

pytestmark = pytest.mark.gpu

ACCELERATOR = os.environ.get("SVF_TEST_ACCELERATOR", "cuda")


@pytest.fixture(scope="module")
def horse(fss_dev):
    """Six real horse photos with their masks: shots first, the last one is the query."""
    return fss_pairs(fss_dev, "horse", 6)


def _predictor(device: str, shots, k: int) -> Predictor:
    model, entry = load_model(device=device)  # a model per device: a Predictor moves its model there
    p = Predictor(model, entry.image_size, device=device, model_name=entry.name)
    p.set_supports([s[0] for s in shots[:k]], [s[1] for s in shots[:k]])
    return p


@pytest.fixture(scope="module", params=[1, 5], ids=["1shot", "5shot"])
def pair(request, horse):
    """``(cpu predictor, accelerator predictor, k)`` on the same k shots."""
    k = request.param
    return _predictor("cpu", horse, k), _predictor(ACCELERATOR, horse, k), k


def test_the_accelerator_segments_as_the_cpu_does(pair, horse):
    cpu, acc, _ = pair
    query, truth = horse[-1]
    a, b = cpu.predict(query), acc.predict(query)
    assert a.prob.shape == b.prob.shape == truth.shape
    # cuDNN convolutions may run in TF32: close, not equal.
    assert float(np.abs(a.prob - b.prob).mean()) < 5e-3
    assert iou(a.mask, b.mask) > 0.98


def test_adapting_on_the_accelerator_changes_only_singular_values_and_agrees_with_the_cpu(pair, horse):
    cpu, acc, k = pair
    config = AdaptConfig(gate="off", time_budget_s=None)  # the defaults, every step kept
    query = horse[-1][0]
    original = acc.predict(query).prob
    state_before = {n: t.detach().clone() for n, t in acc.model.state_dict().items()}
    result_acc = acc.adapt(config)
    result_cpu = cpu.adapt(config)
    assert result_acc.steps == result_cpu.steps == config.steps and not result_acc.cancelled
    assert all(torch.equal(state_before[n], t) for n, t in acc.model.state_dict().items()), \
        "the shared model changed: adaptation must live in the session's values"
    change_acc = _change(acc)
    change_cpu = _change(cpu)
    assert set(change_acc) == set(change_cpu) and change_acc
    modules = acc.model.adapt_modules  # the values of the registry's adapt modules alone
    assert all(any(n.startswith(m + ".") for m in modules) for n in change_acc), sorted(change_acc)
    if k == 1:  # the shipped default's one-shot Adapt also trains the depthwise filters' values
        assert any("conv_dw" in n for n in change_acc)
    flat_acc = torch.cat([change_acc[n].flatten().cpu() for n in sorted(change_acc)])
    flat_cpu = torch.cat([change_cpu[n].flatten() for n in sorted(change_cpu)])
    assert flat_acc.norm() > 0
    assert torch.nn.functional.cosine_similarity(flat_acc, flat_cpu, dim=0) > 0.95
    adapted = acc.predict(query)
    assert iou(adapted.mask, cpu.predict(query).mask) > 0.95
    acc.reset()
    np.testing.assert_array_equal(acc.predict(query).prob, original)
    acc_again = acc.adapt(config)
    assert acc_again.steps == config.steps
    np.testing.assert_allclose(acc.predict(query).prob, adapted.prob, atol=1e-3)


def test_values_adapted_on_the_accelerator_travel_to_a_cpu_session(pair, horse, tmp_path):
    cpu, acc, k = pair
    query = horse[-1][0]
    acc.reset()
    acc.adapt(AdaptConfig(gate="off", time_budget_s=None))
    path = tmp_path / f"adapted_{k}.safetensors"
    acc.export_svf(str(path))
    cpu.reset()
    cpu.import_svf(str(path))
    assert cpu.adapted
    assert iou(cpu.predict(query).mask, acc.predict(query).mask) > 0.98


def _change(p: Predictor) -> dict[str, torch.Tensor]:
    base = p.base_values()
    return {n: (v - base[n]).detach() for n, v in p.svf_values().items() if not torch.equal(v, base[n])}
