"""The Metadata sub-tab: a model's safetensors metadata (merge recipe, the models it came from, training metadata)
shown readably by `analysis.metadata.describe_metadata`."""

from __future__ import annotations

import gradio as gr

from ..analysis.metadata import describe_metadata, model_metadata
from ..core.errors import MergeError
from ..hosts.base import model_choices
from .model_refresh import wire_refresh


def metadata_text(host, name: str) -> str:
    if not name:
        raise MergeError("Choose a model to show its metadata.")
    path = host.resolve_model(name)
    if path.suffix.lower() != ".safetensors":
        return f"No metadata: {path.name} is not a safetensors file (.ckpt files carry none)."
    return f"{path.name}\n\n{describe_metadata(model_metadata(path))}"


def build_metadata_tab(host, error_message) -> None:
    with gr.Row(equal_height=True):
        model = gr.Dropdown(model_choices(host), value=None, label="Model", elem_id="bm_md_model", scale=4)
        refresh = gr.Button("Refresh", elem_id="bm_md_refresh", size="sm", scale=1, min_width=70)
        show = gr.Button("Show metadata", variant="primary", elem_id="bm_md_show", scale=1, min_width=120)
    text = gr.Textbox(label="Metadata", lines=16, max_lines=60, interactive=False, show_copy_button=True,
                      elem_id="bm_md_text")

    def guarded(name):
        try:
            return metadata_text(host, name)
        except Exception as e:  # noqa: BLE001 - every failure becomes the text shown
            return error_message(e)

    wire_refresh(host, refresh, [model])
    show.click(guarded, model, text)
    model.change(guarded, model, text)
