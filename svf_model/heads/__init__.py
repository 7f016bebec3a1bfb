"""Few-shot heads. Each module holds one head; :func:`build_head` creates one by method name."""

from __future__ import annotations

from collections.abc import Callable

from ..backbones import Backbone
from ..model import FewShotHead
from .prototype import PrototypeHead

HeadBuilder = Callable[..., FewShotHead]
_HEADS: dict[str, HeadBuilder] = {"prototype": lambda backbone, **kw: PrototypeHead(**kw)}


def register_head(method: str) -> Callable[[HeadBuilder], HeadBuilder]:
    """Decorator registering ``fn(backbone, **kwargs) -> FewShotHead`` under ``method``."""

    def deco(fn: HeadBuilder) -> HeadBuilder:
        _HEADS[method] = fn
        return fn

    return deco


def list_heads() -> list[str]:
    return sorted(_HEADS)


def build_head(method: str, backbone: Backbone, **kwargs) -> FewShotHead:
    """Build the head ``method`` sized for ``backbone`` (its ``channels``)."""
    if method not in _HEADS:
        raise KeyError(f"unknown head {method!r}; available: {', '.join(list_heads())}")
    return _HEADS[method](backbone, **kwargs)


from . import bam, baseline, pfenet, refine  # noqa: E402,F401  (registers the learned heads)
