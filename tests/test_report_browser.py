"""The HTML report in a real headless browser (Debian's chromium, driven by Selenium through
chromium-driver; .ci/run installs both): it loads offline with no console error, shows the
charts and the pairs, and a row holding ``<script>`` is shown, never run."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

import embedcache as ec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,1600"]

EVIL = "<script>window.__ran = 1; console.error('ran')</script> Great value, would buy again"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None or DRIVER is None:
        pytest.fail("the report tests need chromium and chromedriver: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    texts = [line for line in (Path(ec.__file__).parent / "examples" / "reviews.jsonl").read_text().splitlines()]
    import json

    texts = [EVIL, EVIL.replace("again", "again!")] + [json.loads(t)["text"] for t in texts]
    res = ec.deduplicate(texts, threshold=0.9, progress=False)
    assert res.removed[0] == 1  # the <script> rows are a group, among the first shown
    path = tmp_path_factory.mktemp("report") / "report.html"
    res.to_html(path, settings={"input": "reviews.jsonl"})
    return path


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_page_loads_offline_with_no_console_error(browser, page):
    browser.get(page.as_uri())
    assert browser.title == "Deduplication report"
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == []
    # nothing was fetched: the page is the only resource
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0


def test_charts_and_pairs_are_shown(browser, page):
    from selenium.webdriver.common.by import By

    browser.get(page.as_uri())
    for chart in ("curve-chart", "score-chart"):
        svg = browser.find_element(By.CSS_SELECTOR, f"#{chart} svg")
        assert svg.is_displayed() and svg.size["width"] > 600 and svg.size["height"] > 150
    bars = browser.find_elements(By.CSS_SELECTOR, "#score-chart rect")
    assert len(bars) >= 3 and any(b.get_attribute("class") == "bar-removed" for b in bars)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#curve-chart circle")) >= 10
    pairs = browser.find_elements(By.CSS_SELECTOR, "#pairs .pair")
    assert pairs and all(p.is_displayed() for p in pairs)
    assert browser.find_elements(By.CSS_SELECTOR, "#pairs ins, #pairs del")  # differences marked
    assert "0.85" in browser.find_element(By.CSS_SELECTOR, "table.glance").text
    assert browser.find_elements(By.CSS_SELECTOR, "#groups table.group")


def test_script_text_is_shown_not_run(browser, page):
    from selenium.webdriver.common.by import By

    browser.get(page.as_uri())
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "<script>window.__ran = 1;" in body
    assert browser.execute_script("return window.__ran === undefined")
    assert browser.find_elements(By.TAG_NAME, "script") == []


def test_screenshot_is_a_rendered_page(browser, page, tmp_path):
    browser.get(page.as_uri())
    height = browser.execute_script("return document.documentElement.scrollHeight")
    assert 1500 < height < 20000
    browser.set_window_size(1200, height)
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert _png_size(data)[0] >= 1000
    assert len(data) > 50_000  # charts and text, not a blank page
