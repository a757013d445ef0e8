"""The dice panel's two helpers from the seed: "Load from ID" (a logged merge's alpha weights as the upper limit for
X / the mid point of D) and "save E-list" (each key's ratios of a random merge as a CSV; loaded back, its
Elemental rows become Elemental rules that merge those keys exactly so again, no seed needed).

The seed's "Load from ID" put 26 x 0.5 into the limit for a merge made without block weights, whatever its alpha
was; here such a merge gives its own alpha as the single limit. Its E-list had no way back and crashed at HEAD.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from ..core.errors import MergeError
from ..core.weights import has_random
from ..io.elist import ELIST_FOLDER, elemental_from_elist, elist_rows, read_elist, write_elist

#: the E-list switch's key among the dice widgets (random_panel.DICE_KEYS)
SAVE_ELIST = "rand_save_elist"


def upper_from_id(h, merge_id: Any) -> tuple[str, str]:
    """(the upper-limit text, a message): merge `merge_id`'s alpha block weights (presets resolved), or its alpha
    when it was made without block weights."""
    number, values = h.settings_from_id(merge_id)
    text = values["weights_alpha"].strip() if values["use_mbw"] else ""
    if text:
        text = h.service.presets.resolve(text)
        if has_random(text):
            raise MergeError(f"Merge {number}'s alpha weights hold random tokens (R, U, X): {text[:80]}; the upper "
                             f"limit needs numbers.")
        return text, f"Upper limit: the alpha block weights of merge {number}."
    return repr(float(values["alpha"])), f"Upper limit: merge {number} used no block weights; its alpha " \
                                         f"{float(values['alpha']):g} for every block."


def save_elist(h, plan, history_id: int | None) -> Path:
    """Write `plan`'s E-list beside the merge history, named by the merge ID (or recipe hash) and weight seed."""
    stem = f"{history_id}" if history_id is not None else plan.recipe.fingerprint()[:10]
    folder = h.host.history_path().parent / ELIST_FOLDER
    return write_elist(folder / f"{stem}-seed{plan.recipe.seed}.csv", elist_rows(plan))


def load_elist(path: Any) -> tuple[str, str]:
    """(the Elemental text, a message) from an uploaded E-list file."""
    if not path:
        raise MergeError("Choose an E-list CSV file to load.")
    path = Path(getattr(path, "name", path))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MergeError(f"Cannot read {path.name}: {e.strerror or e}.") from None
    rows = read_elist(data, path.name)
    text = elemental_from_elist(rows, path.name)
    return text, f"Loaded {text.count(chr(10)) + 1} Elemental rules from {path.name} into the Elemental field."


def build(d: dict[str, Any]) -> None:
    """The helpers' widgets, inside the dice accordion (into `d`, the dice panel's widgets)."""
    with gr.Row(equal_height=True):
        d["rand_id"] = gr.Number(-1, label="merged model ID (-1 = last)", precision=0, elem_id="bm_rand_id",
                                 min_width=120)
        d["rand_load_id"] = gr.Button("Upper limit from merge ID", size="sm", elem_id="bm_rand_load_id")
        d[SAVE_ELIST] = gr.Checkbox(False, label="save E-list", elem_id="bm_rand_save_elist")
    d["rand_elist"] = gr.File(label="Load E-list into Elemental (drop a CSV)", file_types=[".csv"],
                              elem_id="bm_rand_elist")


def wire(h, d: dict[str, Any], elemental, message, guard, skip) -> None:
    d["rand_load_id"].click(guard(lambda number: upper_from_id(h, number), lambda msg: (skip(), msg)),
                            d["rand_id"], [d["rand_upper"], message], queue=False)
    d["rand_elist"].upload(guard(load_elist, lambda msg: (skip(), msg)), d["rand_elist"], [elemental, message],
                           queue=False)
