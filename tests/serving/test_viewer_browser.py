"""The viewer page end to end in a real headless Chromium (Debian's, driven by Playwright).

A uvicorn server runs the app in a thread on a free port; the browser loads the page, uploads a
generated case through the file input, waits for the overlay, checks the volumes it shows against
the API's JSON, scores a ground-truth mask, toggles a region, and saves a screenshot
(``<tmp>/viewer.png``; also copied to ``$TUMORSEG_VIEWER_PNG`` when set, e.g. ``docs/viewer.png``).

The post-treatment test serves a ``glioma_post`` model (WT, TC, ET, RC): the page builds its region
toggles, legend and volume table from the label set the server sends, and draws the RC overlay.

The 2-D test uploads a generated Figshare slice (``tumorseg.data.planar_synth``), checks the
detection the page shows against the API's JSON, the single-region toggle and the opacity control,
and saves ``<tmp>/viewer_2d.png`` (copied to ``$TUMORSEG_VIEWER_2D_PNG`` when set, e.g.
``docs/viewer_2d.png``). The 2-D demo test picks a generated demo image, sees its Dice, then uploads
another ground-truth PNG and sees the Dice the 2-D metrics give for it.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving_support import (
    oracle_model,
    planar_oracle_slot,
    post_treatment_model,
    serve_params,
    write_post_treatment_case,
)

from tumorseg.serving.app import ServeSettings, create_app

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)"
    ),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server_url(tmp_path: Path) -> Iterator[str]:
    """The app (oracle model, one demo case) served by uvicorn in a thread."""
    settings = ServeSettings.from_params(
        serve_params(tmp_path, demo_cases=1, demo_spacing_mm=4.0), model_uri="oracle"
    )
    yield from serve_in_thread(create_app(settings, loaded_model=oracle_model()))


@pytest.fixture
def planar_server_url(tmp_path: Path) -> Iterator[str]:
    """The app with the 2-D oracle too (no demo cases) served by uvicorn in a thread."""
    settings = ServeSettings.from_params(serve_params(tmp_path), model_uri="oracle")
    yield from serve_in_thread(create_app(settings, loaded_model=oracle_model(), planar=planar_oracle_slot()))


@pytest.fixture
def planar_demo_server_url(tmp_path: Path) -> Iterator[str]:
    """The app with the 2-D oracle and one demo case of each kind (3-D, Figshare .mat, PNG)."""
    params = serve_params(tmp_path, demo_cases=1, demo_spacing_mm=4.0)
    settings = ServeSettings.from_params(params, model_uri="oracle")
    yield from serve_in_thread(create_app(settings, loaded_model=oracle_model(), planar=planar_oracle_slot()))


@pytest.fixture
def post_server_url(tmp_path: Path) -> Iterator[str]:
    """The app with a post-treatment (glioma_post) model, no demo cases, served by uvicorn in a thread."""
    settings = ServeSettings.from_params(serve_params(tmp_path), model_uri="oracle")
    yield from serve_in_thread(create_app(settings, loaded_model=post_treatment_model()))


REGION_LEGEND = """() => [...document.querySelectorAll('#region-controls label')].map((label) => ({
  value: label.querySelector('.region').value,
  text: label.textContent.trim(),
  colour: getComputedStyle(label.querySelector('.swatch')).backgroundColor,
}))"""


def serve_in_thread(app: object) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free port in a daemon thread; yield its URL, then stop it."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=15)


def launch_chromium(playwright: object) -> object:
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
    )


def test_upload_a_case_see_the_overlay_volumes_and_dice(
    server_url: str, synth_case: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    modalities = sorted(str(p) for p in synth_case.glob("*.nii.gz") if "_seg" not in p.name)
    expected = httpx.post(
        f"{server_url}/predict?format=json",
        files=[("files", (Path(p).name, Path(p).read_bytes())) for p in modalities],
        timeout=60,
    ).json()["volumes_ml"]

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
            page.goto(server_url + "/")
            page.wait_for_function("document.querySelector('#model').textContent.includes('oracle')")

            page.set_input_files("#files", modalities)
            page.click("#upload-button")
            page.wait_for_selector('#viewer[data-state="ready"]', timeout=60_000)
            assert int(page.get_attribute("#viewer", "data-overlay-pixels")) > 0
            # the glioma toggles and legend, built from the label set the server sends, as they always were
            assert page.evaluate(REGION_LEGEND) == [
                {"value": "WT", "text": "WT (oedema)", "colour": "rgb(46, 204, 64)"},
                {"value": "TC", "text": "TC (necrosis)", "colour": "rgb(255, 65, 54)"},
                {"value": "ET", "text": "ET (enhancing)", "colour": "rgb(255, 220, 0)"},
            ]
            shown = {
                row.get_attribute("data-region"): float(row.query_selector_all("td")[1].inner_text())
                for row in page.query_selector_all("#volumes tbody tr")
            }
            assert shown == pytest.approx({k: round(v, 2) for k, v in expected.items()}, abs=0.006)
            assert "BraTS2021_00001" in page.inner_text("#case-info")

            # ground truth -> Dice per region in the table, and its outline drawn
            page.set_input_files("#reference-file", str(synth_case / f"{synth_case.name}_seg.nii.gz"))
            page.click("#reference-form button")
            page.wait_for_function("document.querySelector('#status').textContent.includes('ground truth')")
            page.wait_for_selector('#viewer[data-state="ready"]')
            dice = [
                row.query_selector_all("td")[2].inner_text()
                for row in page.query_selector_all("#volumes tbody tr")
            ]
            assert all(0.0 <= float(value) <= 1.0 for value in dice), dice
            assert not page.is_hidden("#reference-toggle")

            # switching a region off redraws with fewer overlay pixels
            before = int(page.get_attribute("#viewer", "data-overlay-pixels"))
            page.uncheck('.region[value="WT"]')
            page.wait_for_function(
                f"document.querySelector('#viewer').dataset.state === 'ready' && "
                f"Number(document.querySelector('#viewer').dataset.overlayPixels) < {before}"
            )
            page.check('.region[value="WT"]')
            page.wait_for_selector('#viewer[data-state="ready"]')

            # the download link serves the segmentation
            href = page.get_attribute("#download", "href")
            assert httpx.get(server_url + href, timeout=30).headers["content-type"] == "application/gzip"

            screenshot = tmp_path / "viewer.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.stat().st_size > 10_000

            # a bad upload shows the server's one-line error instead of breaking the page
            page.set_input_files("#files", str(synth_case / f"{synth_case.name}_t1.nii.gz"))
            page.click("#upload-button")
            page.wait_for_selector('#status[data-kind="error"]')
            assert "missing modality file" in page.inner_text("#status")

            # the demo list fills once the demo case is generated, and segments on click
            page.wait_for_selector("#demo-button:not([disabled])", timeout=60_000)
            page.click("#demo-button")
            page.wait_for_function("document.querySelector('#status').textContent.startsWith('Segmented')")
        finally:
            browser.close()
    # the only console error is the browser's own log line for the deliberate 422 above
    assert [p for p in problems if "status of 422" not in p] == [], problems
    if target := os.environ.get("TUMORSEG_VIEWER_PNG"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, target)


OVERLAY_RED = """() => {
  const canvas = document.getElementById("canvas-axial");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let red = 0;
  for (let i = 0; i < data.length; i += 4) red += Math.max(0, data[i] - data[i + 1]);
  return red;
}"""


def test_upload_a_2d_slice_see_the_mask_detection_and_download_it(
    planar_server_url: str, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    from tumorseg.config import SynthPlanarConfig
    from tumorseg.data.planar_synth import figshare_patient_slices, write_figshare_mat

    (generated,) = figshare_patient_slices(1, SynthPlanarConfig(spacing_mm=4.0, slices_per_patient=1))
    mat = write_figshare_mat(
        tmp_path / "12.mat", generated["image"], generated["mask"], generated["label"], generated["pid"]
    )
    expected = httpx.post(
        f"{planar_server_url}/predict?format=json",
        files=[("files", (mat.name, mat.read_bytes()))],
        timeout=60,
    ).json()
    assert expected["tumour_area_px"] > 0

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
            page.goto(planar_server_url + "/")
            page.wait_for_function("document.querySelector('#model').textContent.includes('oracle-2d')")

            page.set_input_files("#files", str(mat))
            page.click("#upload-button")
            page.wait_for_selector('#viewer[data-state="ready"]', timeout=60_000)
            assert page.get_attribute("#viewer", "data-kind") == "2d"
            overlay = int(page.get_attribute("#viewer", "data-overlay-pixels"))
            assert overlay == expected["tumour_area_px"]  # the whole mask, at the image's own size

            # the detection shown is the API's
            assert page.inner_text("#detection-label") == expected["label"]
            assert page.inner_text("#detection-probability") == f"{100 * expected['probability']:.1f} %"
            assert expected["tumour_type"] and expected["tumour_type"] in page.inner_text("#detection-type")
            assert page.inner_text("#detection-area").startswith(f"{expected['tumour_area_px']} pixels")
            assert page.inner_text("#detection-dice") == f"{expected['dice']['tumour']:.3f}"
            assert f"Tumour: {expected['label']}" in page.inner_text("#status")

            # one slice, one region: the 3-D planes, regions, modality and volumes are hidden
            for hidden in ('figure[data-plane="coronal"]', '.region[value="WT"]', "#modality", "#volumes"):
                assert page.is_hidden(hidden), hidden
            assert page.is_visible('.region[value="tumour"]') and page.is_visible("#detection")

            # opacity: a stronger overlay is redder; the tumour toggle removes it
            before = page.evaluate(OVERLAY_RED)
            page.eval_on_selector(
                "#opacity", "el => { el.value = 100; el.dispatchEvent(new Event('input')); }"
            )
            page.wait_for_function(f"({OVERLAY_RED})() > {before}")
            page.uncheck('.region[value="tumour"]')
            page.wait_for_function(
                "document.querySelector('#viewer').dataset.state === 'ready' && "
                "Number(document.querySelector('#viewer').dataset.overlayPixels) === 0"
            )
            page.check('.region[value="tumour"]')
            page.eval_on_selector(
                "#opacity", "el => { el.value = 45; el.dispatchEvent(new Event('input')); }"
            )
            page.wait_for_function(
                f"Number(document.querySelector('#viewer').dataset.overlayPixels) === {overlay}"
            )

            # the download link serves the mask PNG at the slice's size
            href = page.get_attribute("#download", "href")
            assert page.get_attribute("#download", "download") == "figshare-12_mask.png"
            download = httpx.get(planar_server_url + href, timeout=30)
            assert download.headers["content-type"] == "image/png"

            screenshot = tmp_path / "viewer_2d.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.stat().st_size > 10_000
        finally:
            browser.close()
    assert problems == [], problems
    if target := os.environ.get("TUMORSEG_VIEWER_2D_PNG"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, target)


DEMO_GROUPS = """() => [...document.querySelectorAll('#demo-select optgroup')].map((group) => ({
  label: group.label,
  ids: [...group.querySelectorAll('option')].map((option) => option.value),
}))"""


def test_a_2d_demo_image_is_scored_and_takes_an_uploaded_ground_truth(
    planar_demo_server_url: str, tmp_path: Path
) -> None:
    import io

    import numpy as np
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from tumorseg.evaluation.metrics import segmentation_scores

    url = planar_demo_server_url
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
            page.goto(url + "/")
            page.wait_for_selector("#demo-button:not([disabled])", timeout=120_000)
            assert page.evaluate(DEMO_GROUPS) == [
                {"label": "3-D cases", "ids": ["BraTS2021_00001"]},
                {"label": "2-D images", "ids": ["figshare-1", "image-2"]},
            ]

            # one click: the PNG demo image comes with its Dice against the mask the server kept
            page.select_option("#demo-select", "image-2")
            page.click("#demo-button")
            page.wait_for_function("document.querySelector('#status').textContent.startsWith('Segmented')")
            page.wait_for_selector('#viewer[data-state="ready"]')
            assert page.get_attribute("#viewer", "data-kind") == "2d"
            result_id = page.evaluate("state.caseId")
            kept = httpx.get(f"{url}/cases/{result_id}", timeout=30).json()
            assert page.inner_text("#detection-dice") == f"{kept['dice']['tumour']:.3f}"
            assert page.inner_text("#detection-iou") == f"{kept['iou']['tumour']:.3f}"
            assert not page.is_hidden("#reference-toggle") and page.is_visible("#reference-form")
            assert ".png" in page.get_attribute("#reference-file", "accept")

            # another ground truth (the predicted mask shifted by 12 pixels): the page shows its Dice
            download = httpx.get(url + page.get_attribute("#download", "href"), timeout=30)
            predicted = np.asarray(Image.open(io.BytesIO(download.content))) > 0
            shifted = np.roll(predicted, 12, axis=0)
            truth = tmp_path / "truth.png"
            Image.fromarray(shifted.astype(np.uint8) * 255).save(truth)
            expected, _ = segmentation_scores(predicted, shifted)
            page.set_input_files("#reference-file", str(truth))
            page.click("#reference-form button")
            page.wait_for_function("document.querySelector('#status').textContent.includes('ground truth')")
            page.wait_for_selector('#viewer[data-state="ready"]')
            assert page.inner_text("#detection-dice") == f"{expected:.3f}"
            assert f"Dice {expected:.3f}" in page.inner_text("#status")

            # a mask of another size: the server's one-line error, the page intact
            Image.fromarray(shifted[:100].astype(np.uint8) * 255).save(tmp_path / "small.png")
            page.set_input_files("#reference-file", str(tmp_path / "small.png"))
            page.click("#reference-form button")
            page.wait_for_selector('#status[data-kind="error"]')
            assert "differs from the image shape" in page.inner_text("#status")
            assert page.inner_text("#detection-dice") == f"{expected:.3f}"
        finally:
            browser.close()
    # the only console error is the browser's own log line for the deliberate 422 above
    assert [p for p in problems if "status of 422" not in p] == [], problems


RC_PIXELS = """() => ["axial", "coronal", "sagittal"].reduce((count, plane) => {
  const canvas = document.getElementById(`canvas-${plane}`);
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  // the RC colour (177, 13, 201) blended over grey: blue well above green, red above green
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 2] > data[i + 1] + 40 && data[i] > data[i + 1] + 20) count += 1;
  }
  return count;
}, 0)"""


def test_a_post_treatment_model_shows_its_four_regions(post_server_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    case = write_post_treatment_case(tmp_path / "case")
    modalities = sorted(str(p) for p in case.glob("*.nii.gz") if "-seg" not in p.name)
    expected = httpx.post(
        f"{post_server_url}/predict?format=json",
        files=[("files", (Path(p).name, Path(p).read_bytes())) for p in modalities],
        timeout=60,
    ).json()["volumes_ml"]
    assert list(expected) == ["WT", "TC", "ET", "RC"] and expected["RC"] > 0

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
            page.goto(post_server_url + "/")
            page.wait_for_function("document.querySelector('#model').textContent.includes('glioma_post')")

            page.set_input_files("#files", modalities)
            page.click("#upload-button")
            page.wait_for_selector('#viewer[data-state="ready"]', timeout=60_000)
            legend = page.evaluate(REGION_LEGEND)
            assert [entry["value"] for entry in legend] == ["WT", "TC", "ET", "RC"]
            rc = {"value": "RC", "text": "RC (resection cavity)", "colour": "rgb(177, 13, 201)"}
            assert legend[3] == rc
            shown = {
                row.get_attribute("data-region"): float(row.query_selector_all("td")[1].inner_text())
                for row in page.query_selector_all("#volumes tbody tr")
            }
            assert list(shown) == ["WT", "TC", "ET", "RC"]
            assert shown == pytest.approx({k: round(v, 2) for k, v in expected.items()}, abs=0.006)

            # RC is drawn in its colour; switching it off removes those pixels
            before = int(page.get_attribute("#viewer", "data-overlay-pixels"))
            assert page.evaluate(RC_PIXELS) > 0
            page.uncheck('.region[value="RC"]')
            page.wait_for_function(
                f"document.querySelector('#viewer').dataset.state === 'ready' && "
                f"Number(document.querySelector('#viewer').dataset.overlayPixels) < {before}"
            )
            assert page.evaluate(RC_PIXELS) == 0
            screenshot = tmp_path / "viewer_post.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert problems == [], problems


def test_with_tokens_the_page_asks_for_one_once_and_uses_it_for_every_call(
    tmp_path: Path, synth_case: Path
) -> None:
    """A server with tokens: the page prompts once, keeps the token for the browser session only, and
    uploads, shows and downloads with it; without it nothing but /health answers."""
    from playwright.sync_api import sync_playwright

    from tumorseg.serving.auth import TokenStore

    token = TokenStore(tmp_path / "tokens.json").create("radiologist")  # serve_params' tokens_file
    settings = ServeSettings.from_params(serve_params(tmp_path), model_uri="oracle")
    modalities = sorted(str(p) for p in synth_case.glob("*.nii.gz") if "_seg" not in p.name)
    prompts: list[str] = []
    problems: list[str] = []
    for url in serve_in_thread(create_app(settings, loaded_model=oracle_model())):
        assert httpx.get(f"{url}/demo", timeout=30).status_code == 401
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.on("pageerror", lambda error: problems.append(f"page error: {error}"))

                def answer(dialog: object) -> None:
                    prompts.append(dialog.message)
                    dialog.accept(token)

                page.on("dialog", answer)
                page.goto(url + "/")
                page.wait_for_function("document.querySelector('#model').textContent.includes('oracle')")
                page.set_input_files("#files", modalities)
                page.click("#upload-button")
                page.wait_for_selector('#viewer[data-state="ready"]', timeout=60_000)
                assert int(page.get_attribute("#viewer", "data-overlay-pixels")) > 0
                with page.expect_download() as download:
                    page.click("#download")
                saved = tmp_path / "downloaded.nii.gz"
                download.value.save_as(saved)
                assert saved.read_bytes()[:2] == b"\x1f\x8b"  # the gzip segmentation
                assert page.evaluate("sessionStorage.getItem('tumorseg.token')") == token
                assert page.evaluate("localStorage.length") == 0  # never kept beyond the session
                # a new browser session asks again
                fresh = browser.new_context().new_page()
                fresh.on("dialog", answer)
                fresh.goto(url + "/")
                fresh.wait_for_function("document.querySelector('#model').textContent.includes('oracle')")
            finally:
                browser.close()
    assert len(prompts) == 2 and all("access token" in p for p in prompts), prompts
    audit = (tmp_path / "audit.jsonl").read_text()
    assert '"token": "radiologist"' in audit and token not in audit
    assert problems == [], problems
