"""The Analysis sub-tab: how similar two or three models are, per block (a table and a bar chart) and per key.

The comparison itself is `analysis.compare_models` (streamed: one key of each model in memory at a time, like a
merge). Here it runs as a host job (the WebUI's progress bar, its Stop), and its result is kept in the page's
session (gr.State) so that switching the chart's measure redraws without reading the models again, and so that
"Save CSV" writes exactly what is shown (next to the merge history, in `analysis/`, never over an existing file).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import gradio as gr

from ..analysis.similarity import Comparison, compare_models, summary_lines
from ..analysis.table_csv import save_csv
from ..core.errors import MergeError
from ..hosts.base import model_choices
from .bar_chart import bars_svg, value_range
from .model_refresh import wire_refresh

#: the chart's measures: (label, the GroupResult field, y-axis floor, ceiling)
MEASURES = {
    "relative L2 distance": ("rel_l2", 0.0, None),
    "mean cosine similarity %": ("mean_cosine", None, 100.0),
    "min cosine similarity %": ("min_cosine", None, 100.0),
    "attn2 cosine similarity %": ("attn2_cosine", None, 100.0),
    "ASimilarity %": ("asimilarity", None, 100.0),
}
DEFAULT_MEASURE = "relative L2 distance"
TITLE = "Block Merger: analysis"


def _cell(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def block_table(result: Comparison) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): one row per group (text encoder, blocks, VAE) with each pair's mean/min cosine, relative
    L2 distance, attn2 cosine and, when the probe ran, ASimilarity."""
    asim = result.attention is not None
    names = ("cos mean %", "cos min %", "rel L2", "attn2 cos %") + (("ASim %",) if asim else ())
    headers = ["block", "keys"] + [f"{p} {m}" for p in result.pairs for m in names]
    rows = [[g.group, str(g.keys)] + [c for p in result.pairs for c in (
        _cell(g.mean_cosine[p], 4), _cell(g.min_cosine[p], 4), _cell(g.rel_l2[p], 6), _cell(g.attn2_cosine[p], 4),
        *((_cell(g.asimilarity[p], 4),) if asim else ()))] for g in result.groups]
    return headers, rows


def key_table(result: Comparison) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): one row per compared key with each pair's cosine and relative L2 distance."""
    headers = ["block", "key"] + [f"{p} {m}" for p in result.pairs for m in ("cos %", "rel L2")]
    rows = [[r.group, r.key] + [c for p in result.pairs for c in (
        _cell(r.pairs[p].cosine, 4), _cell(r.pairs[p].rel_l2, 6))] for r in result.keys]
    return headers, rows


def block_chart(result: Comparison, measure: str = DEFAULT_MEASURE) -> str:
    """The bar chart of one measure: a group of bars per block, one bar per pair of models."""
    if measure not in MEASURES:
        raise MergeError(f"Unknown measure {measure!r}; choose one of: {', '.join(MEASURES)}.")
    field, floor, ceiling = MEASURES[measure]
    labels = [g.group for g in result.groups]
    series = [(pair, [getattr(g, field)[pair] for g in result.groups]) for pair in result.pairs]
    y_range = value_range([v for _, values in series for v in values], floor, ceiling)
    return bars_svg(labels, series, measure, y_range)


def analysis_outputs(result: Comparison, measure: str = DEFAULT_MEASURE) -> tuple[str, str, dict, dict]:
    """What the sub-tab shows of a result: the summary, the chart, and the two tables as gr.Dataframe values
    ({"headers", "data"}: gradio 3.41's update() takes no headers)."""
    tables = []
    for headers, rows in (block_table(result), key_table(result)):
        tables.append({"headers": headers, "data": rows or [["" for _ in headers]]})
    return "\n".join(summary_lines(result)), block_chart(result, measure), tables[0], tables[1]


def run_analysis(host, names: list[str], attention: bool = False) -> Comparison:
    """Compare the named models (two or three; blanks left out) as a host job: progress shown, Stop honoured;
    with `attention`, also the ASimilarity probe."""
    chosen = [n for n in names if n]
    if len(chosen) < 2:
        raise MergeError("Choose at least models A and B to compare (C is optional).")
    if len(set(chosen)) < len(chosen):
        raise MergeError("Choose different models: a model compared with itself is 100% similar.")
    paths = [host.resolve_model(n) for n in chosen]
    with host.lock(), host.job(TITLE):  # one job at a time: the WebUI's progress bar and Stop are shared
        return compare_models(paths, progress=lambda done, total: host.progress(done, total, "Analysis"),
                              cancel=host.interrupted, attention=attention)


def csv_path(host, result: Comparison) -> Path:
    """Where "Save CSV" writes: `analysis/<A>-<B>[-<C>].csv` beside the merge history, with -2, -3, ... added
    rather than replacing an earlier table."""
    folder = Path(host.history_path()).parent / "analysis"
    stem = "-".join(re.sub(r"[^\w.+-]+", "_", p.stem) for p in result.paths)[:180]
    path, n = folder / f"{stem}.csv", 2
    while path.exists():
        path, n = folder / f"{stem}-{n}.csv", n + 1
    return path


def save_table(host, result: Comparison | None) -> Path:
    """Save the shown result as CSV (see `analysis.table_csv`); the path written."""
    if result is None:
        raise MergeError("Run an analysis first: there is no table to save.")
    path = csv_path(host, result)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_csv(result, path)


def build_analysis_tab(host, error_message) -> None:
    """The sub-tab's widgets and events over `host`; `error_message(exception)` is how failures are shown."""
    models = model_choices(host)
    with gr.Row(equal_height=False):
        pickers = [gr.Dropdown(models, value=None, label=label, elem_id=f"bm_an_model_{key}", scale=4, min_width=160)
                   for key, label in (("a", "Model A"), ("b", "Model B"), ("c", "Model C (optional)"))]
        refresh = gr.Button("Refresh", elem_id="bm_an_refresh", size="sm", scale=1, min_width=70)
    with gr.Row(equal_height=True):
        run = gr.Button("Run analysis", variant="primary", elem_id="bm_an_run", scale=1, min_width=120)
        stop = gr.Button("Stop", variant="stop", elem_id="bm_an_stop", scale=1, min_width=80)
        measure = gr.Radio(list(MEASURES), value=DEFAULT_MEASURE, label="Chart", elem_id="bm_an_measure", scale=4)
    with gr.Row(equal_height=False):
        attention = gr.Checkbox(True, label="ASimilarity (probe each U-Net transformer block's self-attention)",
                                elem_id="bm_an_asim", scale=4)
        save = gr.Button("Save CSV", elem_id="bm_an_save", size="sm", scale=1, min_width=90)
    message = gr.Textbox(label="Result", lines=3, interactive=False, elem_id="bm_an_message")
    chart = gr.HTML("", elem_id="bm_an_chart")
    blocks = gr.Dataframe(headers=["block"], value=[[""]], interactive=False, wrap=True, label="Per block",
                          elem_id="bm_an_blocks")
    with gr.Accordion("Per key", open=False, elem_id="bm_an_keys_acc"):
        keys = gr.Dataframe(headers=["key"], value=[[""]], interactive=False, wrap=True, label="Per key",
                            elem_id="bm_an_keys")
    saved = gr.File(label="Saved table", interactive=False, visible=False, elem_id="bm_an_file")
    state = gr.State(None)

    def analyse(a, b, c, chosen_measure, probe):
        result = run_analysis(host, [a, b, c], attention=bool(probe))
        return (*analysis_outputs(result, chosen_measure), result)

    def analyse_guarded(*args):
        try:
            return analyse(*args)
        except Exception as e:  # noqa: BLE001 - every failure becomes the message; the old result stays
            return error_message(e), gr.update(), gr.update(), gr.update(), gr.update()

    def redraw(result: Any, chosen_measure):
        return gr.update() if result is None else block_chart(result, chosen_measure)

    def save_guarded(result: Any):
        try:
            path = save_table(host, result)
        except Exception as e:  # noqa: BLE001 - every failure becomes the message
            return error_message(e), gr.update()
        return (f"Saved the table ({len(result.groups)} blocks, {len(result.keys)} keys) to {path}",
                gr.update(value=str(path), visible=True))

    run.click(analyse_guarded, [*pickers, measure, attention], [message, chart, blocks, keys, state])
    save.click(save_guarded, state, [message, saved])
    def stop_analysis():
        host.request_stop()
        return "Stopping: the analysis ends at its next tensor."

    stop.click(stop_analysis, None, message, queue=False)
    measure.change(redraw, [state, measure], chart, queue=False)
    wire_refresh(host, refresh, pickers)
