"""The dice panel's E-list, settings as text and the generation defaults in a real browser (chromium + selenium,
the standalone app of test_browser.py): an elemental random merge saved with its E-list, the E-list dropped back
into the Elemental field (each rule's alpha checked against numpy's documented generator, the draw at key index +
100 of §4.4), the settings copied as a recipe, and a saved generation default still there after a reload."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from test_browser import ARTIFACTS, Tab, app, browser, pytestmark, wait_until  # noqa: F401 - fixtures and skip

from lib_merge.core.arch import BLOCKS_26
from lib_merge.io.checkpoint import open_checkpoint

SEED = 77


def test_e_list_round_trip_settings_text_and_generation_defaults(app, browser):  # noqa: F811 - fixtures above
    tab = Tab(browser)
    tab.load(app["url"])
    tab.choose("bm_model_a", "model_a.safetensors")
    tab.choose("bm_model_b", "model_b.safetensors")
    tab.open_accordion("bm_dice_acc", "#bm_rand_file")
    tab.choose("bm_rand_mode", "custom")
    template = ["0.25"] * 26
    template[BLOCKS_26.index("OUT05")] = "ER"
    tab.type_text("bm_rand_template", ",".join(template))
    tab.type_number("bm_rand_seed", str(SEED))
    tab.click("#bm_rand_save_elist input")
    tab.open_accordion("bm_options", "#bm_custom_name")
    tab.type_text("bm_custom_name", "elist_merge")
    tab.click("#bm_rand_file")
    message = tab.wait_message("E-list saved")
    path = Path(message.split("E-list saved: ")[1].splitlines()[0])
    assert path.parent == app["data"] / "block_merger_elists" and path.is_file()
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if row["elemental"] == "yes"]
    with open_checkpoint(app["models"] / "model_a.safetensors") as ckpt:
        order = list(ckpt.keys())
    r = np.random.RandomState(SEED).rand(3000)
    assert rows and all(row["block"] == "OUT05" for row in rows)
    for row in rows:
        assert float(row["alpha"]) == round(float(r[order.index(row["key"]) + 100]), 3)
    # dropped back: one rule per key, shortest key first
    tab.open_accordion("bm_elemental_acc", "#bm_elemental")
    tab.el("#bm_rand_elist input[type=file]").send_keys(str(path))
    tab.wait_message(f"Loaded {len(rows)} Elemental rules")
    rules = sorted(rows, key=lambda row: (len(row["key"]), row["key"]))
    want = "\n".join(f"OUT05:{row['key']}:{float(row['alpha'])!r}" for row in rules)
    wait_until(lambda: tab.text("bm_elemental") == want, 60, "the Elemental field filled")

    # the settings as text carry that Elemental text
    tab.open_accordion("bm_recipe_acc", "#bm_recipe_copy")
    tab.click("#bm_recipe_copy")
    recipe = json.loads(wait_until(lambda: tab.text("bm_recipe_text"), 60, "the recipe text"))
    assert recipe["model_a"] == "model_a.safetensors" and recipe["elemental"] == want

    tab.screenshot("bm_rand_id", "tab-dice-elist.png")

    # a generation default survives a reload
    tab.open_accordion("bm_gen_acc", "#bm_prompt")
    tab.type_text("bm_prompt", "a remembered cat")
    tab.click("#bm_gen_set_default")
    tab.wait_message("Saved these generation parameters")
    browser.get(app["url"])
    wait_until(lambda: tab.el("#bm_save_file").is_displayed(), 300, "the tab again")
    tab.open_accordion("bm_gen_acc", "#bm_prompt")
    wait_until(lambda: tab.text("bm_prompt") == "a remembered cat", 60, "the saved prompt after a reload")
    tab.click("#bm_gen_reset_default")
    tab.wait_message("Forgot the saved generation defaults")
