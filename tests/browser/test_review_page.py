"""The review page in a real headless Chromium (Playwright), against a real uvicorn server.

The browser comes from the Debian archive (`tests/browser/fetch_chromium.sh`, which `make test` runs); where
it cannot be had the test skips saying why, and tests/test_serve_app.py still checks the page over HTTP.
"""

from __future__ import annotations

import base64
import os

import pytest

from chromium import find_chromium
from moleflow.serve.app import create_app
from moleflow.serve.settings import ServeSettings
from serve_support import elongated, png, running_server, sample_image, shared_run


@pytest.fixture(scope="module")
def browser():
    found = find_chromium()
    if isinstance(found, str):
        pytest.skip(found)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    exe, env = found
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=exe, env=env, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def test_pick_drop_and_read_verdicts_in_the_page(browser, tmp_path_factory, tmp_path):
    data, run_dir = shared_run(tmp_path_factory)
    with running_server(create_app(ServeSettings(run=str(run_dir), watch_interval=0))) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        page.wait_for_function("document.querySelector('#model-state').textContent.startsWith('model ')")
        assert "brick, grass" in page.text_content("#products")

        # pick two files with the file input
        page.set_input_files("#file-input", [str(sample_image(data, "brick", "scratch")),
                                             str(sample_image(data, "grass"))])
        page.wait_for_selector("#results .card >> nth=1")
        cards = page.query_selector_all("#results .card")
        assert [c.query_selector("dd.product").text_content() for c in cards] == ["brick", "grass"]
        for card in cards:
            assert card.query_selector(".decision").text_content() in ("normal", "anomalous")
            size = card.eval_on_selector("img.overlay", "img => img.complete ? img.naturalWidth : 0")
            assert size == 112  # the heat-map overlay PNG decoded in the browser
        page.wait_for_function("document.querySelectorAll('#recent tbody tr').length >= 2")
        assert page.text_content("#recent tbody tr:first-child td:nth-child(2)") in ("000.png", "scratch.png")

        # drop a long part (3 tiles) onto the drop zone
        payload = base64.b64encode(png(elongated(sample_image(data, "brick")))).decode()
        transfer = page.evaluate_handle(
            """(b64) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                          const dt = new DataTransfer();
                          dt.items.add(new File([bytes], 'long_part.png', {type: 'image/png'}));
                          return dt; }""", payload)
        page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        page.wait_for_function("document.querySelector('#results dd.file')?.textContent === 'long_part.png'")
        assert page.text_content("#results dd.nearest") == "brick"
        page.wait_for_function("document.querySelectorAll('#recent tbody tr').length >= 3")

        # a file that is no image: the service's one-line error is shown
        bad = tmp_path / "notes.txt"
        bad.write_text("not an image")
        page.set_input_files("#file-input", str(bad))
        page.wait_for_selector("#error:not([hidden])")
        assert "422" in page.text_content("#error") and "not an image" in page.text_content("#error")
        shot = os.environ.get("MOLEFLOW_PAGE_SCREENSHOT")  # e.g. docs/serve_page.png for the README
        if shot:
            page.set_input_files("#file-input", [str(sample_image(data, "brick", "scratch")),
                                                 str(sample_image(data, "grass", "spot"))])
            page.wait_for_function("document.querySelector('#status').textContent.includes('verdict')")
            page.screenshot(path=shot, full_page=True)
        page.close()
