"""A random merge from the tab in a real browser (chromium + selenium, the standalone app of test_browser.py): the
dice settings, "Random merge to file", the weight seed in the message, and the drawn weights in the file's recipe,
checked against numpy's documented generator with §4.4's X formula."""

from __future__ import annotations

import json

import numpy as np
from test_browser import ARTIFACTS, Tab, app, browser, pytestmark, wait_until  # noqa: F401 - fixtures and skip

SEED = 4242


def test_random_merge_to_file_shows_its_seed(app, browser):  # noqa: F811 - the fixtures imported above
    tab = Tab(browser)
    tab.load(app["url"])
    tab.choose("bm_model_a", "model_a.safetensors")
    tab.choose("bm_model_b", "model_b.safetensors")
    tab.open_accordion("bm_dice_acc", "#bm_rand_file")
    assert not tab.el("#bm_rand_run").is_enabled()  # Run Rand generates images: WebUI only
    tab.choose("bm_rand_mode", "X")
    tab.type_text("bm_rand_upper", "0.9")
    tab.type_text("bm_rand_lower", "0.1")
    tab.type_number("bm_rand_seed", str(SEED))
    tab.open_accordion("bm_options", "#bm_custom_name")
    tab.type_text("bm_custom_name", "dice_merge")
    tab.click("#bm_rand_file")
    message = tab.wait_message(f"Weight seed {SEED}")
    r = np.random.RandomState(SEED).rand(3000)
    want = ",".join(repr(round((0.1 - 0.9) * float(r[i]) + 0.9, 3)) for i in range(26))
    assert "Saved" in message and f"alpha {want}" in message
    out = app["models"] / "dice_merge.safetensors"
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert recipe["seed"] == SEED and recipe["weights_alpha"] == want
    assert recipe["extra"]["random"]["mode"] == "X"
    tab.screenshot("bm_dice_acc", "tab-dice.png")
    # a bad setting: the error in the page, no file
    tab.choose("bm_rand_mode", "custom")
    tab.type_text("bm_custom_name", "dice_bad")
    tab.click("#bm_rand_file")
    assert "needs a template" in tab.wait_message("Error")
    assert not (app["models"] / "dice_bad.safetensors").exists()
