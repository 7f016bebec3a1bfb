"""Evaluation CLI and function on fss-dev: JSON fields, real scores above the floors, determinism."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from svf_model.data import FSSFolder, make_episodes
from svf_model.evaluate import evaluate, evaluate_trivial, format_table, main
from svf_model.metrics import FewShotMeter
from tests.helpers import kept_torch_threads

CLASSES = ["horse", "video_dog", "video_cows", "street_sky"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cli_result(fss_dev, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "prototype.json"
    argv = ["--model", "prototype", "--backbone", "efficientnet_lite2", "--data", str(fss_dev),
            "--classes", *CLASSES, "--shots", "1", "--episodes", "6", "--seed", "0", "--size", "161",
            "--threads", "1", "--json", str(out), "--quiet"]
    with kept_torch_threads():
        returned = main(argv)
    return json.loads(out.read_text()), returned


def test_cli_json_has_documented_fields(cli_result, fss_dev):
    result, returned = cli_result
    for key in ("miou", "fbiou", "per_class", "episodes", "seconds_per_episode", "floors", "config"):
        assert key in result
    assert result["miou"] == pytest.approx(returned["miou"])
    assert len(result["episodes"]) == 6
    for ep in result["episodes"]:
        assert set(ep) == {"class", "supports", "query", "iou"}
        assert ep["class"] in CLASSES and 0.0 <= ep["iou"] <= 1.0
        assert (fss_dev / ep["query"]).is_file() and all((fss_dev / s).is_file() for s in ep["supports"])
        assert ep["query"] not in ep["supports"]
    assert set(result["per_class"]) <= set(CLASSES)
    assert result["miou"] == pytest.approx(np.mean(list(result["per_class"].values())))
    assert 0 <= result["fbiou"] <= 100 and result["seconds_per_episode"] > 0
    cfg = result["config"]
    assert cfg["shots"] == 1 and cfg["episodes"] == 6 and cfg["seed"] == 0 and cfg["size"] == 161
    assert "adapt_seconds" not in result


def test_cli_scores_beat_trivial_floors(cli_result):
    result, _ = cli_result
    floors = result["floors"]
    assert floors["all_background"]["miou"] == 0.0
    assert result["miou"] > floors["all_background"]["miou"] + 20  # a real prediction, not noise
    assert result["miou"] > floors["all_foreground"]["miou"]
    assert result["fbiou"] > max(f["fbiou"] for f in floors.values())


def test_evaluate_function_is_deterministic_and_matches_cli(cli_result, fss_dev):
    from svf_model import build_backbone
    from svf_model.evaluate import make_predictor
    from svf_model.heads import build_head
    from svf_model.model import FewShotSegmenter

    backbone = build_backbone("efficientnet_lite2").eval()
    model = FewShotSegmenter(backbone, build_head("prototype", backbone))
    episodes = make_episodes(FSSFolder(fss_dev), 3, 1, seed=0, classes=CLASSES)  # a prefix of the CLI's 6
    result = evaluate(lambda: make_predictor(model, 161, "cpu"), episodes, progress=False,
                      relpath=episodes.source.relpath)
    cli, _ = cli_result
    assert [e["query"] for e in result["episodes"]] == [e["query"] for e in cli["episodes"][:3]]
    assert [e["iou"] for e in result["episodes"]] == pytest.approx([e["iou"] for e in cli["episodes"][:3]], abs=1e-6)
    assert "class" in format_table(result) and "mIoU" in format_table(result)
    assert cli["config"]["flip"] is False


def test_cli_flip_segments_each_query_with_its_mirror_too(cli_result, fss_dev, tmp_path):
    out = tmp_path / "flip.json"
    cli, _ = cli_result
    with kept_torch_threads():
        main(["--model", "prototype", "--backbone", "efficientnet_lite2", "--data", str(fss_dev), "--classes",
              *CLASSES, "--shots", "1", "--episodes", "3", "--seed", "0", "--size", "161", "--threads", "1",
              "--flip", "--json", str(out), "--quiet"])
    flipped = json.loads(out.read_text())
    assert flipped["config"]["flip"] is True
    assert [e["query"] for e in flipped["episodes"]] == [e["query"] for e in cli["episodes"][:3]]
    assert [e["iou"] for e in flipped["episodes"]] != [e["iou"] for e in cli["episodes"][:3]]


class _FakePredictor:
    """Predicts every other row of the query's object; once adapted, the whole object."""

    def __init__(self) -> None:
        self.adapted, self.adapt_calls, self.resets = False, 0, 0
        self.label = None

    def set_supports(self, images, masks, ignore=None):  # noqa: ANN001
        assert len(images) == len(masks) == len(ignore)
        assert all(m.dtype == bool and m.any() for m in masks)

    def predict(self, image):  # noqa: ANN001, ANN201
        fg = self.label == 1
        if not self.adapted:
            fg = fg & (np.arange(fg.shape[0]) % 2 == 0)[:, None]
        return SimpleNamespace(mask=fg)

    def adapt(self, config=None):  # noqa: ANN001
        self.adapt_calls += 1
        self.adapted = True

    def reset(self):
        self.resets += 1
        self.adapted = False


def test_adapt_records_before_and_after(fss_dev):
    episodes = make_episodes(FSSFolder(fss_dev), 3, 2, seed=1, classes=CLASSES)
    fake = _FakePredictor()

    class Episodes(list):
        def __getitem__(self, i):  # the fake predicts from the label: hand it over
            ep = super().__getitem__(i)
            fake.label = ep.query_mask
            return ep

    result = evaluate(fake, Episodes(episodes[i] for i in range(3)), adapt=True, progress=False)
    assert fake.adapt_calls == 3 and fake.resets == 3
    assert result["adapt_seconds"]["median"] >= 0 and result["adapt_seconds"]["p90"] >= 0
    for ep in result["episodes"]:
        assert ep["iou"] == ep["iou_after"] == 1.0
        assert ep["iou_before"] == pytest.approx(0.5, abs=0.05)
    assert result["miou"] == 100.0 and result["miou_before"] == pytest.approx(50, abs=5)
    change = result["adapt_change"]  # every episode went from about 0.5 to 1.0
    assert change["episodes"] == 3 and change["mean"] == pytest.approx(50, abs=5)
    assert change["share_gaining_5pts"] == 1.0 and change["share_losing_5pts"] == 0.0


def test_real_adaptation_if_available(fss_dev):
    pytest.importorskip("svf_model.delta")
    from svf_model.predictor import Predictor
    from svf_model.registry import load_model

    model, _ = load_model(None)
    episodes = make_episodes(FSSFolder(fss_dev), 2, 2, seed=0, classes=CLASSES)
    result = evaluate(Predictor(model, image_size=129, device="cpu"), episodes, adapt=True, adapt_steps=2,
                      adapt_options={"image_size": 129}, progress=False)
    assert len(result["episodes"]) == 2
    assert all(0 <= e["iou_before"] <= 1 and 0 <= e["iou_after"] <= 1 for e in result["episodes"])
    assert result["adapt_seconds"]["median"] > 0
    assert [e["adapt_steps"] for e in result["episodes"]] == [2, 2]  # all steps ran: no time budget cut them
    # The support gate (default) is recorded per episode; an undone adaptation predicts as before.
    for e in result["episodes"]:
        assert 0 <= e["support_iou_before"] <= 1 and 0 <= e["support_iou_after"] <= 1
        assert e["reverted"] == (e["support_iou_after"] <= e["support_iou_before"])
        if e["reverted"]:
            assert e["iou_after"] == e["iou_before"]
    share = sum(e["reverted"] for e in result["episodes"]) / 2
    assert result["adapt_change"]["share_reverted"] == share


def test_trivial_floors_follow_the_labels(fss_dev):
    episodes = make_episodes(FSSFolder(fss_dev), 4, 1, seed=2, classes=CLASSES)
    floors = evaluate_trivial(episodes)
    meter = FewShotMeter()
    for i in range(len(episodes)):
        ep = episodes[i]
        meter.update(ep.class_name, np.ones_like(ep.query_mask, bool), ep.query_mask)
    assert floors["all_foreground"]["miou"] == pytest.approx(100 * meter.miou)
    assert floors["all_background"]["miou"] == 0.0
    assert 0 < floors["all_foreground"]["miou"] < 100


def test_device_check_pairs_a_run_with_the_cpu_run_of_the_same_episodes(tmp_path):
    """benchmarks/device_check.py compares a GPU run with the committed CPU run episode by episode."""
    from tests.helpers import load_benchmark

    device_check = load_benchmark("device_check")
    results = device_check.RESULTS
    reference = results / "eval_adapt_dual_5shot_everyday_seed3.json"
    run = json.loads(reference.read_text())
    run["episodes"] = run["episodes"][:20]
    run["episodes"][0]["iou_after"] += 0.10
    run["episodes"][1]["query"] = "elsewhere.jpg"  # not the same episode: left out
    run["episodes"][2]["adapt_steps"] = 4  # the time budget stopped it after 4 of 10 steps
    path = tmp_path / "device.json"
    path.write_text(json.dumps(run))
    out = device_check.compare_with_cpu(path, reference)
    assert (out["paired_episodes"], out["device_episodes"], out["cut_by_time_budget"]) == (19, 20, 1)
    assert out["mean_abs_diff_before_pts"] == 0 and out["same_gate_decision"] == 1
    assert out["mean_abs_diff_after_pts"] == pytest.approx(10 / 19)
    # Against an adapt_study file: the seed-12 run adapted without the depthwise values, the study with
    # them (decomposed, so their recomposed filters differ from the whole ones in the last bits).
    one_shot = results / "eval_adapt_dual_1shot_everyday_seed12.json"
    out = device_check.compare_with_cpu(one_shot, results / "adapt_study_dual_1shot_everyday_seed12_kernel.json")
    assert out["paired_episodes"] == 180 and out["mean_abs_diff_before_pts"] < 0.01
    assert out["mean_abs_diff_after_pts"] > 0.1 and out["cpu_adapt_seconds"]["median"] > 0
