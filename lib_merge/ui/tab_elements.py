"""The Elements sub-tab: every key of a model with its block, shape and dtype, filterable; clicking a row adds an
elemental rule for that key to the Merge tab's Elemental field (`Block:key:ratio`).

The listing is `analysis.list_elements` (the file's header only, never its tensors).
"""

from __future__ import annotations

from collections.abc import Sequence

import gradio as gr

from ..analysis.elements import Element, list_elements
from ..core.errors import MergeError
from ..hosts.base import model_choices
from .model_refresh import wire_refresh
from .values import fmt, number_or_none

HEADERS = ("No.", "block", "fine", "key", "shape", "dtype")
#: more rows than this are cut (the page would slow down); a filter narrows the list
ROW_LIMIT = 3000


def element_rows(elements: Sequence[Element], limit: int = ROW_LIMIT) -> list[list[str]]:
    rows = [[str(e.index), e.block, e.fine if e.fine != e.block else "", e.key,
             "x".join(str(d) for d in e.shape) or "scalar", e.dtype] for e in elements[:limit]]
    return rows or [["" for _ in HEADERS]]


def listing_message(name: str, elements: Sequence[Element], contains: str, limit: int = ROW_LIMIT) -> str:
    what = f"{len(elements)} keys" + (f" matching {contains!r}" if contains else "")
    cut = f"; the first {limit} are shown, type a filter to narrow the list" if len(elements) > limit else ""
    return f"{name}: {what}{cut}. Click a row to add an elemental rule for that key to the Merge tab."


def rule_for(row: Sequence[str], ratio) -> str:
    """The elemental rule of a listed key: its block (blank = any block) and the whole key as the element."""
    if len(row) != len(HEADERS) or not row[3]:
        raise MergeError("Click a listed key to make a rule (list the keys of a model first).")
    value = number_or_none(str(ratio)) if ratio is not None else None
    if value is None:
        raise MergeError(f"The rule's ratio must be a number, not {ratio!r:.60}.")
    return f"{row[1]}:{row[3]}:{fmt(value)}"


def add_rule(text: str, rule: str) -> str:
    """The Elemental field with `rule` on a line of its own at the end (an identical rule is not added twice)."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    if rule not in (line.strip() for line in lines):
        lines.append(rule)
    return "\n".join(lines)


def build_elements_tab(host, elemental: gr.Textbox, error_message) -> None:
    """The sub-tab over `host`; rules go into `elemental` (the Merge tab's field)."""
    with gr.Row(equal_height=True):
        model = gr.Dropdown(model_choices(host), value=None, label="Model", elem_id="bm_el_model", scale=3)
        refresh = gr.Button("Refresh", elem_id="bm_el_refresh", size="sm", scale=1, min_width=70)
        contains = gr.Textbox(label="Filter (key text, block or fine label: attn2, OUT11, IN410)", max_lines=1,
                              elem_id="bm_el_filter", scale=3)
        ratio = gr.Number(0.5, label="Ratio of an added rule", elem_id="bm_el_ratio", scale=1, min_width=120)
        show = gr.Button("List keys", variant="primary", elem_id="bm_el_list", scale=1, min_width=100)
    message = gr.Textbox(label="Message", max_lines=3, interactive=False, elem_id="bm_el_message")
    table = gr.Dataframe(headers=list(HEADERS), value=element_rows([]), datatype=["str"] * len(HEADERS),
                         type="array", interactive=False, wrap=True, elem_id="bm_el_table")

    def listing(name, text):
        if not name:
            raise MergeError("Choose a model to list its keys.")
        text = (text or "").strip()
        elements = list_elements(host.resolve_model(name), text)
        return element_rows(elements), listing_message(name, elements, text)

    def guarded_listing(name, text):
        try:
            return listing(name, text)
        except Exception as e:  # noqa: BLE001 - every failure becomes the message
            return gr.update(), error_message(e)

    def clicked(rows, current, chosen_ratio, evt: gr.SelectData):
        try:
            row = rows[evt.index[0]]
            rule = rule_for([str(c) for c in row], chosen_ratio)
        except Exception as e:  # noqa: BLE001
            return gr.update(), error_message(e)
        return add_rule(current, rule), f"Added {rule} to the Merge tab's Elemental field."

    for event in (show.click, contains.submit):
        event(guarded_listing, [model, contains], [table, message])
    wire_refresh(host, refresh, [model])
    table.select(clicked, [table, elemental, ratio], [elemental, message], queue=False)
