"""The "LoRA" sub-tab: the LoRA list (type and family filters, read once per file version), the spec field
(`name:ratio[:block weights]`, one per line), "Get from prompt", and the five actions: bake into the loaded model,
bake into a checkpoint file, merge LoRAs into one, extract a LoRA from two checkpoints, extract from two LoRAs.

`LoraHandlers` holds the logic (tested without a browser); `build_lora_tab` lays out and wires the widgets. In the
standalone app no model is loaded, so "Bake into the loaded model" is disabled with the host's reason, as the Merge
tab does for its live actions.
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from ..core.errors import MergeError
from ..hosts.base import model_choices
from ..lora.combine import METADATA_MODES
from ..lora.prompt import specs_from_prompt
from ..lora.save import SAVE_DTYPES
from ..service.lora_service import FAMILY_FILTERS, KIND_FILTERS, LoraTools, is_lora_record
from .model_refresh import refresh_models, wire_refresh

log = logging.getLogger("block_merger")
#: the page reads the txt2img prompt itself (the WebUI has it in this textarea; the standalone app has none)
PROMPT_JS = ("(prompt, ...rest) => { const box = document.querySelector('#txt2img_prompt textarea'); "
             "return [box ? box.value : prompt, ...rest]; }")
CHECKPOINT_DTYPES = ("keep", "fp16", "bf16", "fp32")
DIFF_HELP = ("The first two LoRAs of the list: B, then C (same layers and ranks). Each factor row of the output is "
             "lerp(B, C, alpha) times how alike (beta 0) or unlike (beta 1) the two rows are, sharpened by gamma; "
             "the defaults keep C's features unlike B's, written with B's alphas. The likeness is the cosine of "
             "factor rows, which depends on the basis each LoRA's training happened to pick (factors are defined "
             "only up to an r×r mixing), so it is a heuristic, not a comparison of the LoRAs' changes.")


def name_of(label: str) -> str:
    """The LoRA name of a list label (`name [LoRA, 32, SD1]`)."""
    return label.rsplit(" [", 1)[0] if label.endswith("]") else label


class LoraHandlers:
    """The LoRA sub-tab's callbacks over one MergeService (through LoraTools); each returns what the widgets show."""

    def __init__(self, service, tools: LoraTools | None = None):
        self.service = service
        self.host = service.host
        self.tools = tools or LoraTools(service)

    def choices(self, kind: str = "All", family: str = "All") -> list[str]:
        return [entry.label() for entry in self.tools.catalog(kind or "All", family or "All")]

    @staticmethod
    def add(selected: list[str], text: str, ratio: float) -> str:
        """The field with a `name:ratio` line added for each selected LoRA not in it yet."""
        lines = [line for line in (text or "").splitlines() if line.strip()]
        present = {line.split(":")[0].strip() for line in lines}
        lines += [f"{name_of(label)}:{float(ratio):g}" for label in selected or () if name_of(label) not in present]
        return "\n".join(lines)

    @staticmethod
    def from_prompt(prompt: str) -> tuple[str, str]:
        specs = specs_from_prompt(prompt)
        if not specs:
            return gr.update(), "The txt2img prompt has no <lora:...> or <lyco:...> tag."
        return "\n".join(specs), f"Took {len(specs)} LoRA(s) from the txt2img prompt."

    def bake_loaded(self, text: str, name: str) -> str:
        with self.host.lock(), self.host.job("Block Merger: LoRA bake"):
            return self.tools.bake_loaded(text, name).message()

    def bake_file(self, model: str, text: str, name: str, dtype: str, overwrite: bool) -> str:
        with self.host.job("Block Merger: LoRA bake to file"):
            result = self.tools.bake_to_file(model, text, name, dtype, bool(overwrite))
        uses = "; ".join(use.summary() for use in result.plan.uses)
        return f"Saved {result.path} ({len(result.plan.changes)} tensors changed{_logged(result.history_id)}). {uses}."

    def merge(self, text: str, rank: str, name: str, dtype: str, metadata: str, overwrite: bool) -> str:
        with self.host.job("Block Merger: LoRA merge"):
            return _saved_lora(self.tools.merge(text, rank, name, dtype, metadata, bool(overwrite)))

    def extract(self, model_a: str, model_b: str, name: str, alpha: float, beta: float, rank: str, conv_rank: str,
                dtype: str, overwrite: bool) -> str:
        with self.host.job("Block Merger: LoRA extract"):
            result = self.tools.extract(model_a, model_b, name, alpha, beta, rank, conv_rank, dtype, bool(overwrite))
        te = "with the text encoder" if result.text_encoder else "U-Net only (the text encoders did not change)"
        return f"Saved {result.path} ({result.modules} modules, {te}{_logged(result.history_id)})."

    def difference(self, text: str, name: str, alpha: float, beta: float, gamma: float, dtype: str, metadata: str,
                   overwrite: bool) -> str:
        with self.host.job("Block Merger: LoRA diff"):
            return _saved_lora(self.tools.difference(text, name, alpha, beta, gamma, dtype, metadata,
                                                     bool(overwrite)))

    def inspect(self, selected: list[str]) -> str:
        if not selected:
            raise MergeError("Select a LoRA in the list to inspect.")
        return "\n\n".join(self.tools.inspect(name_of(label)) for label in selected)

    def from_history(self, merge_id: Any) -> tuple[str, str]:
        """The spec field of a logged LoRA bake or merge (an extract names its models in the message)."""
        try:
            number = int(merge_id)
        except (TypeError, ValueError):
            raise MergeError(f"History ID must be a whole number (-1 for the last one), not {merge_id!r:.60}.") \
                from None
        row = self.service.history().get(number)
        recipe = row["recipe"]
        if not is_lora_record(recipe):
            raise MergeError(f"Merge ID {row['id']} is a merge, not a LoRA operation; load it in the Merge tab.")
        if recipe["operation"] == "lora extract":
            return gr.update(), (f"Merge ID {row['id']} extracted a LoRA from {recipe['model_a']} (alpha "
                                 f"{recipe['alpha']:g}) and {recipe['model_b']} (beta {recipe['beta']:g}), rank "
                                 f"{recipe['rank']}.")
        lines = [f"{spec['path']}:{spec['ratio']:g}" + (f":{spec['blocks']}" if spec.get("blocks") else "")
                 for spec in recipe.get("loras", [])]
        return "\n".join(lines), f"Loaded the LoRAs of {recipe['operation']} {row['id']}."


def _logged(history_id: int | None) -> str:
    return f", merge ID {history_id}" if history_id is not None else ""


def _saved_lora(result) -> str:
    """The message for a written LoRA (a merge, or an extract from two LoRAs)."""
    ranks = "-".join(str(r) for r in sorted({result.ranks[0], result.ranks[-1]}))
    return (f"Saved {result.path} ({result.modules} modules, rank {ranks}, for {result.family.upper()}"
            f"{_logged(result.history_id)}).")


def build_lora_tab(service, guard) -> dict[str, Any]:
    """Lay out and wire the LoRA sub-tab (inside a `gr.Tab`). `guard(fn, failure)` turns exceptions into messages,
    as the Merge tab's handlers do. Returns the widgets by name (tests and the browser test use the elem_ids)."""
    h = LoraHandlers(service)
    host = service.host
    live_off = host.live_model_unavailable
    w: dict[str, Any] = {}
    try:
        labels = h.choices()
    except Exception as e:  # noqa: BLE001 - an unreadable folder must not break the tab
        labels = []
        log.warning("Block Merger: cannot list the LoRAs: %s", e)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            with gr.Row():
                w["kind"] = gr.Radio(list(KIND_FILTERS), value="All", label="Type", elem_id="bm_lora_kind")
                w["family"] = gr.Radio(list(FAMILY_FILTERS), value="All", label="Model family",
                                       elem_id="bm_lora_family")
            w["list"] = gr.Dropdown(labels, value=[], multiselect=True, label=f"LoRAs in {host.lora_folder()}",
                                    elem_id="bm_lora_list")
            with gr.Row():
                w["ratio"] = gr.Number(value=1.0, label="Ratio for added LoRAs", elem_id="bm_lora_default_ratio")
                w["add"] = gr.Button("Add to the list below", elem_id="bm_lora_add", size="sm")
                w["refresh"] = gr.Button("Refresh", elem_id="bm_lora_refresh", size="sm")
                w["inspect"] = gr.Button("Inspect", elem_id="bm_lora_inspect", size="sm")
            w["specs"] = gr.Textbox(label="LoRAs: name:ratio[:block weights], one per line", lines=4,
                                    placeholder="style:0.8\ndetail:0.5:OUTD", elem_id="bm_lora_specs")
            with gr.Row():
                w["from_prompt"] = gr.Button("Get from prompt", elem_id="bm_lora_from_prompt", size="sm")
                w["history_id"] = gr.Number(value=-1, precision=0, label="History ID", elem_id="bm_lora_history_id",
                                            min_width=90)
                w["load"] = gr.Button("Load LoRAs from history", elem_id="bm_lora_load", size="sm")
            w["prompt"] = gr.Textbox(visible=False, elem_id="bm_lora_prompt")
        with gr.Column(scale=2, min_width=320):
            with gr.Tab("Into the loaded model"):
                w["live_name"] = gr.Textbox(label="Model name (empty: base + LoRAs)", elem_id="bm_lora_live_name")
                w["bake_loaded"] = gr.Button("Bake into the loaded model", variant="primary",
                                             elem_id="bm_lora_bake_loaded", interactive=not live_off)
                if live_off:
                    gr.Markdown(f"Unavailable here. {live_off}", elem_id="bm_lora_live_note")
            with gr.Tab("Into a checkpoint file"):
                w["model"] = gr.Dropdown(model_choices(host), label="Checkpoint", elem_id="bm_lora_model")
                w["file_dtype"] = gr.Radio(list(CHECKPOINT_DTYPES), value="keep", label="Save dtype",
                                           elem_id="bm_lora_file_dtype")
                w["bake_file"] = gr.Button("Bake into a checkpoint file", elem_id="bm_lora_bake_file")
            with gr.Tab("Merge LoRAs"):
                w["rank"] = gr.Textbox(value="concat", label="Rank: concat (exact), N, or auto",
                                       elem_id="bm_lora_rank")
                w["metadata"] = gr.Radio(list(METADATA_MODES), value="new", label="Metadata",
                                         elem_id="bm_lora_metadata")
                w["merge"] = gr.Button("Merge LoRAs into one", elem_id="bm_lora_merge")
            with gr.Tab("Extract from two checkpoints"):
                with gr.Row():
                    w["model_a"] = gr.Dropdown(model_choices(host), label="Model A (tuned)", elem_id="bm_lora_a")
                    w["model_b"] = gr.Dropdown(model_choices(host), label="Model B (base)", elem_id="bm_lora_b")
                with gr.Row():
                    w["alpha"] = gr.Number(value=1.0, label="alpha (A)", elem_id="bm_lora_alpha")
                    w["beta"] = gr.Number(value=1.0, label="beta (B)", elem_id="bm_lora_beta")
                    w["extract_rank"] = gr.Textbox(value="128", label="Rank: N or auto", elem_id="bm_lora_xrank")
                    w["conv_rank"] = gr.Textbox(value="", label="3x3 conv rank (empty: none)",
                                                elem_id="bm_lora_conv_rank")
                w["extract"] = gr.Button("Extract a LoRA", elem_id="bm_lora_extract")
            with gr.Tab("Extract from two LoRAs"):
                with gr.Row():
                    w["diff_alpha"] = gr.Slider(0, 1, value=1, step=0.001, label="alpha (0: B, 1: C)",
                                                elem_id="bm_lora_diff_alpha")
                    w["diff_beta"] = gr.Slider(0, 1, value=1, step=0.001, label="beta (0: similar, 1: dissimilar)",
                                               elem_id="bm_lora_diff_beta")
                    w["diff_gamma"] = gr.Slider(0, 20, value=1, step=0.1, label="gamma (selectivity)",
                                                elem_id="bm_lora_diff_gamma")
                w["diff_metadata"] = gr.Radio(list(METADATA_MODES), value="new", label="Metadata",
                                              elem_id="bm_lora_diff_metadata")
                gr.Markdown(DIFF_HELP, elem_id="bm_lora_diff_help")
                w["diff"] = gr.Button("Extract from two LoRAs", elem_id="bm_lora_diff")
            with gr.Row():
                w["name"] = gr.Textbox(label="Output file name", elem_id="bm_lora_name")
                w["lora_dtype"] = gr.Radio(list(SAVE_DTYPES), value="fp16", label="LoRA save dtype",
                                           elem_id="bm_lora_dtype")
                w["overwrite"] = gr.Checkbox(value=False, label="overwrite", elem_id="bm_lora_overwrite")
            w["message"] = gr.Textbox(label="Message", lines=3, interactive=False, elem_id="bm_lora_message")
            w["info"] = gr.Textbox(label="LoRA information", lines=6, interactive=False, elem_id="bm_lora_info")
    _wire(h, w, guard)
    return w


def _wire(h: LoraHandlers, w: dict[str, Any], guard) -> None:
    message = w["message"]

    def refresh(kind, family, selected):
        labels = h.choices(kind, family)
        return gr.update(choices=labels, value=[s for s in selected or () if s in labels])

    for event in (w["kind"].change, w["family"].change, w["refresh"].click):
        event(guard(refresh, lambda msg: gr.update()), [w["kind"], w["family"], w["list"]], w["list"])
    w["add"].click(guard(h.add, lambda msg: gr.update()), [w["list"], w["specs"], w["ratio"]], w["specs"],
                   queue=False)
    w["inspect"].click(guard(h.inspect, lambda msg: msg), w["list"], w["info"])
    from .tab import js_event

    w["from_prompt"].click(guard(h.from_prompt, lambda msg: (gr.update(), msg)), w["prompt"], [w["specs"], message],
                           **js_event(PROMPT_JS))
    w["load"].click(guard(h.from_history, lambda msg: (gr.update(), msg)), w["history_id"], [w["specs"], message],
                    queue=False)
    w["bake_loaded"].click(guard(h.bake_loaded, lambda msg: msg), [w["specs"], w["live_name"]], message)
    # the checkpoint lists read again by Refresh and after a bake (its file is what one extracts from next)
    checkpoints = [w["model"], w["model_a"], w["model_b"]]
    wire_refresh(h.host, w["refresh"], checkpoints)
    w["bake_file"].click(guard(h.bake_file, lambda msg: msg),
                         [w["model"], w["specs"], w["name"], w["file_dtype"], w["overwrite"]], message) \
        .then(refresh_models(h.host), checkpoints, checkpoints, queue=False)
    w["merge"].click(guard(h.merge, lambda msg: msg),
                     [w["specs"], w["rank"], w["name"], w["lora_dtype"], w["metadata"], w["overwrite"]], message)
    w["extract"].click(guard(h.extract, lambda msg: msg),
                       [w["model_a"], w["model_b"], w["name"], w["alpha"], w["beta"], w["extract_rank"],
                        w["conv_rank"], w["lora_dtype"], w["overwrite"]], message)
    w["diff"].click(guard(h.difference, lambda msg: msg),
                    [w["specs"], w["name"], w["diff_alpha"], w["diff_beta"], w["diff_gamma"], w["lora_dtype"],
                     w["diff_metadata"], w["overwrite"]], message)


