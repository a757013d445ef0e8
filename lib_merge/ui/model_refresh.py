"""A "Refresh" button for a sub-tab's model dropdowns: the host's models read again (a merge just saved appears),
the chosen names kept."""

from __future__ import annotations

import gradio as gr

from ..hosts.base import model_choices


def refresh_models(host):
    """The handler: the dropdowns' chosen names in, their updates (choices read again, names kept) out."""
    def refresh(*names):
        choices = model_choices(host, names)
        return [gr.update(choices=choices, value=n or None) for n in names]

    return refresh


def wire_refresh(host, button: gr.Button, dropdowns: list) -> None:
    button.click(refresh_models(host), dropdowns, dropdowns, queue=False)
