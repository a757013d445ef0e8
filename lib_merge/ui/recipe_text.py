"""The merge settings as text ("copy config"): the recipe the controls describe, as the JSON the history and the
images' infotext carry, to copy into a note, a message or another WebUI; pasted back, it fills the controls.

(The seed's "copy config" save option copied model A's .yaml next to a saved merge; Block Merger writes the recipe
into the file's metadata instead, and this gives the same settings to the user as text.)
"""

from __future__ import annotations

import json
from typing import Any

import gradio as gr

from ..core.errors import MergeError
from ..core.recipe import json_object
from ..service.lora_service import is_lora_record
from . import values as uv


def recipe_text(h, values: dict[str, Any]) -> str:
    """The controls' recipe as indented JSON (checked the way a merge checks it, so what is copied can merge)."""
    recipe = h.recipe(values).validate(h.service.presets)
    return json.dumps(recipe.to_dict(), indent=1, sort_keys=True)


def values_from_text(text: str) -> dict[str, Any]:
    """Pasted recipe JSON -> the Merge tab's widget values."""
    if not (text or "").strip():
        raise MergeError("Paste a recipe (the JSON 'Copy settings' gives) into the box first.")
    data = json_object(text)
    if is_lora_record(data):
        raise MergeError(f"This is a {data.get('operation')} record, not a merge recipe: load it in the LoRA tab.")
    return uv.values_from_recipe(data)


def build():
    """The widgets (in the right column, under "Load settings"); returns the wiring for `build_tab`."""
    with gr.Accordion("Settings as text (copy config)", open=False, elem_id="bm_recipe_acc"):
        box = gr.Textbox(label="Recipe (JSON)", lines=4, max_lines=20, show_copy_button=True,
                         elem_id="bm_recipe_text")
        with gr.Row():
            copy_btn = gr.Button("Copy settings", size="sm", elem_id="bm_recipe_copy")
            paste_btn = gr.Button("Load pasted settings", size="sm", elem_id="bm_recipe_load")

    def wire(h, w, parts, tab, guard, skip) -> None:
        from .tab import RECIPE_KEYS, settings_outputs, settings_updates

        message = parts["message"]
        outputs = [*settings_outputs(w, parts["block_sliders"], parts["adjust_sliders"]), message]

        def copy(*values):
            return recipe_text(h, dict(zip(RECIPE_KEYS, values, strict=True))), \
                "The settings are in 'Recipe (JSON)': copy them with its copy button."

        def paste(text, *current):
            return [*settings_updates(h, values_from_text(text), current), "Loaded the pasted settings."]

        copy_btn.click(guard(copy, lambda msg: (skip(), msg)), [w[k] for k in RECIPE_KEYS], [box, message],
                       queue=False)
        paste_btn.click(guard(paste, lambda msg: [*([skip()] * (len(outputs) - 1)), msg]),
                        [box, *parts["block_sliders"]], outputs, queue=False)

    return wire
