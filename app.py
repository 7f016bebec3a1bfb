"""Start the few-shot segmentation app: ``python app.py`` -> http://127.0.0.1:7860.

Options: ``--port`` (or env ``PORT`` / ``GRADIO_SERVER_PORT``), ``--host`` (or ``GRADIO_SERVER_NAME``;
Hugging Face Spaces sets 0.0.0.0), ``--model NAME`` (a registry name, default the registry's
default), ``--image-size N`` (or env ``SVF_APP_IMAGE_SIZE``; default the model's), ``--device``,
``--threads N`` (or ``SVF_APP_THREADS``; torch CPU threads), ``--share`` (off by default: a public
gradio.live link). No analytics; the Hugging Face Hub is only
contacted when a model hosted there is chosen and not yet downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse  # noqa: E402
import logging  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env_size = os.environ.get("SVF_APP_IMAGE_SIZE")
    env_port = os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT")
    parser = argparse.ArgumentParser(description="Few-shot segmentation with SVF: the Gradio app")
    parser.add_argument("--port", type=int, default=int(env_port) if env_port else 7860)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--model", default=os.environ.get("SVF_APP_MODEL") or None,
                        help="registered model name (default: the registry's default)")
    parser.add_argument("--image-size", type=int, default=int(env_size) if env_size else None,
                        help="input side in pixels (default: the model's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("SVF_APP_THREADS", "0")) or None,
                        help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--concurrency", type=int, default=2, help="events served at once (adaptation: 1)")
    parser.add_argument("--no-flip", action="store_true", default=os.environ.get("SVF_APP_FLIP") == "0",
                        help="segment each query once, not mirrored too (faster, less accurate; env SVF_APP_FLIP=0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from app import ModelStore, build_demo  # the package app/, not this file
    from svf_model.imageio import InputError

    try:
        store = ModelStore(default=args.model, image_size=args.image_size, device=args.device, flip=not args.no_flip)
    except InputError as exc:
        raise SystemExit(f"app.py: {exc}") from None
    store.preload()  # the page is served while the weights load
    demo = build_demo(store)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=64)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False,
                footer_links=["api", "gradio"])


if __name__ == "__main__":
    main()
