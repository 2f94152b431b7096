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


def test_review_queue_with_a_token(browser, tmp_path_factory, tmp_path):
    """The queue on a service started with tokens: the page's files load without one, the API calls fail until
    the inspector enters hers, then she marks a part with the buttons; the review carries her token's name."""
    import httpx

    from moleflow.store.verdicts import VerdictStore, sqlite_url

    data, run_dir = shared_run(tmp_path_factory)
    url = sqlite_url(tmp_path / "verdicts.sqlite")
    settings = ServeSettings(run=str(run_dir), engine="torch", watch_interval=0, store=url, audit_rate=1.0,
                             thumbnails=True, drift_interval=0, tokens={"alice": "alice-secret", "plc": "plc-secret"})
    with running_server(create_app(settings)) as base:
        files = [("files", (name, path.read_bytes(), "image/png")) for name, path in
                 (("scratch.png", sample_image(data, "brick", "scratch")), ("good.png", sample_image(data, "grass")))]
        sent = httpx.post(f"{base}/predict", files=files, headers={"authorization": "Bearer plc-secret"}, timeout=60)
        assert sent.status_code == 200, sent.text
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(base)
        page.click("#tabs button[data-tab=queue]")
        page.wait_for_selector("#error:not([hidden])")
        assert "401" in page.text_content("#error") and "token" in page.text_content("#error")

        page.fill("#token", "alice-secret")
        page.click("#token-form button")
        assert page.text_content("#token-state") == "token set"
        page.click("#tabs button[data-tab=queue]")
        page.wait_for_selector("#queue .qcard >> nth=1")
        cards = page.query_selector_all("#queue .qcard")
        assert len(cards) == 2 and "2 part(s) to review" in page.text_content("#queue-status")
        page.wait_for_function("Array.from(document.querySelectorAll('#queue .qcard img'))"
                               ".every(img => img.complete && img.naturalWidth > 0)")  # thumbnails, fetched with the token
        first = cards[0]
        verdict_id = int(first.get_attribute("data-verdict"))
        first.query_selector("input.note").fill("seen at the bench")
        first.query_selector("button.defect").click()
        page.wait_for_selector(f"#queue .qcard.reviewed[data-verdict='{verdict_id}']")
        assert "defect_confirmed by alice" in first.query_selector(".review-state").text_content()
        second = cards[1]
        second.query_selector("select.correct").select_option("brick")
        second.query_selector("button.wrong").click()
        page.wait_for_selector("#queue .qcard.reviewed >> nth=1")
        assert "wrong_product (brick) by alice" in second.query_selector(".review-state").text_content()

        # filters: only flagged parts, then the reviewed ones shown too
        page.select_option("#q-decision", "anomalous")
        page.check("#q-reviewed")
        page.click("#queue-filters button[type=submit]")
        page.wait_for_function("Array.from(document.querySelectorAll('#queue .qcard'))"
                               ".every(c => c.dataset.decision === 'anomalous' && c.classList.contains('reviewed'))")
        flagged = [c for c in page.query_selector_all("#queue .qcard")]
        assert len(flagged) == sum(1 for r in sent.json()["results"] if r["decision"] == "anomalous")

        # the other sections draw from the store
        page.click("#tabs button[data-tab=quality]")
        page.wait_for_selector("#quality .quality[data-product=brick] svg.plot")
        page.click("#tabs button[data-tab=drift]")
        page.wait_for_selector("#drift .drift[data-product=grass]")
        page.click("#tabs button[data-tab=unknowns]")
        page.wait_for_selector("#unknowns p.pile")
        page.close()
    with VerdictStore(url) as store:
        reviews = {r["verdict_id"]: r for r in store.reviews()}
    assert reviews[verdict_id]["label"] == "defect_confirmed" and reviews[verdict_id]["reviewer"] == "alice"
    assert reviews[verdict_id]["note"] == "seen at the bench"
    assert any(r["label"] == "wrong_product" and r["correct_product"] == "brick" for r in reviews.values())
