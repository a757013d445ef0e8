"""Block-weight helpers under the Merge tab's block weights (the seed's Helper and Weights Presets tabs):

- Helper: Set / Add / Mul a value on the BASE, IN, MID and OUT groups of the weights;
- slider limits: the user's own minimum and maximum for the 26 sliders (the text may hold any value);
- the user's presets file (`mbwpresets_user.tsv`, next to the shipped one, which is never written): edit, save,
  reload; its presets join the preset dropdown at once.

The weights text stays the truth (as everywhere in the tab): the helper edits the text and moves the sliders to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import gradio as gr

from ..core.arch import BLOCKS_26
from ..core.errors import MergeError
from ..core.weights import Presets
from . import values as uv

GROUPS = {"BASE": ("BASE",), "IN": tuple(f"IN{i:02d}" for i in range(12)), "MID": ("M00",),
          "OUT": tuple(f"OUT{i:02d}" for i in range(12))}
OPERATIONS = ("Set", "Add", "Mul")


def apply_helper(text: str, block_type: str, current: Sequence[float], presets: Presets | None, operation: str,
                 value, groups: Sequence[str]) -> str:
    """The weights text after `operation` (Set/Add/Mul) with `value` on the blocks of `groups`.

    The text's own values are used when it is a complete list (or a preset name), else the sliders'. R/U entries
    are replaced by Set and kept by Add and Mul; blocks outside the groups keep their exact text."""
    if operation not in OPERATIONS:
        raise MergeError(f"Unknown helper operation {operation!r} (Set, Add or Mul).")
    number = uv.number_or_none(str(value)) if value is not None else None
    if number is None:
        raise MergeError(f"The helper's value must be a number, not {value!r:.60}.")
    unknown = [g for g in groups or () if g not in GROUPS]
    if not groups or unknown:
        raise MergeError("Tick at least one group (BASE, IN, MID, OUT) for the helper to change."
                         if not unknown else f"Unknown group(s): {', '.join(unknown)}.")
    resolved = (text or "").strip()
    if presets is not None and resolved and "," not in resolved:
        resolved = presets.get(resolved) or resolved
    positions = uv.visible_positions(block_type)
    tokens = uv.weight_tokens(resolved)
    if len(tokens) != len(positions) or any(uv.number_or_none(t) is None and t not in ("R", "U") for t in tokens):
        tokens = [uv.fmt(current[p]) for p in positions]
    chosen = {label for g in groups for label in GROUPS[g]}
    out = []
    for position, token in zip(positions, tokens, strict=True):
        old = uv.number_or_none(token)
        if BLOCKS_26[position] not in chosen or (old is None and operation != "Set"):
            out.append(token)
            continue
        new = number if operation == "Set" else old + number if operation == "Add" else old * number
        out.append(uv.fmt(new))
    return ",".join(out)


def slider_limits(low, high) -> tuple[float, float]:
    """The user's slider range, checked."""
    lo, hi = (uv.number_or_none(str(v)) if v is not None else None for v in (low, high))
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        raise MergeError("Slider limits must be two numbers.")
    if lo >= hi:
        raise MergeError(f"The slider minimum ({uv.fmt(lo)}) must be below the maximum ({uv.fmt(hi)}).")
    return lo, hi


def build_weight_tools(h, w, block_sliders: list, preset: gr.Dropdown, error_message) -> None:
    """The helpers' accordions (inside the block-weights accordion) and their events."""
    presets = h.service.presets
    with gr.Accordion("Helper and slider limits", open=False, elem_id="bm_helper_acc"):
        with gr.Row(equal_height=True):
            value = gr.Number(0.5, label="Value", elem_id="bm_helper_value", min_width=100)
            groups = gr.CheckboxGroup(list(GROUPS), value=list(GROUPS), label="Groups", elem_id="bm_helper_groups")
            buttons = {op: gr.Button(op, elem_id=f"bm_helper_{op.lower()}", size="sm", min_width=60)
                       for op in OPERATIONS}
        with gr.Row(equal_height=True):
            low = gr.Number(uv.WEIGHT_RANGE[0], label="Slider minimum", elem_id="bm_slider_min", min_width=100)
            high = gr.Number(uv.WEIGHT_RANGE[1], label="Slider maximum", elem_id="bm_slider_max", min_width=100)
            limits = gr.Button("Apply limits", elem_id="bm_slider_limits", size="sm", min_width=100)
        note = gr.Markdown("", elem_id="bm_helper_note")
    with gr.Accordion("Your presets", open=False, elem_id="bm_user_presets_acc"):
        where = presets.user_path or "(none)"
        editor = gr.Textbox(presets.user_text() if presets.user_path else "", lines=6, max_lines=30,
                            label=f"Your presets file ({where}; NAME<tab>26 values per line, first line a header)",
                            elem_id="bm_user_presets")
        with gr.Row():
            save = gr.Button("Save presets", elem_id="bm_user_presets_save", size="sm")
            reload = gr.Button("Reload presets", elem_id="bm_user_presets_reload", size="sm")
        preset_note = gr.Markdown("", elem_id="bm_user_presets_note")

    def helper(operation):
        def run(text, block_type, amount, chosen, *current):
            try:
                new = apply_helper(text, block_type, current, presets, operation, amount, chosen)
            except Exception as e:  # noqa: BLE001 - the message replaces the note, the weights stay
                return [gr.update(), *([gr.update()] * 26), error_message(e)]
            sliders = uv.text_to_sliders(new, block_type, current, presets) or list(current)
            return [new, *[gr.update(value=v) for v in sliders], f"{operation} {uv.fmt(float(amount))} on "
                    f"{', '.join(chosen)}."]
        return run

    for operation, button in buttons.items():
        button.click(helper(operation), [w["weights_alpha"], w["block_type"], value, groups, *block_sliders],
                     [w["weights_alpha"], *block_sliders, note], queue=False)

    def apply_limits(lo, hi):
        try:
            lo, hi = slider_limits(lo, hi)
        except MergeError as e:
            return [*([gr.update()] * 26), error_message(e)]
        return [*[gr.update(minimum=lo, maximum=hi) for _ in block_sliders],
                f"Sliders now go from {uv.fmt(lo)} to {uv.fmt(hi)}."]

    limits.click(apply_limits, [low, high], [*block_sliders, note], queue=False)

    def saved(text):
        try:
            count = presets.save_user(text)
        except Exception as e:  # noqa: BLE001
            return gr.update(), gr.update(), error_message(e)
        return (gr.update(choices=presets.names()), presets.user_text(),
                f"Saved {count} preset(s) to {presets.user_path}.")

    def reloaded():
        try:
            presets.reload()
        except Exception as e:  # noqa: BLE001
            return gr.update(), gr.update(), error_message(e)
        return (gr.update(choices=presets.names()), presets.user_text(),
                f"Reloaded: {len(presets.names())} presets of 26 values.")

    save.click(saved, editor, [preset, editor, preset_note], queue=False)
    reload.click(reloaded, None, [preset, editor, preset_note], queue=False)
