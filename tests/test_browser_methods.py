"""A merge method in a real browser (issue 17): against the standalone app of tests/test_browser.py, a person picks
TIES, the base (model A) and two more models in the multiselect, sets the density, merges to a file; the merge-mode
controls are hidden while a method is chosen, the formula is shown, and the file's recipe is the method recipe.
A screenshot of the method panel is written to tests/artifacts/.
"""

from __future__ import annotations

import json
import time

from test_browser import ARTIFACTS, Tab, app, browser, wait_until  # noqa: F401 - fixtures used by name

from lib_merge.core.methods import METHODS


def pick_models(tab: Tab, names):
    """The multiselect: open it and click each option in turn (it stays a list of chips)."""
    for name in names:
        tab.click("#bm_models input")
        option = wait_until(lambda n=name: tab.el(f'#bm_models li[data-value="{n}"]'), 300, f"option {name}")
        option.click()
        wait_until(lambda n=name: n in tab.el("#bm_models").text, 300, f"{name} chosen")


def test_ties_with_three_models_in_the_browser(app, browser):  # noqa: F811 - pytest fixtures
    tab = Tab(browser)
    tab.load(app["url"])
    assert not tab.el("#bm_models").is_displayed() and tab.el("#bm_mode").is_displayed()

    tab.choose("bm_model_a", "base.safetensors")
    tab.choose("bm_method", "ties")
    wait_until(lambda: METHODS["ties"].formula in tab.el("#bm_method_info").text, 300, "TIES' formula")
    wait_until(lambda: not tab.el("#bm_mode").is_displayed() and not tab.el("#bm_model_b").is_displayed(), 300,
               "the merge-mode controls hidden")
    assert not tab.el("#bm_drop").is_displayed() and tab.el("#bm_density").is_displayed()
    wait_until(lambda: tab.el("#bm_alpha input[type=number]").get_property("value") == "1", 300, "λ set to 1")
    pick_models(tab, ["model_a.safetensors", "model_b.safetensors"])
    tab.type_number("bm_density", "0.4")

    tab.open_accordion("bm_options", "#bm_custom_name")
    tab.type_text("bm_custom_name", "browser_ties")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.3)
    browser.save_screenshot(str(ARTIFACTS / "tab-method.png"))
    tab.click("#bm_save_file")
    message = tab.wait_message("Saved")
    out = app["models"] / "browser_ties.safetensors"
    assert str(out) in message and out.is_file()
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert (recipe["method"], recipe["model_a"], recipe["models"]) == (
        "ties", "base.safetensors", ["model_a.safetensors", "model_b.safetensors"])
    assert (recipe["density"], recipe["alpha"]) == (0.4, 1)
    wait_until(lambda: "ties" in tab.el("#bm_history").get_attribute("textContent"), 300,
               "the merge in the history table")

    # back to the merge modes: their controls return
    tab.choose("bm_method", "Off (merge modes)")
    wait_until(lambda: tab.el("#bm_mode").is_displayed() and not tab.el("#bm_models").is_displayed(), 300,
               "the merge-mode controls back")


def test_a_parameter_preset_fills_its_block_weights_in_the_browser(app, browser):  # noqa: F811 - pytest fixtures
    """TIES' density preset dropdown beside its block-weights field: choosing ALL_B puts its 26 values there and turns
    MBW on; the file merged from it carries them as the recipe's per-block density."""
    from lib_merge.core.weights import Presets

    tab = Tab(browser)
    browser.get(app["url"])
    wait_until(lambda: tab.el("#bm_save_file").is_displayed(), 300, "the tab")
    assert not tab.el("#bm_preset_density").is_displayed()
    tab.choose("bm_model_a", "base.safetensors")
    tab.choose("bm_method", "ties")
    wait_until(lambda: tab.el("#bm_preset_density").is_displayed(), 300, "density's preset dropdown")
    assert not tab.el("#bm_preset_drop").is_displayed() and not tab.el("#bm_preset_epsilon").is_displayed()
    pick_models(tab, ["model_a.safetensors", "model_b.safetensors"])
    values = Presets.load().get("ALL_B")
    tab.choose("bm_preset_density", "ALL_B")
    wait_until(lambda: tab.el("#bm_weights_density textarea").get_property("value") == values, 300,
               "ALL_B's values in density's block weights")
    assert tab.el("#bm_use_mbw input").is_selected()
    tab.type_text("bm_weights_alpha", "")  # λ from its slider, not the 26 × 0.5 the field starts with

    tab.open_accordion("bm_options", "#bm_custom_name")
    tab.type_text("bm_custom_name", "browser_ties_preset")
    tab.click("#bm_save_file")
    tab.wait_message("Saved")
    from safetensors import safe_open

    with safe_open(app["models"] / "browser_ties_preset.safetensors", "pt") as f:
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert (recipe["method"], recipe["weights_density"], recipe["alpha"]) == ("ties", values, 1)
    assert not recipe.get("weights_alpha")
