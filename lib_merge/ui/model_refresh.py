"""A "Refresh" button for a sub-tab's model dropdowns: the host's models read again (a merge just saved appears),
the chosen names kept."""

from __future__ import annotations

import gradio as gr

from ..hosts.base import model_choices


def wire_refresh(host, button: gr.Button, dropdowns: list) -> None:
    def refresh(*names):
        choices = model_choices(host, names)
        return [gr.update(choices=choices, value=n or None) for n in names]

    button.click(refresh, dropdowns, dropdowns, queue=False)
