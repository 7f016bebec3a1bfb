"""The Gradio app of the SVF few-shot segmentation library (``python app.py`` starts it).

The app imports :mod:`svf_model`; the library never imports the app.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from .layout import build_demo  # noqa: E402
from .session import MAX_SHOTS, ModelStore, Session  # noqa: E402

__all__ = ["MAX_SHOTS", "ModelStore", "Session", "build_demo"]
