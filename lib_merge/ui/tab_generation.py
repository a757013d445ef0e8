"""The generation parameters the Merge tab adds to its prompt/steps/size fields so that Generate behaves as the
user expects (issue 15 item 6): batch count, restore faces, tiling, styles and the hires fix. Blank, 0 or "as
txt2img" take the LIVE values of the txt2img tab: the page reads them when a generating button is pressed
(`LIVE_JS`, javascript/block_merger.js's `blockMergerTxt2img`) into a hidden field that `values.request_from_values`
reads; where there is no txt2img tab (the standalone app) the host's saved defaults apply.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from . import values as uv

#: the widgets added to the tab's generation keys, in request_from_values' order after batch_size
GEN_EXTRA_KEYS = ("batch_count", "restore_faces", "tiling", "styles", "enable_hr", "hr_upscaler", "hr_steps",
                  "hr_denoise", "hr_scale", "txt2img_live")
GEN_EXTRA_DEFAULTS: dict[str, Any] = dict(batch_count=0, restore_faces=uv.TXT2IMG, tiling=uv.TXT2IMG, styles=[],
                                          enable_hr=uv.TXT2IMG, hr_upscaler="", hr_steps=0, hr_denoise=0,
                                          hr_scale=0, txt2img_live="")


def live_js(position: int) -> str:
    """Page code run before a generating button's handler: the live txt2img values, as JSON, into argument
    `position` (the hidden txt2img_live field); without the page script the field stays blank."""
    return ("(...args) => { const read = window.blockMergerTxt2img; "
            f"args[{position}] = read ? JSON.stringify(read()) : ''; return args; }}")


def build_generation_extras(host, w: dict[str, Any]) -> None:
    """The extra widgets, inside the generation-parameters accordion; they go into `w` by GEN_EXTRA_KEYS."""
    with gr.Row():
        w["batch_count"] = gr.Number(0, label="Batch count", precision=0, elem_id="bm_batch_count")
        w["restore_faces"] = gr.Radio(list(uv.SWITCH_CHOICES), value=uv.TXT2IMG, label="Restore faces",
                                      elem_id="bm_restore_faces")
        w["tiling"] = gr.Radio(list(uv.SWITCH_CHOICES), value=uv.TXT2IMG, label="Tiling", elem_id="bm_tiling")
    w["styles"] = gr.Dropdown(list(getattr(host, "list_styles", list)()), value=[], multiselect=True,
                              label="Styles (none chosen: txt2img's)", elem_id="bm_styles")
    with gr.Row():
        w["enable_hr"] = gr.Radio(list(uv.SWITCH_CHOICES), value=uv.TXT2IMG, label="Hires. fix",
                                  elem_id="bm_enable_hr")
        w["hr_upscaler"] = gr.Dropdown(["", *getattr(host, "list_upscalers", list)()], value="",
                                       allow_custom_value=True, label="Upscaler", elem_id="bm_hr_upscaler")
    with gr.Row():
        w["hr_steps"] = gr.Number(0, label="Hires steps", precision=0, elem_id="bm_hr_steps")
        w["hr_denoise"] = gr.Number(0, label="Denoising strength", elem_id="bm_hr_denoise")
        w["hr_scale"] = gr.Number(0, label="Upscale by", elem_id="bm_hr_scale")
    w["txt2img_live"] = gr.Textbox("", visible=False, elem_id="bm_txt2img_live")
