"""``python -m svf_model.predict`` on real fss-dev photos: outputs, accuracy floor, bad inputs, SVF export.

Most runs call :func:`svf_model.predict.main` in-process with the registry's default model loaded
once; one run goes through a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from svf_model.predict import main
from svf_model.predictor import Predictor
from svf_model.registry import load_model
from tests.helpers import iou

REPO = Path(__file__).resolve().parents[1]
SIZE = 161
OPTIONS = ("--model", "--checkpoint", "--list-models", "--support", "--query", "--out", "--size", "--threshold",
           "--adapt-steps", "--adapt-lr", "--no-gate", "--device", "--flip", "--precision", "--save-svf")


@pytest.fixture(scope="module")
def default_model():
    return load_model()


@pytest.fixture(autouse=True)
def load_once(default_model, monkeypatch):
    """In-process runs reuse one loaded default model (``main`` imports ``load_model`` per call)."""
    model, entry = default_model
    monkeypatch.setattr("svf_model.registry.load_model", lambda name=None, **kw: (model, entry))


@pytest.fixture(scope="module")
def horse(fss_dev) -> list[tuple[Path, Path]]:
    """(photo, mask) paths of the first five horses."""
    photos = sorted((fss_dev / "horse").glob("*.jpg"))[:5]
    return [(p, p.with_suffix(".png")) for p in photos]


def support_args(pairs) -> list[str]:
    return [a for img, msk in pairs for a in ("--support", f"{img}:{msk}")]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: --help and usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err
    assert words in lines[0], lines[0]


def test_help_lists_every_option(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for option in OPTIONS:
        assert option in out, option


def test_list_models_prints_the_default_first(capsys, default_model):
    code, out, _ = run(["--list-models"], capsys)
    assert code == 0 and out.splitlines()[0] == default_model[1].name


def test_real_run_writes_outputs_at_original_size(horse, tmp_path, capsys):
    queries = [horse[2][0], horse[3][0]]
    twin = tmp_path / "elsewhere" / horse[3][0].name  # same file name in another folder
    twin.parent.mkdir()
    shutil.copy(horse[3][0], twin)
    out_dir = tmp_path / "out"
    code, out, err = run([*support_args(horse[:2]), *[a for q in [*queries, twin] for a in ("--query", q)],
                          "--out", out_dir, "--size", SIZE], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["image_size"] == SIZE and len(report["queries"]) == 3 and report["flip"] is False
    stems = [queries[0].stem, queries[1].stem, queries[1].stem + "-2"]
    ious, floors = [], []
    for query, stem, entry in zip([*queries, twin], stems, report["queries"], strict=True):
        w, h = Image.open(query).size
        mask_img = Image.open(out_dir / f"{stem}_mask.png")
        prob_img = Image.open(out_dir / f"{stem}_prob.png")
        overlay_img = Image.open(out_dir / f"{stem}_overlay.jpg")
        assert mask_img.size == prob_img.size == overlay_img.size == (w, h)
        assert overlay_img.mode == "RGB"
        mask = np.asarray(mask_img)
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 0, np.asarray(prob_img) > 127)
        assert entry["query"] == str(query) and entry["mask"] == str(out_dir / f"{stem}_mask.png")
        assert entry["foreground_fraction"] == pytest.approx((mask > 0).mean())
        gt = np.asarray(Image.open(horse[3][1] if query == twin else query.with_suffix(".png"))) > 127
        ious.append(iou(mask > 0, gt))
        floors.append(iou(np.ones_like(gt), gt))
    np.testing.assert_array_equal(np.asarray(Image.open(out_dir / f"{stems[1]}_mask.png")),
                                  np.asarray(Image.open(out_dir / f"{stems[2]}_mask.png")))
    assert all(i > f for i, f in zip(ious, floors, strict=True)), (ious, floors)
    assert np.mean(ious) > np.mean(floors) + 0.1, (ious, floors)


def test_flip_segments_the_query_and_its_mirror(horse, tmp_path, capsys):
    out_dir = tmp_path / "out"
    args = [*support_args(horse[:1]), "--query", horse[2][0], "--size", SIZE]
    code, out, err = run([*args, "--out", out_dir / "plain"], capsys)
    assert code == 0, err
    code, out, err = run([*args, "--out", out_dir / "flip", "--flip"], capsys)
    assert code == 0, err
    assert json.loads(out)["flip"] is True
    probs = [np.asarray(Image.open(out_dir / d / f"{horse[2][0].stem}_prob.png")) for d in ("plain", "flip")]
    assert probs[0].shape == probs[1].shape and not np.array_equal(*probs)


@pytest.fixture
def bad_files(horse, tmp_path) -> dict[str, Path]:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(horse[0][0].read_bytes()[:200])  # a truncated JPEG
    empty = tmp_path / "empty.png"
    w, h = Image.open(horse[0][0]).size
    Image.fromarray(np.zeros((h, w), np.uint8)).save(empty)
    return {"corrupt": corrupt, "empty": empty, "missing": tmp_path / "no_such_photo.jpg"}


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing query", "file not found"),
        ("missing mask", "file not found"),
        ("empty mask", "is empty"),
        ("corrupt support", "not a readable image"),
        ("support without colon", "IMAGE:MASK"),
        ("no query", "at least one"),
        ("save-svf without adaptation", "--adapt-steps"),
    ],
)
def test_bad_inputs_exit_2_with_one_line_error(case, words, horse, bad_files, tmp_path, capsys):
    (img, msk), query = horse[0], horse[1][0]
    argv = {
        "missing query": ["--support", f"{img}:{msk}", "--query", bad_files["missing"]],
        "missing mask": ["--support", f"{img}:{bad_files['missing']}", "--query", query],
        "empty mask": ["--support", f"{img}:{bad_files['empty']}", "--query", query],
        "corrupt support": ["--support", f"{bad_files['corrupt']}:{msk}", "--query", query],
        "support without colon": ["--support", img, "--query", query],
        "no query": ["--support", f"{img}:{msk}"],
        "save-svf without adaptation": ["--support", f"{img}:{msk}", "--query", query,
                                        "--save-svf", tmp_path / "d.safetensors"],
    }[case]
    code, out, err = run([*argv, "--out", tmp_path / "out", "--size", SIZE], capsys)
    assert_one_line_error(code, err, words)
    assert out == ""
    if case == "missing query":
        assert str(bad_files["missing"]) in err


def test_subprocess_corrupt_query_exits_2_without_traceback(horse, bad_files, tmp_path):
    (img, msk), out_dir = horse[0], tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "svf_model.predict", "--support", f"{img}:{msk}", "--query", str(horse[1][0]),
         "--query", str(bad_files["corrupt"]), "--out", str(out_dir), "--size", str(SIZE)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert_one_line_error(proc.returncode, proc.stderr, "corrupt.jpg is not a readable image")
    assert proc.stdout == ""
    assert (out_dir / f"{horse[1][0].stem}_mask.png").is_file()  # the good query before it was written


def test_adapt_and_save_svf_writes_a_delta_the_predictor_accepts(horse, tmp_path, capsys, default_model):
    model, entry = default_model
    delta, out_dir, query = tmp_path / "horse.safetensors", tmp_path / "out", horse[2][0]
    code, out, err = run([*support_args(horse[:2]), "--query", query, "--out", out_dir, "--size", SIZE,
                          "--adapt-steps", 2, "--no-gate", "--save-svf", delta], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["adapt"]["steps"] == 2 and report["adapt"]["skipped"] is None
    assert report["adapt"]["reverted"] is False and report["adapt"]["support_iou_before"] is None
    assert "adapt step 2/2" in err
    assert delta.is_file()

    predictor = Predictor(model, image_size=SIZE, device="cpu", model_name=entry.name)
    base = predictor.svf_values()
    predictor.import_svf(str(delta))
    assert predictor.adapted
    moved = [k for k, v in predictor.svf_values().items() if not torch.equal(v, base[k])]
    assert moved, "two adaptation steps changed no singular value"
    predictor.set_supports([str(p) for p, _ in horse[:2]], [str(m) for _, m in horse[:2]])
    prob = np.round(predictor.predict(str(query)).prob * 255)
    written = np.asarray(Image.open(out_dir / f"{query.stem}_prob.png")).astype(np.float64)
    assert np.abs(prob - written).max() <= 1
