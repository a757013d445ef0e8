"""The LoRA sub-tab in a real browser (chromium through selenium) against the standalone app: open the sub-tab, add
a LoRA from the list, bake it into a checkpoint file and see the file and the message; "Bake into the loaded model"
is disabled there (no model is loaded outside the WebUI). A screenshot goes to tests/artifacts/lora-tab.png."""

from __future__ import annotations

import pytest
import test_browser
import torch
from lora_helpers import rand, save_lora
from test_browser import ARTIFACTS, Tab, wait_until

Q_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The Merge tab's browser app (tiny SD1 models), with one LoRA in models/Lora."""
    yield from test_browser.app.__wrapped__(tmp_path_factory)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    yield from test_browser.browser.__wrapped__(tmp_path_factory)


@pytest.fixture(scope="module", autouse=True)
def lora_file(app):
    folder = app["models"] / "Lora"
    folder.mkdir(exist_ok=True)
    return save_lora(folder / "style.safetensors", {f"{Q_K}.lora_down.weight": rand((4, 40), 1),
                                                    f"{Q_K}.lora_up.weight": rand((40, 4), 2),
                                                    f"{Q_K}.alpha": torch.tensor(4.0)})


def test_bake_to_a_file_from_the_lora_sub_tab(app, driver):
    browser = driver
    browser.get(app["url"])
    tab = Tab(browser)
    wait_until(lambda: tab.el("#bm_tabs"), 300, "the tab")
    wait_until(lambda: [b for b in browser.find_elements("css selector", "#bm_tabs button") if b.text == "LoRA"],
               300, "the LoRA sub-tab button")[0].click()
    tab.click("#bm_lora_refresh")  # the LoRA file was made after the app started
    tab.click("#bm_lora_list input")
    wait_until(lambda: tab.el('#bm_lora_list li[data-value^="style.safetensors"]'), 300, "style in the list").click()
    tab.click("#bm_lora_add")
    wait_until(lambda: tab.text("bm_lora_specs") == "style.safetensors:1", 300, "the spec field filled")
    assert not tab.el("#bm_lora_bake_loaded").is_enabled()
    assert "No model is loaded" in tab.el("#bm_lora_live_note").text
    [b for b in browser.find_elements("css selector", "button") if b.text == "Into a checkpoint file"][0].click()
    tab.choose("bm_lora_model", "base.safetensors")
    tab.type_text("bm_lora_name", "base-style")
    tab.click("#bm_lora_bake_file")
    message = wait_until(lambda: "Saved" in tab.text("bm_lora_message") and tab.text("bm_lora_message"), 300,
                         "the bake's message")
    assert "style x1: 1 of 1 modules applied" in message
    assert (app["models"] / "base-style.safetensors").is_file()
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "lora-tab.png"))
