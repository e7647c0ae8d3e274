"""The web page in a real headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium) against a real server: it types a review, submits, and reads what a person sees.

Skipped where no Chromium or chromedriver is installed; CI installs both. Set
SCREENSHOT_DIR to keep a screenshot of the explained example (docs/explanations/page.png).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import SHIPPED, RunningServer, serve
from tests.service.test_app import metric

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

EXAMPLE = "The acting was wonderful but the plot was dull."
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver (Debian packages)"
)


def chromium(*flags: str) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    for flag in flags:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    yield from chromium("--window-size=1000,1200")


@pytest.fixture(scope="module")
def offline_browser() -> Iterator[WebDriver]:
    """Chromium that can reach 127.0.0.1 and nothing else (every other host name fails to
    resolve), as on an air-gapped host."""
    yield from chromium("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")


def submit(browser: WebDriver, url: str, text: str, truncate: bool = False) -> None:
    browser.get(url)
    box = browser.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)
    if truncate:
        browser.find_element(By.ID, "truncate").click()
    browser.find_element(By.ID, "submit").click()


def wait_for(browser: WebDriver, condition: object, seconds: float = 60) -> None:
    WebDriverWait(browser, seconds).until(condition)


def error_text(browser: WebDriver) -> str:
    wait_for(browser, ec.visibility_of_element_located((By.ID, "error")))
    return browser.find_element(By.ID, "error").text


def test_a_review_gets_its_label_shaded_tokens_and_sentences(
    browser: WebDriver, shipped: RunningServer
):
    """If this fails, a person using the page no longer sees the verdict or the reasons."""
    submit(browser, shipped.url, EXAMPLE)
    wait_for(browser, ec.presence_of_element_located((By.CSS_SELECTOR, "#sentences li")))
    assert browser.find_element(By.ID, "label").text == "NEGATIVE"
    assert browser.find_element(By.ID, "score").text.endswith("%")
    gauge = browser.find_element(By.ID, "gauge")
    assert 0 < float(gauge.get_attribute("aria-valuenow") or "nan") < 50
    assert browser.find_element(By.ID, "mixed").is_displayed()
    # Every token is shaded by its attribution, and the page shows the text as typed.
    assert browser.find_element(By.ID, "tokens").text == EXAMPLE
    tokens = browser.find_elements(By.CSS_SELECTOR, "#tokens .tok")
    shaded = {t.text: float(t.get_attribute("data-attribution") or "nan") for t in tokens}
    assert shaded["wonderful"] > 0 > shaded["dull"]
    colours = {t.text: t.value_of_css_property("background-color") for t in tokens}
    assert colours["wonderful"].startswith("rgba(33, 102, 172")  # blue: towards positive
    assert colours["dull"].startswith("rgba(179, 88, 6")  # orange: towards negative
    sentences = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#sentences li")]
    assert re.fullmatch(r"POSITIVE \d+\.\d% The acting was wonderful", sentences[0])
    assert re.fullmatch(r"NEGATIVE \d+\.\d% but the plot was dull\.", sentences[1])
    assert "inference" in browser.find_element(By.ID, "explain-timing").text
    assert metric(shipped, "sentiment_requests_total", route="/explain", status="200") >= 1
    if os.environ.get("SCREENSHOT_DIR"):
        browser.save_screenshot(str(Path(os.environ["SCREENSHOT_DIR"]) / "page.png"))


def test_examples_fill_the_box_and_the_keyboard_submits(browser: WebDriver, shipped: RunningServer):
    browser.get(shipped.url)
    browser.find_element(By.CSS_SELECTOR, "[data-example]").click()
    box = browser.find_element(By.ID, "text")
    assert box.get_attribute("value") == EXAMPLE
    box.send_keys(Keys.CONTROL, Keys.ENTER)
    wait_for(browser, ec.presence_of_element_located((By.CSS_SELECTOR, "#sentences li")))
    # Every control has a label a screen reader can announce.
    for control in ("text", "truncate", "apikey"):
        assert browser.find_elements(By.CSS_SELECTOR, f"label[for='{control}'], label #{control}")


def test_an_empty_review_shows_the_api_error_in_words(browser: WebDriver, server: RunningServer):
    submit(browser, server.url, "   ")
    message = error_text(browser)
    assert "inputs is empty or only white space" in message
    assert "(validation)" in message
    assert not browser.find_element(By.ID, "result").is_displayed()


def test_a_review_too_long_is_refused_then_truncated_on_request(
    browser: WebDriver, server: RunningServer
):
    text = " ".join(["great"] * 10 + ["dull"] * 30 + ["superb"] * 10)  # 50 tokens; 32 read
    submit(browser, server.url, text)
    message = error_text(browser)
    assert "has 50 tokens; the model reads at most 32" in message
    assert "Tick “Truncate long reviews”" in message  # the page's box, not the API's field
    assert '"truncate"' not in message
    submit(browser, server.url, text, truncate=True)
    wait_for(browser, ec.visibility_of_element_located((By.ID, "dropped")))
    assert "tokens 13 to 30" in browser.find_element(By.ID, "dropped").text
    (gap,) = browser.find_elements(By.CSS_SELECTOR, "#tokens .tok.dropped")  # one stretch
    assert len(gap.text.split()) == 18


def test_a_busy_service_is_shown_as_busy(browser: WebDriver):
    """429: one explanation at a time, and a slow one (the shipped model, 400 tokens, 128
    steps: seconds on a CPU) holds the slot while the page asks for another."""
    with serve(SHIPPED, explain_max_queue=1, explain_steps=128) as server:
        slow = {"inputs": "a fine film " * 200, "truncate": True}
        holder = threading.Thread(
            target=lambda: httpx.post(f"{server.url}/explain", json=slow, timeout=120)
        )
        holder.start()
        try:
            while metric(server, "sentiment_explain_queue_depth") < 1 and holder.is_alive():
                time.sleep(0.01)
            submit(browser, server.url, "a great film")
            message = error_text(browser)
        finally:
            holder.join()
        if "busy" not in message:
            pytest.fail(f"expected the busy message, got: {message}")
        assert "(overloaded)" in message
        assert browser.find_element(By.ID, "label").text  # the prediction itself was answered


def test_with_auth_on_the_page_loads_and_sends_the_key(browser: WebDriver, trained_bundle: Path):
    with serve(trained_bundle, api_keys=["s3cret"]) as server:
        browser.execute_script("sessionStorage.clear()")
        submit(browser, server.url, "a great film")
        assert "Enter the API key this server asks for" in error_text(browser)
        assert browser.find_element(By.ID, "apikey").is_displayed()
        browser.find_element(By.ID, "apikey").send_keys("s3cret")
        browser.find_element(By.ID, "submit").click()
        wait_for(browser, ec.presence_of_element_located((By.CSS_SELECTOR, "#sentences li")))
        assert not browser.find_element(By.ID, "error").is_displayed()
        browser.execute_script("sessionStorage.clear()")


def test_the_page_names_the_model_and_hides_the_key_box_without_auth(
    browser: WebDriver, shipped: RunningServer
):
    """If this fails, a visitor cannot tell which model answers, or sees a key box on a
    server that asks for no key."""
    browser.get(shipped.url)
    version = (By.ID, "model-version")
    wait_for(browser, ec.text_to_be_present_in_element(version, "Model imdb-bigru 2.0.0"))
    assert not browser.find_element(By.ID, "apikey").is_displayed()


def test_at_phone_width_nothing_spills_sideways(browser: WebDriver, shipped: RunningServer):
    browser.set_window_size(390, 844)
    try:
        submit(browser, shipped.url, EXAMPLE + " " + "Unbelievably-long-hyphenated-word " * 3)
        wait_for(browser, ec.presence_of_element_located((By.CSS_SELECTOR, "#sentences li")))
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0
    finally:
        browser.set_window_size(1000, 1200)


def test_the_api_docs_render_without_internet(offline_browser: WebDriver, server: RunningServer):
    """If this fails, /docs or /redoc fetch their scripts from a CDN again and show a blank
    page on a host without internet."""
    with pytest.raises(WebDriverException, match="ERR_NAME_NOT_RESOLVED"):  # no CDN here
        offline_browser.get("https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css")
    offline_browser.get(f"{server.url}/docs")
    title = (By.CSS_SELECTOR, ".swagger-ui .info .title")
    wait_for(offline_browser, ec.visibility_of_element_located(title), seconds=30)
    assert "Sentiment inference service" in offline_browser.find_element(*title).text
    assert offline_browser.find_elements(By.CSS_SELECTOR, '[id^="operations-default-predict"]')
    offline_browser.get(f"{server.url}/redoc")
    heading = (By.CSS_SELECTOR, ".api-info h1")
    wait_for(offline_browser, ec.visibility_of_element_located(heading), seconds=30)
    assert "Sentiment inference service" in offline_browser.find_element(*heading).text
    assert "/predict" in offline_browser.page_source


def test_the_page_has_an_icon(server: RunningServer):
    """If this fails, browsers log a 404 for /favicon.ico on every visit."""
    icon = httpx.get(f"{server.url}/favicon.ico")
    assert icon.status_code == 200
    assert icon.headers["content-type"] == "image/svg+xml"
    page = httpx.get(f"{server.url}/").text
    assert 'rel="icon" href="static/favicon.svg"' in page
