"""Event handlers of the page. Every bad input becomes a message in the page (``gr.Error``), never a
stack trace; the stateless ``predict`` API lives here too."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import gradio as gr
import numpy as np

from svf_model.adapt import AdaptConfig
from svf_model.cue_report import Cue, cue_report, layer_changes
from svf_model.imageio import MAX_SIDE, InputError, load_mask
from svf_model.weights import CheckpointError

from . import drawing
from .session import MAX_SHOTS, ModelStore, Query, Scratch, Session, Shot, full_size, prepare_query, prepare_shot

logger = logging.getLogger(__name__)

CUE_COMPONENTS = 4
MAX_API_STEPS = 100
#: Number of outputs of the result and cue groups (see ``Callbacks.results`` / ``Callbacks.cues``).
N_RESULTS, N_CUES = 3, 4


def _message(exc: BaseException) -> str:
    if isinstance(exc, (InputError, CheckpointError, KeyError)):
        return str(exc).strip("'\"")
    if isinstance(exc, FloatingPointError):
        return f"{exc}: try a smaller learning rate or fewer steps"
    return f"internal error ({type(exc).__name__}: {exc}); the app keeps running, see the server log"


def _as_user_error(fn: Callable, exc: Exception) -> gr.Error:
    """The ``gr.Error`` shown for ``exc``; unexpected exceptions are also logged with their traceback."""
    if not isinstance(exc, (InputError, CheckpointError)):
        logger.exception("event %s failed", fn.__name__)
    return gr.Error(_message(exc))


def user_errors(fn: Callable) -> Callable:
    """Turn every exception of an event handler into a ``gr.Error`` with a readable message."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Iterator:
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:  # noqa: BLE001 - shown to the user
                raise _as_user_error(fn, exc) from exc

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - shown to the user
            raise _as_user_error(fn, exc) from exc

    return wrapper


def _paths(value: Any) -> list[str]:
    """Paths out of a gr.File / gr.Gallery value (``None``, a path, a list of paths or of (path, caption))."""
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    out = []
    for item in value:
        if isinstance(item, (tuple, list)):
            item = item[0]
        if isinstance(item, dict):
            item = item.get("path") or item.get("name")
        if item is not None:
            out.append(str(getattr(item, "path", item)))
    return out


def editor_image_and_mask(value: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """``gr.ImageEditor`` value (numpy) -> ``(image uint8 [H, W, 3|4], painted bool [H, W])``."""
    if not value or value.get("background") is None:
        raise InputError("upload a support photo into the editor first")
    background = np.asarray(value["background"])
    h, w = background.shape[:2]
    painted = np.zeros((h, w), bool)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer = np.asarray(layer)
        drawn = layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[2] == 4 else load_mask(layer)
        if drawn.shape != (h, w):
            drawn = cv2.resize(drawn.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
        painted |= drawn
    return background, painted


def _captioned_shots(shots: Sequence[Shot]) -> list[tuple[np.ndarray, str]]:
    return [
        (drawing.preview(drawing.overlay_mask(s.image, s.mask, drawing.SUPPORT)),
         f"{i + 1}. {s.name} ({s.mask.mean() * 100:.0f}% fg)")
        for i, s in enumerate(shots)
    ]


def _cue_gallery(image: np.ndarray, cues: list[Cue]) -> list[tuple[np.ndarray, str]]:
    return [(drawing.heat_map(image, c.heat, alpha=0.7, cmap="viridis"), c.caption) for c in cues]


def api_adapt_config(image_size: int, steps: int, gate: bool = True) -> AdaptConfig:
    """The library's default adaptation settings with ``steps`` steps, at most the model's image size;
    ``gate=False`` keeps the adaptation even when the shots' cross-check does not improve."""
    config = AdaptConfig(steps=steps, gate="support" if gate else "off")
    if config.image_size is not None:
        config.image_size = min(config.image_size, image_size)
    return config


def _stem(path: str) -> str:
    return Path(path).stem[:60] or "query"


class Callbacks:
    """The handlers, bound to one process-wide :class:`ModelStore`."""

    def __init__(self, store: ModelStore, examples: list[dict] | None = None, examples_root: Path | None = None):
        self.store = store
        self.examples = examples or []
        self.examples_root = examples_root or Path(".")
        self.api_scratch = Scratch(prefix="svf-api-")

    # -- helpers ----------------------------------------------------------------------------------
    def session(self, session: Session | None) -> Session:
        return session if isinstance(session, Session) else Session(self.store)

    def status(self, session: Session) -> str:
        entry = session.loaded.entry
        adapted = f"yes ({session.adapt_info})" if session.predictor.adapted else "no"
        title = f" ({entry.title})" if entry.title else ""
        return (
            f"**Device** {self.store.device.type} · **Model** `{entry.name}`{title} · "
            f"**Image size** {session.loaded.image_size} · **Shots** {len(session.shots)}/{MAX_SHOTS} · "
            f"{self._head_in_use(session)}**Adapted** {adapted} · **Last action** {session.last_action}"
        )

    @staticmethod
    def _head_in_use(session: Session) -> str:
        """For a model with low-shot values: which computation segments the current shots, and why."""
        predictor = session.predictor
        if getattr(predictor.model, "low_shot_values", None) is None or not predictor.num_shots:
            return ""
        used = "prototypes (low-shot values)" if predictor.uses_low_shot_values else "the whole head"
        if predictor.fallback_scores is not None:
            own, plain = predictor.fallback_scores
            used += f", shots' cross-check IoU {100 * own:.0f} whole head vs {100 * plain:.0f} prototypes"
        return f"**Segmenting with** {used} · "

    def _queries(self, value: Any) -> list[Query]:
        out = []
        for path in _paths(value):
            query = prepare_query(path, _stem(path))
            if query.downscaled:
                gr.Info(f"{Path(path).name} is larger than {MAX_SIDE} px: it is segmented downscaled "
                        "(the mask PNG has the original size)")
            out.append(query)
        return out

    def _results(self, session: Session, queries: list[Query]) -> tuple[list, list, list]:
        """Segment ``queries`` -> (overlay gallery, heat gallery, mask PNG paths at the original sizes)."""
        if not queries:
            return [], [], []
        preds = session.segment(queries)
        overlays, heats, files = [], [], []
        for query, pred in zip(queries, preds, strict=True):
            caption = f"{query.name}: {pred.mask.mean() * 100:.0f}% foreground, {pred.seconds:.2f} s"
            small = drawing.preview(query.image)
            overlays.append((drawing.overlay_mask(small, drawing.preview(pred.mask)), caption))
            prob = cv2.resize(pred.prob, small.shape[1::-1], interpolation=cv2.INTER_AREA)
            heats.append((drawing.heat_map(small, prob), f"{query.name}: foreground probability"))
            path = session.scratch.new(f"{query.name}_mask.png")
            files.append(str(drawing.save_mask_png(full_size(pred.mask, query.size), path)))
        return overlays, heats, files

    def _cue_outputs(self, session: Session, layer: str | None = None) -> tuple:
        """(layer dropdown update, bar chart, rising gallery, falling gallery) for the first query
        (or the first shot when there is no query yet)."""
        if not session.predictor.adapted:
            return gr.update(choices=[], value=None), None, [], []
        changes = layer_changes(session.predictor)
        chosen = next((c for c in changes if c.label == layer), changes[0])
        image = drawing.preview(session.queries[0].image if session.queries else session.shots[0].image)
        report = cue_report(session.predictor, image, chosen, CUE_COMPONENTS, changes)
        return (gr.update(choices=[c.label for c in changes], value=chosen.label),
                drawing.singular_value_figure(chosen), _cue_gallery(image, report.rising),
                _cue_gallery(image, report.falling))

    # -- shots ------------------------------------------------------------------------------------
    @user_errors
    def add_shot(self, session: Session | None, editor: dict | None, mask_file: Any):
        session = self.session(session)
        image, painted = editor_image_and_mask(editor)
        files = _paths(mask_file)
        mask = files[0] if files else painted
        source = "uploaded mask" if files else "painted"
        if len(session.shots) >= MAX_SHOTS:
            raise InputError(f"{MAX_SHOTS} shots is the maximum: remove one before adding another")
        if not files and not painted.any():
            raise InputError("nothing painted: paint the object with the brush (or upload a mask file)")
        shot, small = prepare_shot(image, mask, name=f"shot {len(session.shots) + 1}")
        if small:
            gr.Info(f"the photo is larger than {MAX_SIDE} px: it was downscaled")
        session.add_shot(shot)
        session.last_action = f"added shot {len(session.shots)} ({source}, {shot.mask.mean() * 100:.0f}% fg)"
        return session, _captioned_shots(session.shots), self.status(session), None

    @user_errors
    def remove_shot(self, session: Session | None, index: int | None):
        session = self.session(session)
        session.remove_shot(index)
        session.last_action = f"removed shot {index + 1}"
        return session, _captioned_shots(session.shots), self.status(session), None

    @user_errors
    def clear_shots(self, session: Session | None):
        session = self.session(session)
        session.set_shots([])
        session.last_action = "cleared the shots"
        return session, [], self.status(session), None

    @staticmethod
    def select_shot(evt: gr.SelectData) -> int | None:
        return evt.index if isinstance(evt.index, int) else None

    # -- segmentation -----------------------------------------------------------------------------
    @user_errors
    def segment(self, session: Session | None, queries: Any):
        session = self.session(session)
        loaded = self._queries(queries)
        if not loaded:
            raise InputError("add at least one query image to segment")
        start = time.perf_counter()
        overlays, heats, files = self._results(session, loaded)
        session.last_action = f"segmented {len(loaded)} quer{'y' if len(loaded) == 1 else 'ies'} in " \
                              f"{time.perf_counter() - start:.2f} s"
        return session, overlays, heats, files, self.status(session)

    # -- adaptation -------------------------------------------------------------------------------
    @user_errors
    def adapt(self, session: Session | None, queries: Any, steps: float, lr: float | None, gate: bool = True):
        """``lr`` 0 or None: the default step for the number of shots."""
        session = self.session(session)
        lr = float(lr or 0)
        if not lr >= 0:
            raise InputError("the learning rate must be positive (or 0 for the default step)")
        config = session.adapt_config(int(steps), lr, bool(gate))
        if config.steps < 1:
            raise InputError("set at least 1 adaptation step")
        loaded = self._queries(queries)
        session.sync()  # no shots -> clear message before anything starts
        skip = (gr.skip(),) * (N_RESULTS + 1 + N_CUES + 1)
        events: queue.Queue = queue.Queue()
        session.stop.clear()

        def work() -> None:
            try:
                events.put(("done", session.adapt(config, progress=lambda p: events.put(("step", p)))))
            except BaseException as exc:  # noqa: BLE001 - handed over to the event
                events.put(("error", exc))

        thread = threading.Thread(target=work, name="svf-adapt", daemon=True)
        finished = False
        try:
            thread.start()
            yield session, drawing.progress_html(0, config.steps, note=f"adapting on {len(session.shots)} shot(s)"), \
                *skip
            while True:
                kind, payload = events.get()
                if kind == "step":
                    yield session, drawing.progress_html(payload.step, payload.steps, payload.loss,
                                                         payload.seconds), *skip
                    continue
                finished = True
                if kind == "error":
                    raise payload
                result = payload
                break
        finally:
            if not finished:  # the browser went away: stop the worker at its next step
                session.stop.set()
        loss = result.losses[-1] if result.losses else None
        if result.skipped:
            note = result.skipped
        elif result.cancelled:
            note = "stopped: the singular values are unchanged"
        elif result.reverted:
            note = result.gate_message
        else:
            note = f"time budget reached after {result.steps} steps" if result.out_of_time else "done"
            note += "".join(f". {text}" for text in (result.gate_message, result.note) if text)
        bar = drawing.progress_html(result.steps, config.steps, loss, result.seconds, note)
        session.last_action = f"adapt: {note}, {result.steps} steps in {result.seconds:.1f} s"
        if result.cancelled or result.skipped or result.reverted:
            yield session, bar, *skip[:-1], self.status(session)
            return
        overlays, heats, files = self._results(session, loaded)
        svf_path = session.scratch.new(f"{session.model_name}_svf.safetensors")
        session.predictor.export_svf(str(svf_path))
        yield (session, bar, overlays, heats, files, str(svf_path), *self._cue_outputs(session),
               self.status(session))

    @staticmethod
    def stop(session: Session | None) -> None:
        if isinstance(session, Session):
            session.stop.set()

    @user_errors
    def reset(self, session: Session | None, queries: Any):
        session = self.session(session)
        session.reset()
        session.last_action = "back to the pretrained singular values"
        loaded = self._queries(queries)
        results = self._results(session, loaded) if loaded and session.shots else ([], [], [])
        return (session, drawing.progress_html(0, 0, note="reset"), *results, None, *self._cue_outputs(session),
                self.status(session))

    @user_errors
    def import_svf(self, session: Session | None, upload: Any, queries: Any):
        session = self.session(session)
        files = _paths(upload)
        if not files:
            raise InputError("choose a .safetensors file exported by this app")
        try:
            session.predictor.import_svf(files[0])
        except (OSError, ValueError, RuntimeError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"{Path(files[0]).name} is not a singular-value file of this model ({exc})") from exc
        session.adapt_info = f"loaded from {Path(files[0]).name}"
        session.last_action = f"loaded singular values from {Path(files[0]).name}"
        loaded = self._queries(queries)
        results = self._results(session, loaded) if loaded and session.shots else ([], [], [])
        return (session, drawing.progress_html(0, 0, note="singular values loaded"), *results, files[0],
                *self._cue_outputs(session), self.status(session))

    # -- cue panel --------------------------------------------------------------------------------
    @user_errors
    def show_cues(self, session: Session | None, layer: str | None):
        session = self.session(session)
        if not session.predictor.adapted:
            raise InputError("adapt first: the cue panel shows what the adaptation changed")
        return self._cue_outputs(session, layer)[1:]

    # -- model ------------------------------------------------------------------------------------
    @user_errors
    def set_model(self, session: Session | None, name: str):
        session = self.session(session)
        try:
            session.set_model(name)
        except (CheckpointError, InputError) as exc:
            gr.Warning(f"{exc} (staying with {session.model_name})")
            return (session, session.model_name, *(gr.skip(),) * (2 + N_RESULTS + N_CUES), self.status(session))
        session.last_action = f"model {name} loaded ({session.loaded.seconds:.1f} s)"
        return (session, name, drawing.progress_html(0, 0, note="new model"), [], [], [], None,
                gr.update(choices=[], value=None), None, [], [], self.status(session))

    @user_errors
    def on_load(self, session: Session | None):
        session = self.session(session)
        return session, self.status(session)

    # -- examples ---------------------------------------------------------------------------------
    @user_errors
    def load_example(self, session: Session | None, index: int | None):
        session = self.session(session)
        if index is None or not 0 <= int(index) < len(self.examples):
            raise InputError("pick one of the examples")
        example = self.examples[int(index)]
        root = self.examples_root
        shots = [prepare_shot(root / s["photo"], root / s["mask"], name=Path(s["photo"]).stem)[0]
                 for s in example["supports"]]
        session.set_shots(shots)
        session.reset()
        session.last_action = f"example '{example['name']}' loaded"
        queries = [str(root / q["photo"]) for q in example["queries"]]
        return (session, _captioned_shots(session.shots), queries, [], [], [], None,
                gr.update(choices=[], value=None), None, [], [], self.status(session))

    # -- stateless API ----------------------------------------------------------------------------
    @user_errors
    def api_predict(self, support_images: Any, support_masks: Any, query: Any, adapt_steps: float | None,
                    adapt_gate: bool = True):
        """Stateless: supports + masks + one query (+ optional adaptation) -> mask PNG, overlay, JSON."""
        images, masks, queries = _paths(support_images), _paths(support_masks), _paths(query)
        steps = int(adapt_steps or 0)
        if not images:
            raise InputError("give at least one support image")
        if len(images) != len(masks):
            raise InputError(f"{len(images)} support images but {len(masks)} masks: give one mask per image")
        if len(images) > MAX_SHOTS:
            raise InputError(f"{len(images)} shots given; at most {MAX_SHOTS} are supported")
        if len(queries) != 1:
            raise InputError("give exactly one query image")
        if not 0 <= steps <= MAX_API_STEPS:
            raise InputError(f"adapt steps must be between 0 and {MAX_API_STEPS}")
        start = time.perf_counter()
        predictor, loaded = self.store.predictor()
        shots = [prepare_shot(img, msk, name=f"shot {i + 1}")[0]
                 for i, (img, msk) in enumerate(zip(images, masks, strict=True))]
        query = prepare_query(queries[0], _stem(queries[0]))
        predictor.set_supports([s.image for s in shots], [s.mask for s in shots])
        timings = {"supports": time.perf_counter() - start}
        info: dict[str, Any] = {"model": loaded.entry.name, "image_size": loaded.image_size,
                                "device": self.store.device.type, "shots": len(shots)}
        if steps > 0:
            config = api_adapt_config(loaded.image_size, steps, bool(adapt_gate))
            result = predictor.adapt(config)
            timings["adapt"] = result.seconds
            info["adapt"] = {"steps": result.steps, "losses": [round(x, 5) for x in result.losses],
                             "out_of_time": result.out_of_time, "skipped": result.skipped, "lr": result.lr,
                             **result.gate_fields()}
            info["layers"] = [
                {"layer": c.label, "score": round(c.score, 6),
                 "rising": [[i, round(v, 5)] for i, v in c.top(5, rising=True)],
                 "falling": [[i, round(v, 5)] for i, v in c.top(5, rising=False)]}
                for c in layer_changes(predictor)[:3]
            ]
        pred = predictor.predict(query.image)
        timings["predict"] = pred.seconds
        timings["total"] = time.perf_counter() - start
        info["foreground_fraction"] = round(float(pred.mask.mean()), 5)
        info["seconds"] = {k: round(v, 4) for k, v in timings.items()}
        info["downscaled"] = query.downscaled
        path = drawing.save_mask_png(full_size(pred.mask, query.size), self.api_scratch.new(f"{query.name}_mask.png"))
        return str(path), drawing.overlay_mask(query.image, pred.mask), json.dumps(info, indent=1)

