"""The Analysis, Elements and IDs-from-images sub-tabs in a real browser (chromium through selenium, as
test_browser.py), against the standalone app over tiny synthetic models.

- Analysis: two models compared, the per-block bar chart drawn; each bar's value is checked against the relative L2
  distance computed here in float64 from the files.
- IDs from images: a PNG carrying Block Merger's infotext is dropped; the Merge tab's controls take its recipe. A PNG
  without a recipe says so.
- Elements: a filtered key list; a click on a row adds its rule to the Merge tab's Elemental field.
Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import json
import math

import pytest
import test_browser
from conftest import sd1_block
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file
from test_browser import ARTIFACTS, Tab, pytestmark, wait_until  # noqa: F401  (pytestmark: the same skips)

from lib_merge.core.recipe import Recipe

# test_browser's fixtures (the app over tiny models, the browser), shared by name
app, browser = test_browser.app, test_browser.browser


def group(key: str) -> str | None:
    if "model" not in key:
        return None
    if key.startswith("cond_stage_model."):
        return "TE"
    return "VAE" if key.startswith("first_stage_model.") else sd1_block(key)


def test_analysis_chart_in_the_browser(app, browser):
    browser.get(app["url"])
    tab = Tab(browser)
    tab.open_subtab("Analysis", "#bm_an_run")
    tab.choose("bm_an_model_a", "model_a.safetensors")
    tab.choose("bm_an_model_b", "model_b.safetensors")
    tab.click("#bm_an_run")
    bars = wait_until(lambda: browser.find_elements("css selector", "#bm_an_chart rect.bm-bar"), 600, "the chart")
    drawn = {b.get_attribute("data-label"): float(b.get_attribute("data-value")) for b in bars}
    a = load_file(str(app["models"] / "model_a.safetensors"))
    b = load_file(str(app["models"] / "model_b.safetensors"))
    sums: dict[str, list[float]] = {}
    for key, t in a.items():
        g = group(key)
        if g is None or not t.is_floating_point():
            continue
        x, y = t.double().flatten(), b[key].double().flatten()
        s = sums.setdefault(g, [0.0, 0.0])
        s[0] += float((x - y) @ (x - y))
        s[1] += float(x @ x)
    want = {g: math.sqrt(d / n) for g, (d, n) in sums.items()}
    assert drawn.keys() == want.keys()
    for label, value in drawn.items():
        assert value == pytest.approx(want[label], rel=1e-4), label
    assert "tensors compared" in tab.text("bm_an_message")
    # the table lists the same blocks
    cells = [c.text for c in browser.find_elements("css selector", "#bm_an_blocks tbody tr td:first-child")]
    assert set(cells) == set(want)
    # another measure redraws without reading the models again: cosines, on an axis ending at 100 %
    tab.radio("bm_an_measure", "mean cosine similarity %")
    wait_until(lambda: "mean cosine similarity %" in tab.el("#bm_an_chart svg").get_attribute("aria-label"), 300,
               "the cosine chart")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tab.d.execute_script("arguments[0].scrollIntoView({block: 'start'})", tab.el("#bm_an_chart"))
    browser.save_screenshot(str(ARTIFACTS / "analysis-chart.png"))


def infotext(recipe: Recipe) -> str:
    def quote(v):
        return json.dumps(v) if any(c in v for c in ",:\n") else v
    return (f"a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, Seed: 3, Size: 512x512, "
            f"Model: {quote(recipe.title())}, Merge: {quote(recipe.title())}, Merge recipe: {quote(recipe.to_json())}")


def png(path, parameters):
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    Image.new("RGB", (16, 16), "teal").save(path, pnginfo=info)
    return path


def test_ids_from_images_fill_the_merge_tab(app, browser, tmp_path):
    weights = ",".join(f"{0.04 * i:g}" for i in range(26))
    recipe = Recipe("model_a.safetensors", "model_b.safetensors", "base.safetensors", mode="Add difference",
                    alpha=0.35, weights_alpha=weights, elemental="OUT06:attn:0.5")
    browser.get(app["url"])
    tab = Tab(browser)
    tab.open_subtab("IDs from images", "#bm_img_files")
    plain = png(tmp_path / "plain.png", "a dog\nSteps: 20, Seed: 1, Model: sd15")
    tab.el("#bm_img_files input[type=file]").send_keys(str(plain))
    wait_until(lambda: "carries no merge recipe" in tab.text("bm_img_message"), 300, "the no-recipe message")
    browser.get(app["url"])  # a fresh page: the file field empty again
    tab.open_subtab("IDs from images", "#bm_img_files")
    made = png(tmp_path / "merged.png", infotext(recipe))
    tab.el("#bm_img_files input[type=file]").send_keys(str(made))
    wait_until(lambda: "merged.png: loaded the Block Merger recipe" in tab.text("bm_img_message"), 300,
               "the recipe loaded")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "ids-from-images.png"))
    tab.open_subtab("Merge", "#bm_merge")
    assert tab.el("#bm_model_a input").get_attribute("value") == "model_a.safetensors"
    assert tab.el("#bm_model_b input").get_attribute("value") == "model_b.safetensors"
    assert tab.el("#bm_model_c input").get_attribute("value") == "base.safetensors"
    assert tab.el('#bm_mode input[value="Add difference"]').is_selected()
    assert float(tab.el("#bm_alpha input[type=number]").get_property("value")) == pytest.approx(0.35)
    assert tab.el("#bm_use_mbw input").is_selected()
    assert tab.text("bm_weights_alpha") == weights
    assert float(tab.el("#bm_w_OUT11 input[type=number]").get_property("value")) == pytest.approx(1.0)
    assert tab.el("#bm_elemental textarea").get_property("value") == "OUT06:attn:0.5"
    tab.d.execute_script("arguments[0].scrollIntoView({block: 'start'})", tab.el("#bm_model_a"))
    browser.save_screenshot(str(ARTIFACTS / "ids-from-images-merge-tab.png"))


def test_elements_click_adds_a_rule(app, browser):
    browser.get(app["url"])
    tab = Tab(browser)
    tab.open_subtab("Elements", "#bm_el_list")
    tab.choose("bm_el_model", "model_a.safetensors")
    tab.type_text("bm_el_filter", "OUT11")
    tab.click("#bm_el_list")
    wait_until(lambda: "matching 'OUT11'" in tab.text("bm_el_message"), 300, "the listing")
    rows = browser.find_elements("css selector", "#bm_el_table tbody tr")
    assert rows and all(r.find_elements("css selector", "td")[1].text == "OUT11" for r in rows)
    key = rows[0].find_elements("css selector", "td")[3].text
    rows[0].find_elements("css selector", "td")[3].click()
    wait_until(lambda: "Added" in tab.text("bm_el_message"), 300, "the rule added")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "elements.png"))
    tab.open_subtab("Merge", "#bm_merge")
    assert tab.el("#bm_elemental textarea").get_property("value").splitlines()[-1] == f"OUT11:{key}:0.5"
