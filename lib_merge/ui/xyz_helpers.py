"""The plot's helpers for writing axis values (the seed's block-ID, calc-mode and checkpoint pickers with "↑ Add to
X/Y/Z", and "number of -1" for seed plots).

Ticking names fills "Selected" (blocks joined by spaces: one cell of a pinpoint or include/exclude axis; calc modes
and checkpoints by commas). The seed's "Add to X" replaced the axis text; here it adds the selection as the axis's
next value(s), so cells can be built up one pick at a time. The seed's "number of -1" filled X with `-1,-1,...`,
which in this plot means one drawn seed repeated (a seed axis draws -1 once), so "random seeds" writes that many
distinct drawn seeds instead: a seed plot of different images whose every seed is shown and can be typed again.
"""

from __future__ import annotations

import secrets
from typing import Any

import gradio as gr

from ..core.arch import BLOCKS_26
from ..core.errors import MergeError
from ..core.kernels import CALC_MODES
from ..core.weights import INEX_EXTRAS
from ..hosts.base import model_choices

MAX_SEEDS = 100


def add_to_axis(text: str, selected: str) -> str:
    """`selected` appended to an axis's values as the next comma-separated item(s)."""
    selected = (selected or "").strip().strip(",").strip()
    if not selected:
        raise MergeError("Nothing is selected: tick blocks, calc modes or checkpoints first.")
    text = (text or "").rstrip().rstrip(",").rstrip()
    return f"{text}, {selected}" if text else selected


def random_seeds(count: Any, draw=lambda: secrets.randbelow(2**32)) -> str:
    """`count` distinct drawn seeds, comma separated (the values of a seed axis)."""
    try:
        number = float(count)
    except (TypeError, ValueError):
        number = -1
    if number != int(number) or not 1 <= number <= MAX_SEEDS:
        raise MergeError(f"The number of seeds must be a whole number from 1 to {MAX_SEEDS}; got {count!r:.40}.")
    seeds: list[int] = []
    while len(seeds) < int(number):
        seed = draw()
        if seed not in seeds:
            seeds.append(seed)
    return ", ".join(map(str, seeds))


def build(models: list[str]):
    """The helper widgets (inside the plot accordion); returns the wiring for `build_tab`."""
    with gr.Accordion("Axis value helpers", open=False, elem_id="bm_xyz_helpers"):
        blocks = gr.CheckboxGroup([*BLOCKS_26, *INEX_EXTRAS], label="block IDs", elem_id="bm_xyz_pick_blocks")
        calcs = gr.CheckboxGroup(list(CALC_MODES), label="calc modes", elem_id="bm_xyz_pick_calcs")
        with gr.Row(equal_height=True):
            checkpoints = gr.CheckboxGroup(models, label="checkpoints", elem_id="bm_xyz_pick_models", scale=4)
            refresh = gr.Button("Refresh", size="sm", elem_id="bm_xyz_pick_refresh", scale=1, min_width=70)
        selected = gr.Textbox(label="Selected", max_lines=2, show_copy_button=True, elem_id="bm_xyz_selected")
        with gr.Row():
            adds = [gr.Button(f"↑ Add to {axis.upper()}", size="sm", elem_id=f"bm_xyz_add_{axis}") for axis in "xyz"]
        with gr.Row(equal_height=True):
            count = gr.Number(3, label="random seeds", precision=0, elem_id="bm_xyz_seed_count", min_width=100)
            seeds_btn = gr.Button("↑ Seeds to X", size="sm", elem_id="bm_xyz_seeds")

    def wire(h, w, parts, tab, guard, skip) -> None:
        message = parts["message"]
        for picker, separator in ((blocks, " "), (calcs, ","), (checkpoints, ",")):
            picker.change(lambda names, sep=separator: sep.join(names or ()), picker, selected, queue=False)
        refresh.click(lambda names: gr.update(choices=model_choices(h.host, names or [])), checkpoints,
                      checkpoints, queue=False)
        for button, axis in zip(adds, "xyz", strict=True):
            button.click(guard(lambda text, sel: (add_to_axis(text, sel), ""), lambda msg: (skip(), msg)),
                         [w[f"{axis}_values"], selected], [w[f"{axis}_values"], message], queue=False)
        seeds_btn.click(guard(lambda n: ("seed", random_seeds(n), ""), lambda msg: (skip(), skip(), msg)), count,
                        [w["x_type"], w["x_values"], message], queue=False)

    return wire
