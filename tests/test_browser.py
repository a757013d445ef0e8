"""The tab in a real browser: Debian's chromium, driven through chromium-driver (selenium), against the standalone app
(`python -m lib_merge ui`) serving tiny synthetic models on a free 127.0.0.1 port.

A person's path through the tab: pick models A/B/C, a merge mode and a calc mode, block weights from a preset and
from a slider, merge to a file; then check the message, the file and its recipe metadata. A bad input (25 weights)
must show its error in the page. Screenshots of the tab (1280x800: the top, and the block weights; and the whole
page at 1280 wide) are written to tests/artifacts/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lib_merge.cli import synth
from lib_merge.core.arch import BLOCKS_26, BLOCKS_XL
from lib_merge.core.weights import Presets

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,800")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver; "
           ".ci/run installs them)",
)
pytest.importorskip("gradio", reason="gradio 3.41.2 is not installed (pip install -r requirements-dev.txt)")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                                              "(pip install -r requirements-dev.txt)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float = 300.0, what: str = "condition", interval: float = 0.2):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = condition()
        except Exception as e:  # noqa: BLE001 - elements come and go while gradio renders
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    models = tmp_path_factory.mktemp("browser_models")
    data = tmp_path_factory.mktemp("browser_data")
    base = synth.make_checkpoint(models / "base.safetensors", "sd1", factor=16, seed=1)
    synth.make_checkpoint(models / "model_a.safetensors", "sd1", factor=16, seed=2, base=base, noise=1.0)
    synth.make_checkpoint(models / "model_b.safetensors", "sd1", factor=16, seed=3, base=base, noise=1.0)
    port = free_port()
    log = (data / "app.log").open("w")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lib_merge", "ui", "--models", str(models), "--data", str(data), "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        def up():
            if proc.poll() is not None:
                raise AssertionError(f"the app exited with {proc.returncode}: {(data / 'app.log').read_text()}")
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200

        end = time.monotonic() + 600
        while True:
            try:
                if up():
                    break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.3)
        yield {"url": url, "models": models, "data": data}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    set_viewport(driver, 1280, 800)
    try:
        yield driver
    finally:
        driver.quit()


def set_viewport(driver, width: int, height: int) -> None:
    """Size the window so that the page itself (the viewport) is width x height."""
    driver.set_window_size(width, height)
    for _ in range(3):  # the window's frame is learnt from what the page gets; a resize can land late, so re-check
        inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        if inner == [width, height]:
            return
        outer = driver.get_window_size()
        driver.set_window_size(outer["width"] + width - inner[0], outer["height"] + height - inner[1])
        time.sleep(0.2)


class Tab:
    """Small helpers over gradio 3.41's DOM (components are found by their elem_id)."""

    def __init__(self, driver):
        self.d = driver

    def el(self, css: str):
        return self.d.find_element("css selector", css)

    def load(self, url: str) -> None:
        """Open the page and wait for the tab (the Save button) to be shown."""
        self.d.get(url)
        wait_until(lambda: self.el("#bm_save_file").is_displayed(), 300, "the tab")

    def screenshot(self, elem_id: str, name: str) -> None:
        """Scroll `elem_id` into view and save the page as ARTIFACTS/name (to look at)."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.d.execute_script(f"document.getElementById('{elem_id}').scrollIntoView({{block: 'center'}})")
        time.sleep(0.3)
        self.d.save_screenshot(str(ARTIFACTS / name))

    def click(self, css: str):
        element = self.el(css)
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()

    def choose(self, elem_id: str, value: str):
        """A gr.Dropdown: open it and click the option."""
        self.click(f"#{elem_id} input")
        option = wait_until(lambda: self.el(f'#{elem_id} li[data-value="{value}"]'), 300, f"option {value}")
        option.click()
        wait_until(lambda: self.el(f"#{elem_id} input").get_attribute("value") == value, 300, f"{elem_id} = {value}")

    def radio(self, elem_id: str, value: str):
        self.click(f'#{elem_id} label[data-testid="{value}-radio-label"]')
        wait_until(lambda: self.el(f'#{elem_id} input[value="{value}"]').is_selected(), 300, f"{elem_id} = {value}")

    def open_subtab(self, name: str, probe: str, within: str = "#bm_tabs"):
        """Click the tab button `name` inside `within` (the tab's sub-tabs by default) and wait for `probe`."""
        button = wait_until(lambda: next(b for b in self.d.find_elements("css selector", f"{within} button")
                                         if b.text.strip() == name), 300, f"sub-tab {name}")
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
        button.click()
        wait_until(lambda: self.el(probe).is_displayed(), 300, f"{name} shown")

    def open_accordion(self, elem_id: str, probe: str):
        """Open an accordion (a click on its header) unless `probe` inside it is already visible."""
        if not self.el(probe).is_displayed():
            self.click(f"#{elem_id} > .label-wrap")
            wait_until(lambda: self.el(probe).is_displayed(), 300, f"{elem_id} open")

    def type_number(self, elem_id: str, value: str):
        """A slider's number box: select, type, leave (the blur is the slider's "release")."""
        from selenium.webdriver.common.keys import Keys

        box = self.el(f"#{elem_id} input[type=number]")
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(value)
        box.send_keys(Keys.TAB)

    def text(self, elem_id: str) -> str:
        return self.el(f"#{elem_id} textarea, #{elem_id} input").get_property("value")

    def type_text(self, elem_id: str, value: str):
        from selenium.webdriver.common.keys import Keys

        box = self.el(f"#{elem_id} textarea, #{elem_id} input")
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(value)
        box.send_keys(Keys.TAB)  # leave the field, as a person moving on does

    def message(self) -> str:
        return self.text("bm_message")

    def wait_message(self, needle: str, timeout: float = 300) -> str:
        return wait_until(lambda: needle in self.message() and self.message(), timeout, f"message with {needle!r}")


def test_merge_to_file_in_the_browser(app, browser):
    tab = Tab(browser)
    tab.load(app["url"])

    # standalone: loading into a model and generating are unavailable, with the reason in the page
    assert not tab.el("#bm_merge").is_enabled() and not tab.el("#bm_generate").is_enabled()
    assert "No model is loaded outside the WebUI" in tab.el("#bm_unavailable").text

    tab.choose("bm_model_a", "model_a.safetensors")
    tab.choose("bm_model_b", "model_b.safetensors")
    tab.choose("bm_model_c", "base.safetensors")
    tab.radio("bm_mode", "Add difference")
    wait_until(lambda: "A+(B-C)*alpha" in tab.el("#bm_mode").text, 300, "the formula of Add difference")

    # an invalid pair is explained as soon as it is chosen
    tab.radio("bm_calc", "cosineA")
    wait_until(lambda: "Not possible" in tab.el("#bm_calc_info").text, 300, "the invalid pair note")
    assert "cannot be used with 'Add difference'" in tab.el("#bm_calc_info").text
    tab.radio("bm_calc", "smoothAdd")
    wait_until(lambda: "gaussian" in tab.el("#bm_calc_info").text and "Not possible" not in tab.el(
        "#bm_calc_info").text, 300, "smoothAdd's explanation")

    # block weights: a preset (ticks "use MBW"), then one slider moved by hand
    tab.choose("bm_preset", "FLAT_25")
    wait_until(lambda: tab.el("#bm_use_mbw input").is_selected(), 300, "use MBW ticked by the preset")
    flat = Presets.load().get("FLAT_25")  # 0 for BASE, 0.25 for every U-Net block
    assert flat.split(",")[:2] == ["0", "0.25"]
    wait_until(lambda: tab.text("bm_weights_alpha") == flat, 300, "the preset's weights")
    wait_until(lambda: tab.el("#bm_w_OUT03 input[type=number]").get_property("value") == "0.25", 300,
               "the sliders set by the preset")
    tab.type_number("bm_w_IN05", "0.8")
    expected = flat.split(",")
    expected[6] = "0.8"  # BASE, IN00..IN05
    wait_until(lambda: tab.text("bm_weights_alpha") == ",".join(expected), 300, "the text following the slider")
    # ... and the text drives the sliders
    typed = list(expected)
    typed[25] = "1"
    tab.type_text("bm_weights_alpha", ",".join(typed))
    wait_until(lambda: tab.el("#bm_w_OUT11 input[type=number]").get_property("value") == "1", 300,
               "OUT11's slider following the text")
    chart = tab.el("#bm_chart")
    wait_until(lambda: len(chart.find_elements("css selector", "circle")) == 26, 300, "26 points in the chart")

    tab.open_accordion("bm_options", "#bm_custom_name")
    tab.type_text("bm_custom_name", "browser_merge")
    tab.click("#bm_save_file")
    message = tab.wait_message("Saved")
    out = app["models"] / "browser_merge.safetensors"
    assert str(out) in message and re.search(r"merge ID \d+", message)  # any ID: other tests share the app
    assert out.is_file()
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["sd_merge_recipe"])
    assert (recipe["mode"], recipe["calc"]) == ("Add difference", "smoothAdd")
    assert (recipe["model_a"], recipe["model_b"], recipe["model_c"]) == (
        "model_a.safetensors", "model_b.safetensors", "base.safetensors")
    assert recipe["weights_alpha"] == ",".join(typed)
    wait_until(lambda: "smoothAdd" in tab.el("#bm_history").get_attribute("textContent"), 300,
               "the merge in the history table")

    # screenshots for a person to look at: the top of the tab at 1280x800, and the whole page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.3)
    browser.save_screenshot(str(ARTIFACTS / "tab.png"))
    browser.execute_script("document.getElementById('bm_mbw').scrollIntoView()")
    time.sleep(0.3)
    browser.save_screenshot(str(ARTIFACTS / "tab-weights.png"))  # the chart and the sliders, at 1280x800
    height = browser.execute_script("return document.documentElement.scrollHeight")
    set_viewport(browser, 1280, min(height, 6000))
    time.sleep(0.5)
    browser.save_screenshot(str(ARTIFACTS / "tab-full.png"))
    set_viewport(browser, 1280, 800)
    assert browser.execute_script("return [window.innerWidth, window.innerHeight]") == [1280, 800]

    # a bad input: 25 weights -> the error in the page, no file
    tab.type_text("bm_weights_alpha", ",".join(["0.5"] * 25))
    tab.type_text("bm_custom_name", "bad_merge")
    tab.click("#bm_save_file")
    message = tab.wait_message("Error")
    assert "Block weights for alpha have 25 values; give 26" in message
    assert "Traceback" not in browser.page_source
    assert not (app["models"] / "bad_merge.safetensors").exists()


def test_load_settings_and_sdxl_block_type_in_the_browser(app, browser):
    tab = Tab(browser)
    tab.load(app["url"])
    tab.choose("bm_model_a", "model_b.safetensors")
    tab.choose("bm_model_b", "model_a.safetensors")
    tab.radio("bm_mode", "Weight sum")
    tab.type_number("bm_alpha", "0.3")
    tab.open_accordion("bm_options", "#bm_custom_name")
    tab.type_text("bm_custom_name", "second_merge")
    tab.click("#bm_save_file")
    message = tab.wait_message("second_merge")
    assert "Saved" in message and (app["models"] / "second_merge.safetensors").is_file()
    merge_id = re.search(r"merge ID (\d+)", message).group(1)

    # a fresh page: "load settings from merge ID" -1 fills the controls from the history
    browser.get(app["url"])
    wait_until(lambda: tab.el("#bm_load_settings").is_displayed(), 300, "the tab")
    tab.click("#bm_load_settings")
    tab.wait_message(f"Loaded the settings of merge {merge_id}.")  # -1 resolved to the last merge's ID
    assert tab.el("#bm_model_a input").get_attribute("value") == "model_b.safetensors"
    assert tab.el("#bm_model_b input").get_attribute("value") == "model_a.safetensors"
    assert tab.el('#bm_mode input[value="Weight sum"]').is_selected()
    assert tab.el("#bm_alpha input[type=number]").get_property("value") == "0.3"

    # SDXL block type: 20 values in the text, the six SDXL-less sliders hidden, 20 points in the chart
    tab.click("#bm_use_mbw input")
    tab.radio("bm_block_type", "SDXL")
    wait_until(lambda: len(tab.text("bm_weights_alpha").split(",")) == 20, 300, "20 weights")
    wait_until(lambda: not tab.el("#bm_w_IN10").is_displayed() and not tab.el("#bm_w_OUT09").is_displayed(), 300,
               "IN09-IN11 and OUT09-OUT11 hidden")
    assert tab.el("#bm_w_IN08").is_displayed() and tab.el("#bm_w_OUT08").is_displayed()
    wait_until(lambda: len(tab.el("#bm_chart").find_elements("css selector", "circle")) == 20, 300, "20 points")
    # these models are SD1: the merge refuses the 20-value layout with a message in the page
    tab.click("#bm_save_file")
    assert "this model is SD1 and needs 26" in tab.wait_message("Error")
    tab.radio("bm_block_type", "SD1")
    wait_until(lambda: len(tab.text("bm_weights_alpha").split(",")) == 26, 300, "26 weights again")
    wait_until(lambda: tab.el("#bm_w_IN10").is_displayed(), 300, "IN10 shown again")

    # inspect a model (the standalone app's view of lib_merge.inspect.describe)
    tab.open_accordion("bm_inspect_acc", "#bm_inspect_model")
    tab.click("#bm_refresh")  # the merge saved above joins the model lists
    tab.choose("bm_inspect_model", "second_merge.safetensors")
    tab.click("#bm_inspect")
    wait_until(lambda: "Architecture: SD1" in tab.text("bm_inspect_out"), 300, "the description")
    assert "sd_merge_recipe" in tab.text("bm_inspect_out")


def test_front_end_files_in_the_browser(app, browser):
    """javascript/block_merger.js and style.css, as a person meets them: a hint on hover, the 26 sliders and the
    chart on one 1280x800 screen, Ctrl+Enter merging, and a question before "Merge to file" replaces a file."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    tab = Tab(browser)
    tab.load(app["url"])

    # hover hints: the control under the pointer has its hint (the WebUI's way: the `title` the browser shows)
    def hint_under_pointer(css: str) -> str:
        target = tab.el(css)
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", target)
        ActionChains(browser).move_to_element(target).perform()
        return browser.execute_script(
            "const r = arguments[0].getBoundingClientRect();"
            "const e = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);"
            "const t = e && e.closest('[title]'); return t ? t.title : '';", target)

    assert "A*(1-alpha)+B*alpha" in wait_until(lambda: hint_under_pointer("#bm_alpha span"), 300, "alpha's hint")
    assert wait_until(lambda: hint_under_pointer('#bm_mode label[data-testid="Add difference-radio-label"]'), 300,
                      "the hint of a merge mode").startswith("A+(B-C)*alpha")
    assert "1.8*alpha*(B-C)" in hint_under_pointer('#bm_calc label[data-testid="trainDifference-radio-label"]')
    assert "skip from IN00" in hint_under_pointer("#bm_w_OUT11 input[type=range]")

    # the layout at 1280x800: with block weights on, the chart and all 26 sliders on one screen, in a U
    tab.click("#bm_use_mbw input")
    wait_until(lambda: len(tab.el("#bm_chart").find_elements("css selector", "circle")) == 26, 300, "the chart")
    browser.execute_script("document.getElementById('bm_chart').scrollIntoView({block: 'start'})")
    time.sleep(0.3)
    assert browser.execute_script("return [window.innerWidth, window.innerHeight]") == [1280, 800]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "tab-layout.png"))
    rect = browser.execute_script("const r = document.getElementById(arguments[0]).getBoundingClientRect();"
                                  "return {top: r.top, bottom: r.bottom, left: r.left, right: r.right};", "bm_chart")
    assert -1 <= rect["top"] and rect["bottom"] <= 800, rect  # (sub-pixel scrolling)
    boxes = {}
    for label in ("BASE", *[f"IN{i:02d}" for i in range(12)], "M00", *[f"OUT{i:02d}" for i in range(12)]):
        r = browser.execute_script("const r = document.getElementById(arguments[0]).getBoundingClientRect();"
                                   "return {top: r.top, bottom: r.bottom, left: r.left, right: r.right};",
                                   f"bm_w_{label}")
        assert r["top"] >= rect["bottom"] - 1 and r["bottom"] <= 800 and 0 <= r["left"] and r["right"] <= 1280, \
            f"{label} is not on the screen with the chart: {r}"
        boxes[label] = r
    for i in range(12):
        inside, outside = boxes[f"IN{i:02d}"], boxes[f"OUT{11 - i:02d}"]
        assert abs(inside["top"] - outside["top"]) < 2, "IN and OUT blocks of one level share a row"
        assert inside["right"] <= outside["left"], "IN on the left, OUT on the right"
        if i:
            assert inside["top"] > boxes[f"IN{i - 1:02d}"]["top"], "IN goes down"
    assert boxes["BASE"]["bottom"] <= boxes["IN00"]["top"] + 1
    assert boxes["M00"]["top"] >= boxes["IN11"]["bottom"] - 1 and boxes["M00"]["top"] >= boxes["OUT00"]["bottom"] - 1
    # long decimals stay whole: the weight text is one line that scrolls sideways
    tab.type_text("bm_weights_alpha", ",".join(["0.123456789"] * 26))
    area = tab.el("#bm_weights_alpha textarea")
    assert area.value_of_css_property("white-space") == "pre"
    assert browser.execute_script("return arguments[0].scrollWidth > arguments[0].clientWidth", area)
    tab.click("#bm_use_mbw input")

    # Ctrl+Enter in the tab merges (here, without a loaded model: to a file)
    tab.choose("bm_model_a", "model_a.safetensors")
    tab.choose("bm_model_b", "model_b.safetensors")
    tab.radio("bm_mode", "Weight sum")
    tab.radio("bm_calc", "normal")
    tab.open_accordion("bm_options", "#bm_custom_name")
    tab.type_text("bm_custom_name", "ctrl_enter")
    tab.el("#bm_custom_name input").click()

    def ctrl_enter():
        ActionChains(browser).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()

    ctrl_enter()
    out = app["models"] / "ctrl_enter.safetensors"
    assert str(out) in tab.wait_message("ctrl_enter")
    assert out.is_file()
    before = out.stat()

    # "overwrite" ticked and the file there: the page asks; "no" keeps the file, "yes" replaces it
    overwrite = browser.find_element("xpath", "//*[@id='bm_save_flags']//label[normalize-space(.)='overwrite']")
    overwrite.click()
    wait_until(lambda: overwrite.find_element("css selector", "input").is_selected(), 300, "overwrite ticked")
    tab.click("#bm_save_file")
    alert = wait_until(lambda: browser.switch_to.alert, 300, "the question before overwriting")
    assert str(out) in alert.text and "Replace it" in alert.text
    alert.dismiss()
    assert f"cancelled: {out} is kept" in tab.wait_message("cancelled")
    assert (out.stat().st_ino, out.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    tab.el("#bm_custom_name input").click()
    ctrl_enter()
    wait_until(lambda: browser.switch_to.alert, 300, "the question again").accept()
    tab.wait_message("Saved")
    assert out.stat().st_ino != before.st_ino, "the file was replaced (atomically, by a new one)"
    assert "Traceback" not in browser.page_source


def test_a_moved_slider_changes_only_its_token_in_the_page(app, browser):
    """Slider -> text runs in the page (issue 12, fault 4): gradio 3.41 drops an event while the same one is pending,
    so a server round trip lost values typed into the number boxes in quick succession. The page function keeps
    every other token's own text (GRAD_V's 0.9166666667) and writes the moved one with 4 decimals at most."""
    tab = Tab(browser)
    tab.load(app["url"])
    grad_v = Presets.load().get("GRAD_V").split(",")
    sd1, xl = list(range(26)), [BLOCKS_26.index(label) for label in BLOCKS_XL]
    out05 = BLOCKS_26.index("OUT05")
    sliders = [round(float(v), 3) for v in grad_v]  # what the sliders show for GRAD_V

    def moved(position, visible, text, values):
        return browser.execute_script("return window.blockMergerSliderMoved(...arguments)", position, visible, text,
                                      values)

    def replaced(tokens, index, token):
        return ",".join([*tokens[:index], token, *tokens[index + 1:]])

    assert moved(out05, sd1, ",".join(grad_v), [*sliders[:out05], 0.2, *sliders[out05 + 1:]]) == replaced(
        grad_v, out05, "0.2")
    assert moved(out05, sd1, ",".join(grad_v), [*sliders[:out05], 0.12345, *sliders[out05 + 1:]]) == replaced(
        grad_v, out05, "0.1235")  # typed into the number box: 4 decimals at most
    assert moved(out05, sd1, ",".join(grad_v), sliders) == ",".join(grad_v)  # released where it was: digits kept
    two_lines = ",".join(grad_v[:13]) + "\n" + ",".join(grad_v[13:]) + ","
    assert moved(out05, sd1, two_lines, [*sliders[:out05], -0.00001, *sliders[out05 + 1:]]) == \
        replaced(grad_v, out05, "0")  # a line break and one trailing comma read as the list; no "-0"
    xl_text = [grad_v[i] for i in xl]  # SDXL: 20 values, OUT05 is the 17th of them
    assert moved(out05, xl, ",".join(xl_text), [*sliders[:out05], 1.5, *sliders[out05 + 1:]]) == replaced(
        xl_text, xl.index(out05), "1.5")
    # not a complete list (a preset's name, a list being typed): rebuilt from every slider
    assert moved(out05, sd1, "GRAD_V", sliders) == ",".join(f"{v:g}" for v in sliders)
    assert moved(3, xl, "0.1,0.2", [0.25] * 26) == ",".join(["0.25"] * 20)

    # in the tab: values typed into four number boxes, each left at once, all reach the text
    tab.open_accordion("bm_mbw", "#bm_weights_alpha")
    tab.type_text("bm_weights_alpha", ",".join(grad_v))
    wait_until(lambda: abs(float(tab.el("#bm_w_OUT01 input[type=number]").get_property("value")) - 1 / 6) < 1e-3,
               300, "the sliders following the text")
    typed = {"IN02": "0.3", "M00": "0.71", "OUT05": "0.2", "OUT10": "1.25"}
    for label, value in typed.items():
        tab.type_number(f"bm_w_{label}", value)
    expected = list(grad_v)
    for label, value in typed.items():
        expected[BLOCKS_26.index(label)] = value
    wait_until(lambda: tab.text("bm_weights_alpha") == ",".join(expected), 60, "every typed value in the text")
