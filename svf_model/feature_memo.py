"""Content-keyed memo of a backbone's frozen blocks ("encode once, query many").

A few-shot session pushes the same images through the backbone again and again: every
evaluation episode re-uses images of its class, adaptation runs the supports at every step, and
after adapting the supports and queries are encoded again although only the last block changed.
:class:`FeatureMemo` remembers, per input image, the output of the blocks that ran *before the
first block that trains or carries a forward hook* (the "cut"), keyed by

* a digest of the image tensor's bytes (shape, dtype, device and autocast state included), and
* a fingerprint of those blocks' weights: the *content* of every small parameter and buffer
  (singular values, BatchNorm; up to ``CONTENT_KEYED_NUMEL`` elements, re-hashed only when the
  tensor's version changes) and ``(id, version)`` of the large ones. Any in-place change (an
  optimiser step, :func:`svf_model.set_svf_state`) makes old entries unreachable, and putting the
  previous values back (Reset, switching between a model's value sets) makes them valid again.

A later call that can only use a shorter prefix (weights after it changed, or a block after it now
trains) resumes from the longest valid one. The backbone also names *anchors*, cuts worth keeping
although nothing trains there yet: the start of its first SVF block, so that switching between sets
of singular values (a model's value sets, adapt/reset, the 2-shot fallback check) re-runs only the
blocks those values belong to. Entries are evicted least-recently-used beyond ``max_bytes``; a
tensor shared by several entries of one image (a stage's output stored at two cuts) counts once.
Results equal a plain forward up to float rounding of batched vs single convolutions.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch
from torch import nn

Units = Sequence[tuple[str, nn.Module]]

CONTENT_KEYED_NUMEL = 1 << 16


class FeatureMemo:
    """LRU store of prefix outputs; see :meth:`forward` for how a backbone uses it.

    Args:
        max_bytes: memory budget of the stored tensors (on whatever device they were computed).
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[dict[str, torch.Tensor], torch.Tensor]] = OrderedDict()
        self._held: dict[int, tuple[torch.Tensor, int]] = {}  # id -> (tensor, entries holding it)
        self._cuts: set[int] = set()
        self._contents: dict[int, tuple[weakref.ref, int, str]] = {}  # id -> (tensor, version, digest)
        self.bytes = 0  # of the distinct tensors held
        self.hits = 0  # images served from a memo entry at the current cut
        self.resumed = 0  # images resumed from a shorter valid prefix
        self.misses = 0  # images run from the input

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._held.clear()
        self._contents.clear()
        self._cuts.clear()
        self.bytes = 0

    # -- keys ----------------------------------------------------------------------------------
    @staticmethod
    def _digest(x: torch.Tensor) -> tuple:
        """Identity of one input image ``x [3, H, W]``."""
        digest = _bytes_digest(x)
        kind = x.device.type
        autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        return digest, tuple(x.shape), x.dtype, str(x.device), autocast

    def _weight_key(self, t: torch.Tensor) -> tuple:
        """What identifies the value of one weight tensor (see the module docstring)."""
        if t.numel() > CONTENT_KEYED_NUMEL:
            return id(t), t._version
        known = self._contents.get(id(t))
        if known is not None and known[0]() is t and known[1] == t._version:
            return (known[2],)
        digest = f"{_bytes_digest(t)}:{tuple(t.shape)}:{t.dtype}:{t.device}"
        if len(self._contents) > 1 << 14:  # forget tensors that no longer exist
            self._contents = {k: v for k, v in self._contents.items() if v[0]() is not None}
        self._contents[id(t)] = (weakref.ref(t), t._version, digest)
        return (digest,)

    def _prefix_fingerprints(self, units: Units, cut: int) -> list[int]:
        """``fp[c]``: fingerprint of the weights of ``units[:c]`` for ``c = 0..cut``."""
        fps, acc = [hash(())], ()
        for _, block in units[:cut]:
            tensors = [*block.parameters(), *block.buffers()]
            acc = (hash(acc), tuple(self._weight_key(t) for t in tensors))
            fps.append(hash(acc))
        return fps

    # -- store ---------------------------------------------------------------------------------
    def _get(self, key: tuple) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry

    @staticmethod
    def _tensors(feats: dict[str, torch.Tensor], h: torch.Tensor) -> dict[int, torch.Tensor]:
        return {id(t): t for t in (*feats.values(), h)}

    def _hold(self, tensors: dict[int, torch.Tensor]) -> None:
        for key, t in tensors.items():
            count = self._held[key][1] if key in self._held else 0
            if count == 0:
                self.bytes += t.numel() * t.element_size()
            self._held[key] = (t, count + 1)

    def _release(self, tensors: dict[int, torch.Tensor]) -> None:
        for key, t in tensors.items():
            count = self._held[key][1] - 1
            if count == 0:
                self.bytes -= t.numel() * t.element_size()
                del self._held[key]
            else:
                self._held[key] = (t, count)

    def _new_bytes(self, tensors: dict[int, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for key, t in tensors.items() if key not in self._held)

    def _put(self, key: tuple, feats: dict[str, torch.Tensor], h: torch.Tensor) -> None:
        tensors = self._tensors(feats, h)
        if self._new_bytes(tensors) > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        self._hold(tensors)
        if old is not None:
            self._release(self._tensors(*old))
        self._entries[key] = (feats, h)
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self._release(self._tensors(*evicted))

    # -- forward -------------------------------------------------------------------------------
    def forward(self, units: Units, x: torch.Tensor, anchors: Iterable[int] = ()) -> dict[str, torch.Tensor]:
        """Run ``units`` (``[(stage, block)]`` in order) on ``x [B, 3, H, W]`` -> ``{stage: features}``.

        Blocks before the first one that trains or carries a forward hook run without gradient, per
        image, through the memo; the rest run live on the whole batch (with gradient if enabled), so
        hooks always fire. ``anchors``: indices into ``units`` whose inputs are stored too, on the way
        (see the module docstring).
        """
        cut = next((i for i, (_, m) in enumerate(units) if _must_run(m)), len(units))
        if cut == 0 or x.requires_grad:
            feats = _run(units, 0, len(units), x, {})
            feats.pop("__h__")
            return feats
        self._cuts.update(a for a in anchors if 0 < a < cut)
        fps = self._prefix_fingerprints(units, cut)
        candidates = sorted((c for c in self._cuts | {cut} if 0 < c <= cut), reverse=True)
        per_image: list[tuple[dict[str, torch.Tensor], torch.Tensor] | None] = []
        pending: dict[int, list[int]] = {}  # resume point -> images that start there
        starts: list[tuple[dict[str, torch.Tensor], torch.Tensor] | None] = []
        digests = [self._digest(img) for img in x]
        for b, digest in enumerate(digests):
            found = None
            for c in candidates:
                found = self._get((digest, c, fps[c]))
                if found is not None:
                    break
            if found is not None and c == cut:
                self.hits += 1
                per_image.append(found)
                starts.append(None)
                continue
            if found is None:
                self.misses += 1
            else:
                self.resumed += 1
            per_image.append(None)
            starts.append(found)
            pending.setdefault(c if found is not None else 0, []).append(b)
        with torch.no_grad():
            for start, images in pending.items():
                if start == 0:
                    h, feats = x[images], {}
                else:
                    h = torch.cat([starts[b][1] for b in images])
                    feats = {k: torch.cat([starts[b][0][k] for b in images]) for k in starts[images[0]][0]}
                # also remember the outputs at other known cut points on the way, so a later call
                # with a shorter frozen prefix (e.g. adaptation) can resume from them
                stops = sorted(c for c in self._cuts if start < c < cut) + [cut]
                # an image's tensors already stored at its resume point are shared, not copied
                kept = {b: dict(starts[b][0]) if start else {} for b in images}
                for stop in stops:
                    feats = _run(units, start, stop, h, feats)
                    h = feats.pop("__h__")
                    for j, b in enumerate(images):
                        mine_h = h[j : j + 1].clone()
                        for k, v in feats.items():
                            if k not in kept[b]:
                                kept[b][k] = mine_h if v is h else v[j : j + 1].clone()
                        mine = dict(kept[b])
                        self._put((digests[b], stop, fps[stop]), mine, mine_h)
                        per_image[b] = (mine, mine_h)
                    start = stop
        self._cuts.add(cut)
        h = torch.cat([e[1] for e in per_image])
        feats = {k: torch.cat([e[0][k] for e in per_image]) for k in per_image[0][0]}
        feats = _run(units, cut, len(units), h, feats)
        feats.pop("__h__")
        return feats


def _bytes_digest(t: torch.Tensor) -> str:
    """Hex digest of a tensor's bytes (copied to the host)."""
    host = t.detach().contiguous().cpu()
    if host.dtype == torch.bfloat16:
        host = host.view(torch.int16)
    return hashlib.blake2b(host.numpy().tobytes(), digest_size=16).hexdigest()


def _must_run(block: nn.Module) -> bool:
    """A block that cannot be served from the memo: it trains, or something listens to its forward."""
    return any(p.requires_grad for p in block.parameters()) or any(
        m._forward_hooks or m._forward_pre_hooks for m in block.modules()
    )


def _run(
    units: Units, start: int, stop: int, h: torch.Tensor, feats: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Run ``units[start:stop]`` from ``h``; a stage's output is recorded when its last block ran.
    The returned dict also holds the last output under ``"__h__"`` (popped by callers)."""
    feats = dict(feats)
    for i in range(start, stop):
        stage, block = units[i]
        h = block(h)
        if i + 1 == len(units) or units[i + 1][0] != stage:
            feats[stage] = h
    feats["__h__"] = h
    return feats
