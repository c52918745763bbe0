"""The search and report pages in a real browser, inside a real Airflow API server's UI.

Debian's Chromium, driven by Playwright (no browser download): log in through the
SimpleAuthManager's page, open "Image search" from the navigation, search by text and by an
uploaded image, open the run's report from "Run reports", and go back to the Airflow run.
Screenshots go to test-output/; with LAION_UPDATE_DOCS_SCREENSHOTS=1 small copies go to docs/.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import pytest

pytestmark = pytest.mark.heavy

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-output" / "screenshots"
CHROMIUM = os.environ.get("LAION_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def page(api_server: str) -> Any:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=api_server)
        context.set_default_timeout(60_000)
        yield context.new_page()
        context.close()
        browser.close()


def images_loaded(frame: Any, selector: str) -> int:
    """How many images under ``selector`` decoded to a real picture. The images load lazily,
    so each is scrolled into view first, as a reader scrolling down would."""
    images = frame.locator(selector)
    for i in range(images.count()):
        images.nth(i).scroll_into_view_if_needed()
    frame.wait_for_function(
        f"() => [...document.querySelectorAll({selector!r})].every(i => i.complete)", timeout=60_000
    )
    return frame.evaluate(f"() => [...document.querySelectorAll({selector!r})].filter(i => i.naturalWidth > 0).length")


def plugin_frame(page: Any, path: str) -> Any:
    """The iframe showing ``path`` (the UI mirrors it into its own URL, so not the main frame)."""
    page.wait_for_selector("iframe")
    for _ in range(600):
        frame = next((f for f in page.frames if f != page.main_frame and urlparse(f.url).path == path), None)
        if frame is not None:
            frame.wait_for_load_state()
            return frame
        page.wait_for_timeout(100)
    raise AssertionError(f"no iframe showing {path}: {[f.url for f in page.frames]}")


def save_docs_copy(shot: Path, name: str) -> None:
    """A small copy for the README, made only when asked: screenshots differ from run to run."""
    if os.environ.get("LAION_UPDATE_DOCS_SCREENSHOTS") != "1":
        return
    from PIL import Image

    image = Image.open(shot)
    image.thumbnail((1000, 1000))
    (REPO / "docs").mkdir(exist_ok=True)
    image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(REPO / "docs" / name, optimize=True)


def test_log_in_and_see_the_dag(page: Any, passwords: dict) -> None:
    page.goto("/")
    page.wait_for_url(re.compile(r".*/auth/login.*"))
    page.fill("input[name=username]", "viewer")
    page.fill("input[name=password]", passwords["viewer"])
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/auth/" not in url)
    page.goto("/dags")
    page.get_by_text("laion_pipeline").first.wait_for()
    page.screenshot(path=SHOTS / "dags.png")


def test_search_from_the_navigation(page: Any, search_run: dict, tar_samples: dict, unique_image_keys: list) -> None:
    page.goto("/")
    page.locator('a[href$="plugin/laion-search"]').first.click()
    frame = plugin_frame(page, "/laion/search")
    frame.wait_for_selector(f'#run option[value="{search_run["run_id"]}"]', state="attached")
    frame.select_option("#run", search_run["run_id"])
    frame.fill("#text", "a photo of a dog on the beach")
    frame.click("#go")
    frame.wait_for_selector("article.card")
    assert frame.locator("article.card").count() == 12
    assert images_loaded(frame, "article.card img") == 12
    assert "12 results" in frame.inner_text("#status")
    shot = SHOTS / "search.png"
    page.screenshot(path=shot)
    save_docs_copy(shot, "search.png")

    key = unique_image_keys[7]
    upload = SHOTS / f"{key}.jpg"
    upload.write_bytes(tar_samples[key]["jpg"])
    frame.set_input_files("#image", str(upload))
    frame.click("#go")
    frame.wait_for_function("() => document.querySelector('#status').textContent.includes('the image')")
    assert frame.get_attribute("article.card", "data-key") == key

    frame.click("article.card:nth-of-type(2) button.similar")
    frame.wait_for_function("() => document.querySelector('#status').textContent.includes('sample')")
    assert images_loaded(frame, "article.card img") == 12


def test_the_report_from_the_navigation(page: Any, search_run: dict) -> None:
    page.goto("/")
    page.locator('a[href$="plugin/laion-reports"]').first.click()
    frame = plugin_frame(page, "/laion/reports")
    frame.click(f'a.run-report[href="report?run={quote(search_run["run_id"], safe="")}"]')
    frame = plugin_frame(page, "/laion/report")
    frame.wait_for_selector("svg#stage-durations")
    assert frame.locator("svg#stage-durations rect.bar").count() == 6  # fetch_metadata ... curate, build_index
    assert frame.locator("svg#funnel rect.bar").count() == 7  # raw rows ... embedded, kept, indexed
    assert frame.locator("svg#shards rect.bar").count() >= 2
    assert images_loaded(frame, "#sample-grid img") == 12
    frame.locator("#sample-grid").screenshot(path=SHOTS / "report-samples.png")
    frame.evaluate("() => window.scrollTo(0, 0)")
    shot = SHOTS / "report.png"
    page.screenshot(path=shot)
    save_docs_copy(shot, "report.png")
    frame.click("#airflow-run")
    page.wait_for_url(re.compile(rf".*/dags/laion_pipeline/runs/{re.escape(quote(search_run['run_id'], safe=''))}.*"))


def test_the_report_tab_of_the_run(page: Any, search_run: dict) -> None:
    page.goto(f"/dags/laion_pipeline/runs/{quote(search_run['run_id'], safe='')}/plugin/laion-run-report")
    frame = plugin_frame(page, "/laion/report")
    frame.wait_for_selector("svg#funnel")
    assert images_loaded(frame, "#sample-grid img") == 12
    page.screenshot(path=SHOTS / "run-report-tab.png")
