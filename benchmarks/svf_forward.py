"""Latency and peak memory of SVF's forward forms against the frozen network they decompose.

For each backbone (dilated ``resnet50`` with SVF on layer2-4, ``efficientnet_lite2`` with SVF on
layer3-4), batch 1, one square image, on CPU (and CUDA when present), it times:

* forward, no grad: the plain frozen network, the SVF network (its no-grad path runs one conv per
  layer with the cached recomposed weight, so both forms share it), and the folded network;
* forward+backward, ``loss = layer4.sum()``: SVF in the ``three_layer`` and ``recompose`` forms
  (gradients reach the singular values only), and, as the floor any SVF training step pays, the
  plain frozen network back-propagating activation gradients through the same stages (the output of
  the stage before the first SVF stage is marked ``requires_grad``; no weight gradients).

Tasks are interleaved (the order rotates every repeat) so machine noise hits all of them alike;
ratios are per-repeat ratios to the plain network, then the median. Both wall time and process CPU
time are reported: on a shared CPU with one torch thread, CPU time is the steadier of the two (it
does not count time the process waits for a core); on CUDA only wall time means anything. Peak memory: CUDA
``max_memory_allocated`` above the level before the call; CPU peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs``, after ``malloc_trim``) above the RSS before the call.

Usage: ``HF_HUB_OFFLINE=1 python benchmarks/svf_forward.py [--repeats 3] [--size 473] [--json PATH]``
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svf_model import build_backbone  # noqa: E402
from svf_model.backbones import STAGES  # noqa: E402
from svf_model.svf import apply_svf, fold_svf, set_svf_form, svf_parameters, svf_stats  # noqa: E402

SVF_STAGES = {"resnet50": ("layer2", "layer3", "layer4"), "efficientnet_lite2": ("layer3", "layer4")}
FWD_VARIANTS = ("plain", "svf", "folded")
BWD_VARIANTS = ("plain", "three_layer", "recompose")
MiB = 2**20


# ---------------------------------------------------------------------------------------------
# peak memory


class PeakMemory:
    """Peak bytes allocated above the level at entry (``.peak`` after the block; ``None`` if unknown)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: int | None = None

    @staticmethod
    def _status(field: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back so RSS starts low
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self._base = self._status("VmRSS")
        except (OSError, AttributeError):
            self._base = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            self.peak = self._status("VmHWM") - self._base


# ---------------------------------------------------------------------------------------------
# variants


def make_backbone(name: str, device: torch.device) -> nn.Module:
    """Frozen, eval-mode backbone. Lite2 has its embedded weights; ResNet-50 random (timing only),
    with non-zero last-BN gammas so the residual branches are not dead."""
    backbone = build_backbone(name, weights="auto" if name.startswith("efficientnet") else None)
    if not backbone.pretrained:
        gen = torch.Generator().manual_seed(0)
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=gen)
    return backbone.eval().requires_grad_(False).to(device)


def run_stages(backbone: nn.Module, x: torch.Tensor, grad_from: str | None) -> torch.Tensor:
    """``layer4`` output. With ``grad_from``, the input of that stage requires grad (plain network's
    activation-gradient floor); stages before it never record autograd."""
    for name in STAGES:
        if name == grad_from:
            x = x.detach().requires_grad_(True)
        x = getattr(backbone, name)(x)
    return x


def build_tasks(name: str, device: torch.device, size: int) -> tuple[dict[tuple[str, str], Callable[[], None]], dict]:
    """``{(mode, variant): fn}`` with mode ``"fwd"`` / ``"fwd+bwd"``, plus facts about the setup."""
    stages = SVF_STAGES[name]
    plain = make_backbone(name, device)
    svf = copy.deepcopy(plain)
    start = time.perf_counter()
    apply_svf(svf.stages(list(stages)))
    decompose_s = time.perf_counter() - start
    folded = fold_svf(copy.deepcopy(svf))
    params = svf_parameters(svf)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def forward(model: nn.Module) -> Callable[[], None]:
        def fn() -> None:
            with torch.no_grad():
                run_stages(model, x, None)
            sync()

        return fn

    def plain_backward() -> None:
        run_stages(plain, x, stages[0]).sum().backward()
        sync()

    def svf_backward(form: str) -> Callable[[], None]:
        def fn() -> None:
            set_svf_form(svf, form)
            for p in params:
                p.grad = None
            run_stages(svf, x, None).sum().backward()
            sync()

        return fn

    with torch.no_grad():  # the three networks compute the same function before any tuning
        ref = run_stages(plain, x, None)
        for other in (svf, folded):
            err = ((run_stages(other, x, None) - ref).norm() / ref.norm()).item()
            assert err < 1e-4, f"{name}: SVF/folded network differs from plain by {err:.2e}"
    tasks = {
        ("fwd", "plain"): forward(plain),
        ("fwd", "svf"): forward(svf),
        ("fwd", "folded"): forward(folded),
        ("fwd+bwd", "plain"): plain_backward,
        ("fwd+bwd", "three_layer"): svf_backward("three_layer"),
        ("fwd+bwd", "recompose"): svf_backward("recompose"),
    }
    stats = svf_stats(svf)
    facts = {"svf_stages": list(stages), "svf_layers": stats.layers, "trainable": stats.trainable,
             "fraction": stats.fraction, "decompose_s": decompose_s}
    return tasks, facts


# ---------------------------------------------------------------------------------------------
# measurement


def measure(tasks: dict[tuple[str, str], Callable[[], None]], device: torch.device, repeats: int,
            warmup: int) -> dict[tuple[str, str], dict[str, list]]:
    """Run every task ``warmup + repeats`` times, interleaved, rotating the order each round."""
    keys = list(tasks)
    out = {k: {"seconds": [], "cpu_seconds": [], "peak_bytes": []} for k in keys}
    for round_ in range(warmup + repeats):
        shift = round_ % len(keys)
        for key in keys[shift:] + keys[:shift]:
            with PeakMemory(device) as mem:
                start, cpu_start = time.perf_counter(), time.process_time()
                tasks[key]()
                seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            if round_ >= warmup:
                out[key]["seconds"].append(seconds)
                out[key]["cpu_seconds"].append(cpu_seconds)
                out[key]["peak_bytes"].append(mem.peak)
        print(f"  round {round_ + 1}/{warmup + repeats} done", file=sys.stderr, flush=True)
    return out


def summarise(raw: dict[tuple[str, str], dict[str, list]]) -> list[dict]:
    rows = []
    for (mode, variant), data in raw.items():
        def ratios(field: str, data: dict = data, mode: str = mode) -> list[float]:
            return [t / b for t, b in zip(data[field], raw[(mode, "plain")][field], strict=True)]

        peaks = [p for p in data["peak_bytes"] if p is not None]
        rows.append({
            "mode": mode,
            "variant": variant,
            "median_ms": 1000 * statistics.median(data["seconds"]),
            "median_ratio_vs_plain": statistics.median(ratios("seconds")),
            "median_cpu_ms": 1000 * statistics.median(data["cpu_seconds"]),
            "median_cpu_ratio_vs_plain": statistics.median(ratios("cpu_seconds")),
            "peak_mib": statistics.median(peaks) / MiB if peaks else None,
            "seconds": data["seconds"],
            "cpu_seconds": data["cpu_seconds"],
            "peak_bytes": data["peak_bytes"],
        })
    return rows


def markdown(results: list[dict]) -> str:
    lines = []
    for res in results:
        f = res["facts"]
        lines.append(f"\n### {res['backbone']} on {res['device']} ({res['size']}x{res['size']}, batch 1, "
                     f"SVF on {'/'.join(f['svf_stages'])}: {f['svf_layers']} layers, {f['trainable']:,} values)\n")
        lines.append("| mode | variant | wall ms | x plain (wall) | CPU ms | x plain (CPU) | peak MiB above start |")
        lines.append("|---|---|---:|---:|---:|---:|---:|")
        for row in res["rows"]:
            peak = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
            lines.append(f"| {row['mode']} | {row['variant']} | {row['median_ms']:.0f} | "
                         f"{row['median_ratio_vs_plain']:.2f} | {row['median_cpu_ms']:.0f} | "
                         f"{row['median_cpu_ratio_vs_plain']:.2f} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=list(SVF_STAGES), choices=list(SVF_STAGES))
    parser.add_argument("--size", type=int, default=473)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per task (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped when absent")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "svf_forward.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = [torch.device(d) for d in args.devices if d != "cuda" or torch.cuda.is_available()]

    results = []
    load_start = os.getloadavg()
    for device in devices:
        for name in args.backbones:
            print(f"{name} on {device}: building", file=sys.stderr, flush=True)
            tasks, facts = build_tasks(name, device, args.size)
            raw = measure(tasks, device, args.repeats, args.warmup)
            results.append({"backbone": name, "device": str(device), "size": args.size, "facts": facts,
                            "rows": summarise(raw)})
            del tasks
            gc.collect()
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "repeats": args.repeats, "warmup": args.warmup,
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
    }
    print(markdown(results))
    print(f"\nload average (1/5/15 min) at start {load_start}, at end {env['loadavg_end']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"env": env, "results": results}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
