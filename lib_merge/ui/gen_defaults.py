"""The generation parameters' "set to default", "reset default" and "reset current" (the seed's three buttons).

The seed wrote the values into the WebUI's ui-config.json (read only at the next start, and not written atomically);
here they go into a small JSON file beside the merge history, and every page load puts them into the fields, so
they apply at once, in the standalone app too. "reset default" forgets them (the tab's own defaults again);
"reset current" puts the fields back to the defaults now (the saved ones, else the tab's own).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from ..core.errors import MergeError
from ..io.json_store import read_or_set_aside, write_json

DEFAULTS_FILE = "block_merger_gen_defaults.json"
#: hidden or computed per click: never a saved default
NOT_SAVED = ("txt2img_live",)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


class GenDefaults:
    """The saved defaults of the generation fields `keys`, in `path`; `builtin`: the fields' own initial values."""

    def __init__(self, path: Path, builtin: dict[str, Any]):
        self.path = path
        self.builtin = dict(builtin)

    def _parse(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise ValueError("it does not hold {field: value}")
        bad = [k for k, v in data.items() if k not in self.builtin or not (
            _scalar(v) or isinstance(v, list) and all(isinstance(i, str) for i in v))]
        if bad:
            raise ValueError(f"unknown fields or values: {', '.join(map(str, bad))[:120]}")
        return data

    def saved(self) -> tuple[dict[str, Any], str]:
        """(the saved defaults, {} without a file; a notice if the file was damaged and set aside)."""
        return read_or_set_aside(self.path, self._parse, {}, "generation defaults")

    def current(self) -> tuple[dict[str, Any], str]:
        """(every field's default: saved, else built in; a notice)."""
        saved, notice = self.saved()
        return {**self.builtin, **saved}, notice

    def save(self, values: dict[str, Any]) -> None:
        self._parse(values)
        write_json(self.path, {k: values[k] for k in self.builtin})

    def forget(self) -> bool:
        """Delete the saved defaults; False when there were none."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise MergeError(f"Cannot delete {self.path}: {e.strerror or e}.") from None
        return True


def build(w: dict[str, Any], keys: Sequence[str]):
    """The three buttons (inside the generation accordion, after its fields); returns the wiring for `build_tab`."""
    keys = [k for k in keys if k not in NOT_SAVED]
    builtin = {k: w[k].value for k in keys}  # what the fields start with
    with gr.Row():
        set_btn = gr.Button("set to default", size="sm", elem_id="bm_gen_set_default")
        reset_btn = gr.Button("reset default", size="sm", elem_id="bm_gen_reset_default")
        current_btn = gr.Button("reset current", size="sm", elem_id="bm_gen_reset_current")

    def wire(h, w, parts, tab, guard, skip) -> None:
        store = GenDefaults(h.host.history_path().with_name(DEFAULTS_FILE), builtin)
        fields = [w[k] for k in keys]
        message = parts["message"]

        def set_default(*values):
            store.save(dict(zip(keys, values, strict=True)))
            return f"Saved these generation parameters as the defaults every page load starts with ({store.path})."

        def reset_default():
            gone = store.forget()
            return ("Forgot the saved generation defaults; the next page load starts with the tab's own."
                    if gone else "No generation defaults were saved; the tab's own apply.")

        def fill(text: str, saved_only: bool = False):
            """Put the defaults into the fields (`saved_only`: only the saved ones, as a page opens, so that
            whatever else set the fields' values, such as the WebUI's ui-config.json, stays)."""
            def run():
                values, notice = store.saved() if saved_only else store.current()
                return [*(gr.update(value=values[k]) if k in values else skip() for k in keys),
                        notice or text or skip()]
            return run

        set_btn.click(guard(set_default, lambda msg: msg), fields, message, queue=False)
        reset_btn.click(guard(reset_default, lambda msg: msg), None, message, queue=False)
        failed = lambda msg: [*([skip()] * len(keys)), msg]  # noqa: E731
        current_btn.click(guard(fill("Generation parameters reset to the defaults."), failed), None,
                          [*fields, message], queue=False)
        tab.load(guard(fill("", saved_only=True), failed), None, [*fields, message], queue=False)

    return wire
