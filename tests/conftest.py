"""Shared test fixtures: offline mode, the fss-dev data folder, small thread counts."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: no busy-waiting threads

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

pytest_plugins = ["tests.app_server"]  # the `server` fixture of the app tests

REPO = Path(__file__).resolve().parents[1]
FSS_DEV = Path(os.environ.get("FSS_DEV", REPO.parent / "shared" / "data" / "fss-dev"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow test: pass --runslow to run it")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU, none present")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not (torch.cuda.is_available() or os.environ.get("SVF_TEST_ACCELERATOR")):
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def fss_dev() -> Path:
    """The real data folder ``../shared/data/fss-dev`` (skips when it is absent)."""
    if not (FSS_DEV / "classes.json").is_file():
        pytest.skip(f"real data not found at {FSS_DEV} (set FSS_DEV=...)")
    return FSS_DEV


@pytest.fixture(scope="session")
def lite2():
    """The embedded EfficientNet-Lite2 backbone with its real ImageNet weights, in eval mode."""
    from svf_model import build_backbone

    return build_backbone("efficientnet_lite2").eval()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: on the shared 2-core machine, LAPACK's SVD and small convs
    slow down several-fold when 2 threads share busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
