"""The app served in-process on a free loopback port, shared by the gradio_client and browser tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

IMAGE_SIZE = int(os.environ.get("SVF_APP_IMAGE_SIZE", "193"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """URL of the app (registry default model at ``IMAGE_SIZE``), closed after the module."""
    from app import ModelStore, build_demo

    store = ModelStore(image_size=IMAGE_SIZE, device="cpu")
    store.get()
    demo = build_demo(store)
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo.local_url if getattr(demo, "local_url", None) else f"http://127.0.0.1:{demo.server_port}/"
    demo.close()
