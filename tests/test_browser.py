"""End to end: the web page in headless Chromium against a live server on the tiny synthetic run.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package; skipped without
them. Saves docs/webapp-screenshot.png.
"""

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from sonicrec.serve import create_app  # noqa: E402
from test_serve import _wav_bytes, make_run, tiny_predictor  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "webapp-screenshot.png"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="needs Chromium and its driver: apt-get install chromium chromium-driver"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("run"), predictor := tiny_predictor())
    app = create_app(run.root, upload_dir=tmp_path_factory.mktemp("uploads"), predictor=predictor)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1440,920", "--autoplay-policy=no-user-gesture-required", "--mute-audio"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def test_search_play_similar_recommend_upload_map(server, browser, tmp_path):
    d = browser
    wait = WebDriverWait(d, 30, ignored_exceptions=[StaleElementReferenceException])  # a loaded machine
    d.get(server)
    wait.until(lambda _: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert "24 songs" not in d.find_element(By.ID, "run-info").text  # 16 played + 8 cold
    assert "16 played + 8 cold songs" in d.find_element(By.ID, "run-info").text

    # search a track and play it: its similar-songs playlist appears
    d.find_element(By.ID, "search").send_keys("tone 7")
    def listed():  # the list of "tone 7", not of a shorter prefix typed before it
        return [e.get_attribute("data-id") for e in d.find_elements(By.CSS_SELECTOR, "#search-results li")]

    wait.until(lambda _: listed() == ["t07"])
    d.find_element(By.CSS_SELECTOR, '#search-results li[data-id="t07"] .play').click()
    wait.until(lambda _: d.find_element(By.ID, "now-title").text == "Tone 7 — Composer low")
    wait.until(lambda _: d.find_element(By.ID, "player").get_attribute("data-state") == "playing")
    similar = wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "#similar li"))
    assert len(similar) == 11
    # ... and each of them plays
    first = similar[0].get_attribute("data-id")
    similar[0].find_element(By.CSS_SELECTOR, ".play").click()
    wait.until(lambda _: d.find_element(By.ID, "player").get_attribute("data-track") == first)
    wait.until(lambda _: d.find_element(By.ID, "player").get_attribute("data-state") == "playing")

    # a user's recommendations, never-played songs marked
    d.find_element(By.ID, "user").send_keys("u03")
    d.find_element(By.CSS_SELECTOR, "#user-form button").click()
    recs = wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "#recs li"))
    assert len(recs) == 20
    assert d.find_elements(By.CSS_SELECTOR, "#recs li .badge.cold")

    # drop a new file (a copy of t05): it is placed next to t05
    path = tmp_path / "new song.wav"
    path.write_bytes(_wav_bytes(5, tmp_path))
    d.find_element(By.ID, "upload-input").send_keys(str(path))
    wait.until(lambda _: d.find_element(By.ID, "upload-results").is_displayed())
    placed = d.find_elements(By.CSS_SELECTOR, "#upload-similar li")
    assert placed[0].get_attribute("data-id") == "t05" and len(placed) == 10
    assert len(d.find_elements(By.CSS_SELECTOR, "#upload-audience li")) == 10
    assert "new song.wav" in d.find_element(By.ID, "upload-status").text

    # the map: hovering a point names it, clicking it plays it
    canvas = d.find_element(By.ID, "map")
    x, y, track = d.execute_script(
        "const g = mapGeometry(arguments[0]); const i = state.map.ids.indexOf('t12');"
        "return [g.px(state.map.x[i]), g.py(state.map.y[i]), state.map.ids[i]];", canvas)
    width, height = canvas.size["width"], canvas.size["height"]
    ActionChains(d).move_to_element_with_offset(canvas, x - width / 2, y - height / 2).perform()
    wait.until(lambda _: d.find_element(By.ID, "tooltip").is_displayed())
    assert "Tone 12" in d.find_element(By.ID, "tooltip").text
    ActionChains(d).click().perform()
    wait.until(lambda _: d.find_element(By.ID, "player").get_attribute("data-track") == track)

    d.set_window_size(1440, 1180)  # the whole page in the picture
    SCREENSHOT.parent.mkdir(exist_ok=True)
    assert d.save_screenshot(str(SCREENSHOT))
    assert not d.find_element(By.ID, "error").is_displayed()


def test_page_shows_readable_errors_and_no_stale_lists(server, browser, tmp_path):
    """Issue 15 item 26: validation errors, unknown users, uploads that fail, rings, the user picker."""
    d = browser
    wait = WebDriverWait(d, 30, ignored_exceptions=[StaleElementReferenceException])  # a loaded machine
    d.get(server)
    wait.until(lambda _: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    error = d.find_element(By.ID, "error")

    # a validation error reads as a sentence, and a long one does not widen the page
    d.execute_script("api('/api/search', {q: 'x'.repeat(3000)}).catch(showError)")
    wait.until(lambda _: error.is_displayed())
    assert error.text.startswith("q: ") and "{" not in error.text and "loc" not in error.text
    assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    d.execute_script("const s = $('search'); s.value = 'tone 1'.repeat(100);"
                     "s.dispatchEvent(new Event('input'))")
    wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "#search-results li.muted"))  # searched, clipped

    # the user picker searches all users as you type
    d.find_element(By.ID, "user").send_keys("u2")
    wait.until(lambda _: d.find_element(By.ID, "user-list").get_attribute("data-query") == "u2")
    options = [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#user-list option")]
    assert sorted(options) == sorted(f"u{i:02d}" for i in range(30) if "u2" in f"u{i:02d}")

    # an unknown user empties the list instead of leaving the previous user's
    d.find_element(By.ID, "user").clear()
    d.find_element(By.ID, "user").send_keys("u03")
    d.find_element(By.CSS_SELECTOR, "#user-form button").click()
    wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "#recs li")) == 20)
    d.find_element(By.ID, "user").clear()
    d.find_element(By.ID, "user").send_keys("nobody")
    d.find_element(By.CSS_SELECTOR, "#user-form button").click()
    wait.until(lambda _: "unknown user" in error.text)
    assert d.find_elements(By.CSS_SELECTOR, "#recs li") == []

    # after an upload, "Similar songs" and the map's black rings still belong to the selected track
    d.execute_script("selectTrack('t07', false)")
    wait.until(lambda _: d.find_element(By.ID, "now-title").text == "Tone 7 — Composer low")
    listed = [li.get_attribute("data-id") for li in d.find_elements(By.CSS_SELECTOR, "#similar li")]
    good = tmp_path / "copy of five.wav"
    good.write_bytes(_wav_bytes(5, tmp_path))
    d.find_element(By.ID, "upload-input").send_keys(str(good))
    wait.until(lambda _: d.find_element(By.ID, "upload-results").is_displayed())
    ringed, upload_ringed = d.execute_script("return [[...state.similar], [...state.uploadSimilar]]")
    assert set(ringed) == {"t07", *listed} and "t05" in upload_ringed
    assert d.find_element(By.ID, "map").get_attribute("data-upload") == "shown"

    # a failed upload removes the star and rings of the previous one
    bad = tmp_path / "not audio.wav"
    bad.write_bytes(b"this is not a sound file at all" * 10)
    d.find_element(By.ID, "upload-input").send_keys(str(bad))
    wait.until(lambda _: "not a recognised audio file" in error.text)
    assert d.find_element(By.ID, "map").get_attribute("data-upload") == ""
    assert d.execute_script("return state.uploadSimilar.size") == 0
