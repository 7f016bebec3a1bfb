"""How fast the app feels: ``python app.py`` start -> page ready, Segment (1 shot + 1 query), Adapt (5 shots), Reset.

Starts the real app as a subprocess on a free 127.0.0.1 port and drives it with ``gradio_client``,
like a browser session would. Prints a table and a JSON line (``--json PATH`` also writes it).

    HF_HUB_OFFLINE=1 python benchmarks/app_speed.py                 # the registry's default model and size
    HF_HUB_OFFLINE=1 python benchmarks/app_speed.py --image-size 193

Targets on a 2-core CPU: page < 15 s, Segment < 2 s, Adapt (5 shots, default settings) < 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from svf_model.adapt import AdaptConfig  # noqa: E402

FSS_DEV = Path(os.environ.get("FSS_DEV", REPO.parent / "shared" / "data" / "fss-dev"))
TARGETS = {"page_ready_s": 15.0, "segment_s": 2.0, "adapt_5_shots_s": 30.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def photo_pairs() -> list[tuple[str, str]]:
    """Six (photo, mask) pairs of one class: fss-dev horses when present, else the bundled examples."""
    if (FSS_DEV / "horse").is_dir():
        photos = sorted((FSS_DEV / "horse").glob("*.jpg"))[:6]
        return [(str(p), str(p.with_suffix(".png"))) for p in photos]
    assets = REPO / "assets"
    names = ["astronaut", "camera", "grace_hopper", "motorcycle_left", "motorcycle_right", "coins_top"]
    return [(str(next((assets / "photos").glob(f"{n}.*"))), str(assets / "masks" / f"{n}.png")) for n in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's own")
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of the app")
    parser.add_argument("--repeats", type=int, default=3, help="Segment repeats (the median is reported)")
    parser.add_argument("--no-flip", action="store_true", help="start the app with --no-flip (queries not mirrored)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from gradio_client import Client, handle_file

    port = free_port()
    cmd = [sys.executable, str(REPO / "app.py"), "--port", str(port)]
    if args.image_size:
        cmd += ["--image-size", str(args.image_size)]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.no_flip:
        cmd += ["--no-flip"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    env.pop("SVF_APP_IMAGE_SIZE", None)
    url = f"http://127.0.0.1:{port}/"
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(url, 300, proc)
        page_ready = time.perf_counter() - start
        client = Client(url, verbose=False)
        pairs = photo_pairs()

        def editor(photo: str) -> dict:
            return {"background": handle_file(photo), "layers": [], "composite": handle_file(photo), "id": None}

        t = time.perf_counter()
        *_, status = client.predict(editor(pairs[0][0]), handle_file(pairs[0][1]), api_name="/add_shot")
        first_event = time.perf_counter() - start  # includes waiting for the model to load
        add_shot = time.perf_counter() - t
        queries = [{"image": handle_file(pairs[5][0]), "caption": None}]
        segment_times = []
        for _ in range(args.repeats + 1):  # the first call also encodes the shot
            t = time.perf_counter()
            *_, status = client.predict(queries, api_name="/segment")
            segment_times.append(time.perf_counter() - t)
        for photo, mask in pairs[1:5]:
            client.predict(editor(photo), handle_file(mask), api_name="/add_shot")
        t = time.perf_counter()
        defaults = AdaptConfig()  # what the page's Adapt button starts with
        out = client.predict(queries, defaults.steps, defaults.lr or 0, defaults.gate == "support", api_name="/adapt")
        adapt_event = time.perf_counter() - t
        status = out[-1]
        t = time.perf_counter()
        client.predict(queries, api_name="/reset")
        reset_event = time.perf_counter() - t
        inner = re.search(r"(\d+) steps in ([\d.]+) s", status)
        device = re.search(r"\*\*Device\*\* (\w+)", status)
        size = re.search(r"\*\*Image size\*\* (\d+)", status)
        model = re.search(r"\*\*Model\*\* `([^`]+)`", status)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    steady = sorted(segment_times[1:])
    result = {
        "model": model.group(1) if model else None,
        "image_size": int(size.group(1)) if size else None,
        "device": device.group(1) if device else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads or "default",
        "flip": not args.no_flip,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
        "page_ready_s": round(page_ready, 2),
        "first_event_s": round(first_event, 2),
        "add_shot_s": round(add_shot, 3),
        "segment_first_s": round(segment_times[0], 3),
        "segment_s": round(steady[len(steady) // 2], 3),
        "adapt_5_shots_s": round(adapt_event, 2),
        "adapt_5_shots_inner_s": float(inner.group(2)) if inner else None,
        "adapt_steps": int(inner.group(1)) if inner else None,
        "reset_s": round(reset_event, 3),
        "data": "fss-dev horse" if "fss-dev" in pairs[0][0] else "assets",
    }
    rows = [
        ("page ready (python app.py -> HTTP 200)", "page_ready_s"),
        ("first event answered (model loaded)", "first_event_s"),
        ("Add shot", "add_shot_s"),
        ("Segment, first (encodes the shot)", "segment_first_s"),
        ("Segment, 1 shot + 1 query (median)", "segment_s"),
        ("Adapt, 5 shots, event incl. re-segment + cues", "adapt_5_shots_s"),
        ("Adapt, 5 shots, the adaptation alone", "adapt_5_shots_inner_s"),
        ("Reset after it, incl. re-segment + cues", "reset_s"),
    ]
    print(f"model {result['model']}, image size {result['image_size']}, device {result['device']}, "
          f"{result['cpu_count']} CPUs, torch threads {result['torch_threads']}, "
          f"load average before/after {result['load_average_1min']}, data: {result['data']}")
    print(f"{'measure':48s} {'seconds':>9s} {'target':>8s}")
    for label, key in rows:
        target = TARGETS.get(key)
        print(f"{label:48s} {result[key]!s:>9s} {('< ' + str(target)) if target else '':>8s}")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
