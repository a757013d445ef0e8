"""The LoRA sub-tab in a real browser (issue 14): against the standalone app of tests/test_browser.py, a person opens
the LoRA sub-tab, types a LoRA with its ratio, picks the checkpoint and bakes into a new file; the file holds
W + ratio * alpha/rank * up @ down (computed here in float64) and every other key unchanged. Baking into the loaded
model is shown disabled (the standalone app has no loaded model).
"""

from __future__ import annotations

import torch
from lora_helpers import kohya_name, rand, save_lora
from test_browser import Tab, app, browser, wait_until  # noqa: F401 - fixtures used by name

from lib_merge.io.read import open_checkpoint

MODULE = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
KEY = f"model.diffusion_model.{MODULE}.weight"


def test_bake_a_lora_into_a_checkpoint_file_from_the_lora_sub_tab(app, browser):  # noqa: F811 - pytest fixtures
    with open_checkpoint(app["models"] / "base.safetensors") as base:
        rows, cols = base.shape(KEY)
        before = {k: base.get(k).clone() for k in base.keys()}
    name = kohya_name("sd1", "unet", MODULE)
    down, up = rand((4, cols), 11), rand((rows, 4), 12)
    (app["models"] / "Lora").mkdir(exist_ok=True)
    save_lora(app["models"] / "Lora" / "style.safetensors", {f"{name}.lora_down.weight": down,
                                                             f"{name}.lora_up.weight": up,
                                                             f"{name}.alpha": torch.tensor(2.0)})
    tab = Tab(browser)
    tab.load(app["url"])
    tab.open_subtab("LoRA", "#bm_lora_specs textarea")
    assert not tab.el("#bm_lora_bake_loaded").is_enabled()  # no loaded model in the standalone app
    tab.type_text("bm_lora_specs", "style:0.7")
    tab.open_subtab("Into a checkpoint file", "#bm_lora_model", within="#bm_tab_lora")
    tab.choose("bm_lora_model", "base.safetensors")
    tab.type_text("bm_lora_name", "browser_baked")
    tab.click("#bm_lora_bake_file")
    message = wait_until(lambda: tab.text("bm_lora_message"), 300, "the LoRA message")
    out = app["models"] / "browser_baked.safetensors"
    assert "browser_baked" in message and out.is_file(), message

    expected = before[KEY].double() + 0.7 * (2.0 / 4) * (up.double() @ down.double())
    with open_checkpoint(out) as baked:
        got = baked.get(KEY)
        assert got.dtype == before[KEY].dtype
        # computed in fp32 and rounded once to fp16: within one fp16 unit in the last place
        assert ((got.double() - expected).abs() <= expected.abs() * 2.0 ** -10 + 2.0 ** -24).all()
        assert not torch.equal(got, before[KEY])
        assert all(torch.equal(baked.get(k), v) for k, v in before.items() if k != KEY)
