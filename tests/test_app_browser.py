"""The app in a real browser (Debian's chromium driven by Playwright): upload a support, paint a stroke,
add shots, segment a query, adapt with live progress, stop, read the cue panel. Screenshots go to
``artifacts/`` (CI artifacts)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-quic"]
#: Slow shared CI machines: generous waits (the happy path takes seconds on an idle 2-core machine).
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"app_{name}.png"), full_page=True)


def _status(page) -> str:
    return page.locator("#status").inner_text()


def test_paint_segment_adapt_and_cues_in_chromium(server, browser, fss_dev):
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    horses = sorted((fss_dev / "horse").glob("*.jpg"))
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.set_default_timeout(WAIT_MS)
    page.goto(server, wait_until="load")
    expect(page.locator("#status")).to_contain_text("Shots 0/5")

    # A mistake first: Add shot with no photo is a message in the page, and the page keeps working.
    page.locator("#add-shot").click()
    expect(page.get_by_text("upload a support photo into the editor first").first).to_be_visible()
    page.wait_for_timeout(800)  # let the message finish fading in
    _shot(page, "00_error_message")

    # Shot 1: upload a photo, paint a short stroke across the horse's body.
    page.locator("#support-editor input[type=file]").set_input_files(str(horses[0]))
    expect(page.locator("#support-editor button[title='Brush Size']")).to_be_visible()
    canvas = page.locator("#support-editor canvas").first
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] * 0.52, box["y"] + box["height"] * 0.5
    page.mouse.move(cx - 60, cy)
    page.mouse.down()
    for i in range(1, 13):
        page.mouse.move(cx - 60 + 10 * i, cy + (i % 3))
    page.mouse.up()
    _shot(page, "01_painted")
    page.locator("#add-shot").click()
    expect(page.locator("#status")).to_contain_text("Shots 1/5")
    caption = page.locator("#shots-gallery").inner_text()
    painted = int(re.search(r"\((\d+)% fg\)", caption).group(1))
    assert 0 < painted < 30, caption  # a short stroke: some, not all, of the photo

    # Shot 2: same way in, with the mask uploaded as a file instead of painted.
    page.locator("#support-editor input[type=file]").set_input_files(str(horses[1]))
    page.locator("#support-mask input[type=file]").set_input_files(str(horses[1].with_suffix(".png")))
    expect(page.locator("#support-mask")).to_contain_text(horses[1].with_suffix(".png").name)
    page.locator("#add-shot").click()
    expect(page.locator("#status")).to_contain_text("Shots 2/5")
    expect(page.locator("#shots-gallery img")).to_have_count(2)

    # Query: upload, segment, see the overlay, the heat map tab and the PNG download.
    page.locator("#query-image input[type=file]").set_input_files(str(horses[3]))
    expect(page.locator("#query-image img")).to_have_count(1)
    page.locator("#segment-btn").click()
    expect(page.locator("#result-gallery img").first).to_be_visible()
    expect(page.locator("#mask-files")).to_contain_text(f"{horses[3].stem}_mask")
    expect(page.locator("#status")).to_contain_text("segmented 1 query")
    _shot(page, "02_segmented")

    # Adapt (gate off, so that the cue panel has something to show): the progress bar moves step by
    # step, then the cue panel fills.
    page.get_by_text("Advanced").click()
    gate = page.locator("#adapt-gate input[type=checkbox]")
    expect(gate).to_be_checked()  # the library's default
    gate.uncheck()
    expect(gate).not_to_be_checked()
    page.locator("#adapt-btn").click()
    expect(page.locator("#adapt-progress")).to_contain_text(re.compile(r"step [1-9]\d*/10"))
    expect(page.locator("#adapt-progress")).to_contain_text("done")
    expect(page.locator("#status")).to_contain_text("Adapted yes")
    expect(page.locator("#cue-rising img").first).to_be_visible()
    expect(page.locator("#cue-falling img").first).to_be_visible()
    expect(page.locator("#cue-rising")).to_contain_text("%")
    expect(page.locator("#cue-plot img, #cue-plot svg").first).to_be_visible()
    assert page.locator("#cue-layer input").input_value().endswith(")")  # e.g. "layer4.1.0.conv_pwl (1x1)"
    page.locator("#cue-plot").scroll_into_view_if_needed()
    _shot(page, "03_adapted")

    # Stop a long adaptation: it ends early and leaves the singular values as they were.
    steps = page.locator("#adapt-steps input[type=number]")
    slider = page.locator("#adapt-steps input[type=range]")
    expect(steps).to_be_visible()
    for _ in range(3):  # the accordion may still be opening when the first keystrokes arrive
        steps.fill("60")
        steps.press("Enter")
        steps.blur()  # the slider sends its value to the server on change/blur
        try:
            expect(slider).to_have_value("60", timeout=5_000)
            break
        except AssertionError:
            page.wait_for_timeout(500)
    expect(slider).to_have_value("60")
    page.wait_for_timeout(500)
    page.locator("#adapt-btn").click()
    expect(page.locator("#adapt-progress")).to_contain_text(re.compile(r"step [1-9]\d*/60"))
    page.locator("#stop-btn").click()
    expect(page.locator("#adapt-progress")).to_contain_text("stopped")
    # The step field at 0: the default step for 2 shots.
    expect(page.locator("#status")).to_contain_text("Adapted yes (10 steps on 2 shot(s), lr 0.01)")

    # Select the first shot and remove it; reset to the pretrained values.
    page.locator("#shots-gallery img").first.click()
    page.locator("#remove-shot").click()
    expect(page.locator("#status")).to_contain_text("Shots 1/5")
    page.locator("#reset-btn").click()
    expect(page.locator("#status")).to_contain_text("Adapted no")
    _shot(page, "04_reset")
    page.close()


def test_one_click_example_loads_shots_queries_and_results(server, browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(server, wait_until="load")
    expect(page.locator("#status")).to_contain_text("Shots 0/5")
    page.locator("#examples").get_by_text("Person").click()
    expect(page.locator("#status")).to_contain_text("example 'person' loaded")
    expect(page.locator("#shots-gallery img")).to_have_count(1)
    expect(page.locator("#query-image img")).to_have_count(2)
    expect(page.locator("#status")).to_contain_text("segmented 2 queries")
    expect(page.locator("#result-gallery img").first).to_be_visible()
    expect(page.locator("#mask-files")).to_contain_text("grace_hopper_mask")
    _shot(page, "05_example")
    page.close()
