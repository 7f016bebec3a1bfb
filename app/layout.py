"""The page: components (with stable ``elem_id``s for tests) and the events that connect them."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from svf_model.adapt import AdaptConfig, default_step_text
from svf_model.imageio import MAX_SIDE

from . import drawing
from .callbacks import Callbacks
from .session import MAX_SHOTS, ModelStore, close_session

ASSETS = Path(__file__).resolve().parents[1] / "assets"
#: Sessions idle this long are dropped (their files removed).
SESSION_TTL_S = 3 * 3600

INTRO = f"""
# Few-shot segmentation with Singular Value Fine-tuning
Paint the object on 1-{MAX_SHOTS} support photos, then segment it in new photos. **Adapt** fine-tunes
only the backbone's singular values on your shots (SVF, NeurIPS 2022); the **cue panel** shows which
singular components the adaptation turned up and down, and where on a photo they respond.
Photos larger than {MAX_SIDE} px are downscaled; nothing leaves this machine.
"""


def load_examples(root: Path = ASSETS) -> list[dict]:
    path = root / "examples.json"
    return json.loads(path.read_text())["examples"] if path.is_file() else []


def build_demo(store: ModelStore, examples_root: Path = ASSETS) -> gr.Blocks:
    """The whole app on one shared :class:`ModelStore` (each browser session gets its own Predictor)."""
    examples = load_examples(examples_root)
    gr.set_static_paths([examples_root])  # example photos are served wherever the app is started from
    cb = Callbacks(store, examples, examples_root)
    defaults = AdaptConfig()

    with gr.Blocks(title="SVF few-shot segmentation", analytics_enabled=False) as demo:
        state = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=close_session)
        selected = gr.State(None)
        gr.Markdown(INTRO)
        with gr.Row():
            model = gr.Dropdown(store.names, value=store.default, label="Model", elem_id="model-select", scale=1)
            status = gr.Markdown("loading the model...", elem_id="status")
        if examples:
            example_set = gr.Dataset(
                components=[gr.Image(visible=False)],
                samples=[[str(examples_root / ex["supports"][0]["photo"])] for ex in examples],
                sample_labels=[ex["title"] for ex in examples], type="index", label="Examples (one click loads "
                "the shots and the queries and segments them)", elem_id="examples", layout="gallery",
            )

        with gr.Row(equal_height=False):
            with gr.Column():
                gr.Markdown("### 1. Shots: paint the object")
                editor = gr.ImageEditor(
                    label="Support photo: upload, then paint the object (painted pixels = foreground)",
                    type="numpy", image_mode="RGB", sources=("upload", "clipboard"), transforms=(),
                    brush=gr.Brush(colors=["#ff3b30"], default_color="#ff3b30", color_mode="fixed"),
                    eraser=gr.Eraser(), layers=gr.LayerOptions(layers=["object"], allow_additional_layers=True),
                    format="png", elem_id="support-editor", height=420,
                )
                mask_file = gr.File(label="...or upload a mask for it (white / nonzero = object)",
                                    file_types=["image"], elem_id="support-mask", height=90)
                with gr.Row():
                    add = gr.Button("Add shot", variant="primary", elem_id="add-shot")
                    remove = gr.Button("Remove selected shot", elem_id="remove-shot")
                    clear = gr.Button("Clear shots", elem_id="clear-shots")
                shots = gr.Gallery(label=f"Shots (at most {MAX_SHOTS}; click one to select it)", columns=5,
                                   height=170, allow_preview=False, interactive=False, object_fit="contain",
                                   fit_columns=False, elem_id="shots-gallery")
            with gr.Column():
                gr.Markdown("### 2. Queries: segment new photos")
                queries = gr.Gallery(label="Query photos (upload one or several)", type="filepath",
                                     interactive=True, columns=4, height=200, file_types=["image"],
                                     object_fit="contain", elem_id="query-image")
                segment = gr.Button("Segment", variant="primary", elem_id="segment-btn")
                with gr.Tabs():
                    with gr.Tab("Masks"):
                        results = gr.Gallery(label="Predicted masks", columns=2, height=360, object_fit="contain",
                                             elem_id="result-gallery")
                    with gr.Tab("Foreground probability"):
                        heats = gr.Gallery(label="Foreground probability", columns=2, height=360, object_fit="contain",
                                           elem_id="heat-gallery")
                mask_files = gr.File(label="Masks as PNG (255 = object)", file_count="multiple",
                                     interactive=False, elem_id="mask-files", height=140)

        gr.Markdown("### 3. Adapt: fine-tune the singular values on your shots")
        with gr.Row():
            adapt = gr.Button("Adapt", variant="primary", elem_id="adapt-btn")
            stop = gr.Button("Stop", variant="stop", elem_id="stop-btn")
            reset = gr.Button("Reset to pretrained", elem_id="reset-btn")
        progress = gr.HTML(drawing.progress_html(0, 0, note="not adapted"), elem_id="adapt-progress")
        with gr.Accordion("Advanced", open=False):
            with gr.Row():
                steps = gr.Slider(1, 100, value=defaults.steps, step=1, label="Steps", elem_id="adapt-steps")
                lr = gr.Number(defaults.lr or 0, label="Learning rate (relative step on the singular values; "
                               f"0: the default, {default_step_text()})",
                               minimum=0, maximum=1.0, step=0.001, elem_id="adapt-lr")
                gate = gr.Checkbox(defaults.gate != "off", label="Keep the adaptation only if it improves the "
                                   "shots' cross-check (each shot segmented from the others)", elem_id="adapt-gate")
            with gr.Row():
                svf_file = gr.File(label="Adapted singular values (.safetensors)", interactive=False,
                                   elem_id="svf-download", height=90)
                svf_upload = gr.UploadButton("Load singular values", file_types=[".safetensors"],
                                             elem_id="svf-upload")

        gr.Markdown("### 4. Cues: what the adaptation changed")
        gr.Markdown("The SVF paper reads the components that rise as foreground cues and those that fall as "
                    "background cues. Checked on labelled photos, the components an Adapt moves most respond "
                    "more on the object than others do, but whether they rose or fell did not tell object "
                    "from background (README, *Adaptation*).")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                cue_layer = gr.Dropdown([], label="Layer (most changed first)", elem_id="cue-layer")
                cue_plot = gr.Plot(label="Top-30 singular values, pretrained vs adapted", elem_id="cue-plot")
            with gr.Column(scale=2):
                cue_rising = gr.Gallery(label="Rose most (response on the first query)", columns=4,
                                        height=200, allow_preview=True, elem_id="cue-rising")
                cue_falling = gr.Gallery(label="Fell most (response on the first query)", columns=4,
                                         height=200, allow_preview=True, elem_id="cue-falling")

        with gr.Accordion("Stateless API (api_name='predict')", open=False):
            gr.Markdown("Supports, masks and one query in, mask out; each call has its own predictor. "
                        "See the README for a `gradio_client` example.")
            with gr.Row():
                api_images = gr.File(label="Support images", file_count="multiple", file_types=["image"],
                                     elem_id="api-supports")
                api_masks = gr.File(label="Support masks (white = object)", file_count="multiple",
                                    file_types=["image"], elem_id="api-masks")
                api_query = gr.File(label="Query image", file_types=["image"], elem_id="api-query")
                api_steps = gr.Number(0, label="Adapt steps (0 = none)", precision=0, minimum=0,
                                      elem_id="api-steps")
                api_gate = gr.Checkbox(True, label="Keep adaptation only if the shots' cross-check improves",
                                       elem_id="api-gate")
            api_run = gr.Button("Run", elem_id="api-run")
            with gr.Row():
                api_mask = gr.File(label="Mask PNG", elem_id="api-mask")
                api_overlay = gr.Image(label="Overlay", elem_id="api-overlay")
                api_json = gr.Code(label="Details", language="json", elem_id="api-json")

        results_out = [results, heats, mask_files]
        cues_out = [cue_layer, cue_plot, cue_rising, cue_falling]
        adapt_out = [state, progress, *results_out, svf_file, *cues_out, status]

        demo.load(cb.on_load, [state], [state, status], api_visibility="private")
        # Progress and error badges go on the status line / result gallery only, not on every output.
        add.click(cb.add_shot, [state, editor, mask_file], [state, shots, status, mask_file], api_name="add_shot",
                  show_progress_on=[status])
        shots.select(cb.select_shot, None, selected, api_visibility="private")
        remove.click(cb.remove_shot, [state, selected], [state, shots, status, selected], api_name="remove_shot",
                     show_progress_on=[status])
        clear.click(cb.clear_shots, [state], [state, shots, status, selected], api_name="clear_shots",
                    show_progress_on=[status])
        segment.click(cb.segment, [state, queries], [state, *results_out, status], api_name="segment",
                      show_progress_on=[results])
        adapt.click(cb.adapt, [state, queries, steps, lr, gate], adapt_out, api_name="adapt",
                    concurrency_limit=1, concurrency_id="adapt", show_progress="hidden")
        stop.click(cb.stop, [state], None, api_name="stop", concurrency_limit=None, show_progress="hidden")
        reset.click(cb.reset, [state, queries], adapt_out, api_name="reset", show_progress_on=[progress])
        svf_upload.upload(cb.import_svf, [state, svf_upload, queries], adapt_out, api_name="import_svf",
                          show_progress_on=[progress])
        cue_layer.input(cb.show_cues, [state, cue_layer], [cue_plot, cue_rising, cue_falling], api_name="cues",
                        show_progress_on=[cue_plot])
        model.input(cb.set_model, [state, model], [state, model, progress, *results_out, svf_file, *cues_out, status],
                    api_name="set_model", concurrency_id="adapt", show_progress_on=[status])
        if examples:
            example_set.click(
                cb.load_example, [state, example_set],
                [state, shots, queries, *results_out, svf_file, *cues_out, status], api_name="load_example",
                show_progress_on=[status],
            ).success(cb.segment, [state, queries], [state, *results_out, status], api_visibility="private",
                      show_progress_on=[results])
        api_run.click(cb.api_predict, [api_images, api_masks, api_query, api_steps, api_gate],
                      [api_mask, api_overlay, api_json], api_name="predict", concurrency_limit=2, concurrency_id="api")
    return demo
