"""The merge tab: gradio Blocks that turn widgets into a Recipe and hand it to a MergeService.

Works inside the WebUI (gradio 3.41.2, registered by scripts/block_merger.py) and in the standalone app
(`python -m lib_merge ui`). Only plain components, `gr.update` and the click/change/input/release/blur/submit events are
used, all of which gradio 4 keeps. Logic lives in `values` (widget values <-> recipe) and `chart` (the weight
curve); the handlers here take the host's lock around service calls and turn every error into a message in the tab.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from ..core.arch import BLOCKS_26
from ..core.errors import MergeError
from ..core.kernels import CALC_MODES, MERGE_MODES, WEIGHT_SUM
from ..core.weights import ADJUST_NAMES, INEX_MODES
from ..core.xyz import AXIS_TYPES
from ..hosts.base import model_choices
from ..io.history import History
from ..io.write import OutputExists
from ..service.lora_service import is_lora_record
from ..service.merge_service import MergeService
from . import gen_defaults, methods_panel, recipe_text, xyz_helpers
from . import method_values as mv
from . import values as uv
from .chart import weights_svg
from .plot import run_plot
from .random_panel import Panels
from .tab_analysis import build_analysis_tab
from .tab_elements import build_elements_tab
from .tab_generation import GEN_EXTRA_DEFAULTS, GEN_EXTRA_KEYS, build_generation_extras, live_js
from .tab_housekeeping import build_housekeeping
from .tab_images import build_images_tab
from .tab_lora import build_lora_tab
from .tab_metadata import build_metadata_tab
from .tab_weight_tools import build_weight_tools

log = logging.getLogger("block_merger")

TITLE = "Block Merger"
#: the id of the element holding the tab: the WebUI's tab container (`tab_` + the tab's elem_id, see hosts/a1111's
#: TAB); the standalone app wraps the tab in an element with the same id, so style.css and javascript/ serve both
ROOT_ID = "tab_block_merger"
#: what the page runs before "Merge to file" replaces a file: with its inputs (the file, the answer, the widgets),
#: it puts the user's answer in the second place (javascript/block_merger.js asks; without that script the overwrite
#: goes ahead, as the ticked "overwrite" option says)
CONFIRM_OVERWRITE_JS = ("(...args) => { const ask = window.blockMergerConfirmOverwrite; "
                        "args[1] = ask ? ask(args[0]) : true; return args; }")
#: the widgets a recipe is made of, in the order handlers receive them
RECIPE_KEYS = ("model_a", "model_b", "model_c", "mode", "calc", "alpha", "beta", "use_mbw", "weights_alpha",
               "weights_beta", "block_type", "elemental", "adjust", "inex", "inex_blocks", "inex_elements", "gamma",
               "seed", *mv.METHOD_KEYS)
SAVE_KEYS = ("save_flags", "save_dtype", "bake_vae", "custom_name")
GEN_KEYS = ("prompt", "negative_prompt", "steps", "sampler", "cfg_scale", "width", "height", "gen_seed",
            "batch_size") + GEN_EXTRA_KEYS
PLOT_KEYS = ("x_type", "x_values", "y_type", "y_values", "z_type", "z_values")
ACTION_KEYS = RECIPE_KEYS + SAVE_KEYS + GEN_KEYS + PLOT_KEYS
HISTORY_LIMIT = 50
XYZ_HELP = (
    "Values: numbers or names separated by commas (`0.2, 0.5, 0.8`); `mbw alpha`/`adjust`/`prompt`: one per line; "
    "`elemental`: texts separated by blank lines; `pinpoint blocks`: cells of blocks such as `IN01 OUT02, "
    "IN03-IN05, NOT BASE`, with ratios from an `alpha` axis; `seed` -1 draws one seed. Each distinct merge is made "
    "once; cells that change only the seed or prompt reuse it. Stop keeps the finished cells."
)


def error_message(e: BaseException) -> str:
    """What the tab shows for a failure: the message of a MergeError, a one-line summary of anything else."""
    if isinstance(e, MergeError):
        return f"Error: {e}"
    log.exception("Block Merger: unexpected error")
    return f"Unexpected error ({type(e).__name__}: {e}). Details are in the console."


@dataclass
class ActionResult:
    message: str
    images: list | None = None
    infotext: str | None = None


class Handlers:
    """The tab's callbacks over one MergeService, testable without gradio's event machinery.

    Action methods take the widget values by name (ACTION_KEYS) and return an ActionResult; service calls run inside
    the host's lock and job. `stop` takes no lock (it must work while a merge holds it).
    """

    def __init__(self, service: MergeService):
        self.service = service
        self.host = service.host

    # -- recipe and options from widget values ------------------------------------------------------------------

    def recipe(self, values: dict[str, Any]):
        return uv.recipe_from_values(**{k: values.get(k) for k in RECIPE_KEYS if k in values},
                                  presets=self.service.presets)

    def _save_args(self, values: dict[str, Any]):
        options, flags = uv.save_options_from_values(values.get("save_flags") or (), values.get("save_dtype") or "keep",
                                                  values.get("bake_vae"))
        return options, flags, (values.get("custom_name") or "").strip()

    def _save(self, save: Callable[[], Any]):
        """Run a save; a taken file name is explained with the tab's own controls."""
        try:
            return save()
        except OutputExists as e:
            raise MergeError(f"{e.path.name} already exists in {e.path.parent}; type another name in Options -> "
                             f"Custom name, or tick \"overwrite\" in Options -> Save settings to replace it.") from e

    def _saved(self, result) -> str:
        logged = f", merge ID {result.history_id}" if result.history_id is not None else ""
        warnings = "".join(f"\nWarning: {w}" for w in result.warnings)
        return f"Saved {result.path} ({result.plan.arch.describe()}{logged}).{warnings}"

    # -- actions ------------------------------------------------------------------------------------------------

    def _merge(self, values: dict[str, Any]) -> list[str]:
        recipe = self.recipe(values)
        options, flags, name = self._save_args(values)
        outcome = self.service.merge_and_load(recipe, name=name, log_ratios=flags["log ratios"])
        lines = [outcome.message()]
        if flags["save model"]:
            result = self._save(lambda: self.service.save(outcome.plan.recipe, name, options, flags["overwrite"],
                                                          flags["safetensors"], flags["metadata"]))
            lines.append(self._saved(result))
        return lines

    def _generate(self, values: dict[str, Any], lines: list[str]) -> ActionResult:
        request = uv.request_from_values(*(values.get(k) for k in GEN_KEYS))
        result = self.service.generate(request)
        lines.append(f"Generated {len(result.images)} image(s), seed {result.seed}.")
        return ActionResult("\n".join(lines), list(result.images), result.infotexts[0] if result.infotexts else "")

    def merge(self, values: dict[str, Any]) -> ActionResult:
        with self.host.lock(), self.host.job(TITLE):
            return ActionResult("\n".join(self._merge(values)))

    def merge_and_generate(self, values: dict[str, Any]) -> ActionResult:
        if self.host.generation_unavailable:
            raise MergeError(self.host.generation_unavailable)
        with self.host.lock(), self.host.job(TITLE):
            lines = self._merge(values)
            return self._generate(values, lines)

    def generate(self, values: dict[str, Any]) -> ActionResult:
        with self.host.lock(), self.host.job(TITLE):
            return self._generate(values, [])

    def save_to_file(self, values: dict[str, Any]) -> ActionResult:
        """Merge the settings straight into a file (the loaded model is not touched)."""
        recipe = self.recipe(values)
        options, flags, name = self._save_args(values)
        with self.host.lock(), self.host.job(TITLE):
            result = self._save(lambda: self.service.save(recipe, name, options, flags["overwrite"],
                                                          flags["safetensors"], flags["metadata"],
                                                          log_ratios=flags["log ratios"]))
        return ActionResult(self._saved(result))

    def overwrite_target(self, values: dict[str, Any]) -> str:
        """The existing file "Merge to file" would replace, or "" when it would write a new one (or refuse: the
        merge itself reports why), so that the page can ask before replacing it."""
        options, flags, name = self._save_args(values)
        if not flags["overwrite"]:
            return ""
        recipe = self.recipe(values)
        with self.host.lock():
            plan, _ = self.service.plan(recipe)
        path = self.service.output_path(plan, name, options, flags["safetensors"])
        return str(path) if path.exists() else ""

    def save_current(self, values: dict[str, Any]) -> ActionResult:
        options, flags, name = self._save_args(values)
        with self.host.lock(), self.host.job(TITLE):
            result = self._save(lambda: self.service.save_loaded(name, options, flags["overwrite"],
                                                                 flags["safetensors"]))
        return ActionResult(self._saved(result))

    def plot(self, values: dict[str, Any], specs: Sequence[tuple[str, str]] | None = None,
             random_spec=None) -> ActionResult:
        """The tab's X/Y/Z plot (or the given axes): grids in the gallery, the cells' merges loaded one after
        another; `random_spec` draws the "random" axis's cells (the dice settings)."""
        if self.host.generation_unavailable:
            raise MergeError(f"X/Y/Z plots generate images: {self.host.generation_unavailable}")
        if specs is None:
            specs = [(values.get(f"{axis}_type") or "none", values.get(f"{axis}_values") or "") for axis in "xyz"]
        request = uv.request_from_values(*(values.get(k) for k in GEN_KEYS))
        with self.host.lock(), self.host.job(f"{TITLE}: X/Y/Z plot"):
            result = run_plot(self.service, self.recipe(values), request, specs, random_spec)
        saved = "".join(f"\nSaved {path}" for path in result.saved)
        return ActionResult(result.message() + saved, list(result.grids), result.info)

    def restore(self, values: dict[str, Any]) -> ActionResult:
        with self.host.lock(), self.host.job(TITLE):
            self.service.restore_base()
        return ActionResult("Restored the base model's own weights.")

    def stop(self) -> str:
        self.host.request_stop()
        return "Stopping: the running merge ends at its next check and keeps the previous weights."

    # -- read-only views ----------------------------------------------------------------------------------------

    def loaded_model(self) -> str:
        if self.host.live_model_unavailable:
            return "No model is loaded here."
        identity = self.host.loaded_identity()
        return f"{identity.name} (recipe {identity.short_hash})" if identity else "The base checkpoint (no merge)."

    def history(self) -> History:
        return self.service.history()

    def history_rows(self, words: str = "", mode: str = "and") -> list[list[str]]:
        history = self.history()
        rows = history.search(words, mode) if (words or "").strip() else history.rows(HISTORY_LIMIT)
        return uv.history_table(rows, HISTORY_LIMIT)

    def settings_from_id(self, merge_id: Any) -> tuple[int, dict[str, Any]]:
        """(the merge's own ID, -1 resolved to the last one; its widget values)."""
        try:
            number = int(merge_id)
        except (TypeError, ValueError):
            raise MergeError(f"Merge ID must be a whole number (-1 for the last merge), not {merge_id!r:.60}.") \
                from None
        row = self.history().get(number)
        if is_lora_record(row["recipe"]):
            raise MergeError(f"Merge ID {row['id']} is a {row['recipe']['operation']}, not a merge: load it in the "
                             f"LoRA tab (History ID, then 'Load LoRAs from history').")
        return row["id"], uv.values_from_recipe(row["recipe"])

    def inspect(self, name: str) -> str:
        from ..cli.inspect import describe

        if not name:
            raise MergeError("Choose a model to inspect.")
        return describe(self.host.resolve_model(name))


def _guard(fn: Callable[..., Any], failure: Callable[[str], Any]) -> Callable[..., Any]:
    """Run a handler; on any exception return `failure(message)` instead of letting gradio show a traceback."""

    def run(*args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - every failure becomes a message in the tab
            return failure(error_message(e))

    run.__name__ = getattr(fn, "__name__", "handler")
    return run


def _skip() -> dict:
    return gr.update()


def make_action(h: Handlers, method: Callable[[dict[str, Any]], ActionResult],
                keys: Sequence[str] = ACTION_KEYS) -> Callable[..., tuple]:
    """A button callback: widget values in `keys` order in; (message, gallery, infotext, loaded model, history)
    out. Failures become the message and leave the other outputs as they were."""

    def run(*values):
        result = method(dict(zip(keys, values, strict=True)))
        images = gr.update(value=result.images) if result.images is not None else _skip()
        info = result.infotext if result.infotext is not None else _skip()
        return result.message, images, info, h.loaded_model(), _history_or_skip(h)

    return _guard(run, lambda msg: (msg, _skip(), _skip(), h.loaded_model(), _skip()))


# --------------------------------------------------------------------------------------------------------------
# layout


def build_tab(service: MergeService) -> gr.Blocks:
    """The merge tab as a gr.Blocks (render it inside another Blocks, or launch it on its own): sub-tabs, each built
    by its own function."""
    h = Handlers(service)
    w: dict[str, Any] = {}  # widgets by name

    with gr.Blocks(analytics_enabled=False, title=TITLE) as tab:
        with gr.Tabs(elem_id="bm_tabs"):
            with gr.Tab("Merge", elem_id="bm_tab_merge"):
                parts = _merge_tab(h, w)
            with gr.Tab("LoRA", elem_id="bm_tab_lora"):
                build_lora_tab(service, _guard)
            with gr.Tab("Analysis", elem_id="bm_tab_analysis"):
                build_analysis_tab(h.host, error_message)
            with gr.Tab("Elements", elem_id="bm_tab_elements"):
                build_elements_tab(h.host, w["elemental"], error_message)
            with gr.Tab("Metadata", elem_id="bm_tab_metadata"):
                build_metadata_tab(h.host, error_message)
            with gr.Tab("IDs from images", elem_id="bm_tab_images"):
                build_images_tab(h, settings_updates, settings_outputs(w, parts["block_sliders"],
                                 parts["adjust_sliders"]), parts["block_sliders"], error_message)
        panels = parts.pop("panels")  # random merges, plot helpers, extended SDXL weights (ui/random_panel.py)
        extras = parts.pop("extras")  # the wiring of panels in their own modules (gen defaults, axis helpers...)
        _wire(h, w, **parts)
        panels.wire(h, w, parts, tab, ACTION_KEYS)
        for wire in extras:
            wire(h, w, parts, tab, _guard, _skip)

        # values computed when the tab was built go stale (a merge made through the API, another browser tab):
        # every page load asks again
        def page_opened():
            return h.loaded_model(), _history_or_skip(h)

        tab.load(_guard(page_opened, lambda msg: (msg, _skip())), None, [parts["loaded"], parts["history"]],
                 queue=False)
    return tab


def _merge_tab(h: Handlers, w: dict[str, Any]) -> dict[str, Any]:
    """The Merge sub-tab's layout; fills `w` with the widgets the actions read and returns the others `_wire` needs."""
    service = h.service
    host = service.host
    presets = service.presets
    live_off = host.live_model_unavailable
    gen_off = host.generation_unavailable
    models = model_choices(host)
    panels = Panels()
    extras = []

    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=560):
            with gr.Row(equal_height=False):
                for key, label in (("model_a", "Model A"), ("model_b", "Model B"),
                                   ("model_c", "Model C (3-model modes)")):
                    w[key] = gr.Dropdown(models, value=None, label=label, elem_id=f"bm_{key}", scale=4,
                                         min_width=160)
                refresh = gr.Button("Refresh", elem_id="bm_refresh", size="sm", scale=1, min_width=70)
            method_panel = methods_panel.build(w, models)
            w["mode"] = gr.Radio(list(MERGE_MODES), value=WEIGHT_SUM, label="Merge mode",
                                 info=uv.mode_info(WEIGHT_SUM), elem_id="bm_mode")
            w["calc"] = gr.Radio(list(CALC_MODES), value="normal", label="Calc mode", elem_id="bm_calc")
            calc_note = gr.Markdown(uv.calc_info(WEIGHT_SUM, "normal"), elem_id="bm_calc_info")
            with gr.Row():
                w["alpha"] = gr.Slider(-1, 2, value=0.5, step=0.001, label="alpha",
                                       info="with MBW on, the block weights replace alpha", elem_id="bm_alpha")
                w["beta"] = gr.Slider(-1, 2, value=0.25, step=0.001, label="beta",
                                      info="Triple sum, sum Twice, tensor, tensor2, extract",
                                      interactive=False, elem_id="bm_beta")
            with gr.Accordion("Options", open=False, elem_id="bm_options"):
                with gr.Row():
                    w["save_flags"] = gr.CheckboxGroup(list(uv.SAVE_FLAGS), value=list(uv.DEFAULT_SAVE_FLAGS),
                                                       label="Save settings", elem_id="bm_save_flags")
                with gr.Row():
                    w["save_dtype"] = gr.Radio(list(uv.SAVE_DTYPE_CHOICES), value="keep", label="Save dtype",
                                               elem_id="bm_save_dtype")
                    w["bake_vae"] = gr.Dropdown([uv.NO_VAE, *host.list_vaes()], value=uv.NO_VAE,
                                                label="Bake in VAE", elem_id="bm_bake_vae")
                with gr.Row():
                    w["custom_name"] = gr.Textbox(label="Custom name (optional)", max_lines=1,
                                                  placeholder="file name of the merge", elem_id="bm_custom_name")
                    w["gamma"] = gr.Slider(0, 20, value=0.3, step=0.01, label="gamma (extract)",
                                           elem_id="bm_gamma")
                    w["seed"] = gr.Number(-1, label="Weight seed (R/U, plus random; -1 = random)", precision=0,
                                          elem_id="bm_seed")

            with gr.Accordion("Block weights (MBW)", open=True, elem_id="bm_mbw"):
                with gr.Row():
                    w["use_mbw"] = gr.Checkbox(False, label="use MBW", elem_id="bm_use_mbw", min_width=100)
                    w["block_type"] = gr.Radio(list(uv.BLOCK_TYPES), value=uv.SD1, label="Block type",
                                               elem_id="bm_block_type", min_width=140)
                    preset = gr.Dropdown(presets.names(), value=None, label="Preset (sets alpha weights)",
                                         elem_id="bm_preset", min_width=180)
                w["weights_alpha"] = gr.Textbox(label="Weights for alpha (BASE, IN00-IN11, M00, OUT00-OUT11)",
                                                value=",".join(["0.5"] * 26), max_lines=2,
                                                elem_id="bm_weights_alpha")
                w["weights_beta"] = gr.Textbox(label="Weights for beta (optional; numbers or a preset name)",
                                               max_lines=2, elem_id="bm_weights_beta")
                chart = gr.HTML(weights_svg("", enabled=False), elem_id="bm_chart")
                sliders: dict[str, gr.Slider] = {}
                with gr.Row(elem_id="bm_blocks") as blocks_row:
                    # A U, as the U-Net is drawn: IN blocks down the left, OUT blocks up the right, so skip
                    # connections face each other (IN00 <-> OUT11), M00 at the bottom. style.css turns the two
                    # columns into one grid with BASE above and M00 below both.
                    columns = (("in", ("BASE", *[f"IN{i:02d}" for i in range(12)])),
                               ("out", (*[f"OUT{i:02d}" for i in reversed(range(12))], "M00")))
                    for side, labels in columns:
                        with gr.Column(min_width=220, elem_id=f"bm_blocks_{side}"):
                            for label in labels:
                                sliders[label] = gr.Slider(*uv.WEIGHT_RANGE, value=0.5, step=0.001, label=label,
                                                           elem_id=f"bm_w_{label}")
                block_sliders = [sliders[label] for label in BLOCKS_26]
                method_panel["presets"] = methods_panel.build_block_weights(w, presets.names())
                build_weight_tools(h, w, block_sliders, preset, error_message)

            panels.extended_editor()

            with gr.Accordion("Elemental", open=False, elem_id="bm_elemental_acc"):
                w["elemental"] = gr.Textbox(label="Blocks:Elements:Ratio, one rule per line or comma",
                                            placeholder="OUT06:attn:0.5\nIN04 IN05:attn2.to_k:0.2", lines=3,
                                            elem_id="bm_elemental")

            with gr.Accordion("Adjust", open=False, elem_id="bm_adjust_acc"):
                w["adjust"] = gr.Textbox(label="Adjust: IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3 (blank = off)",
                                         max_lines=1, elem_id="bm_adjust")
                adjust_sliders = []
                with gr.Row(elem_id="bm_adjust_sliders"):
                    for half in (ADJUST_NAMES[:4], ADJUST_NAMES[4:]):
                        with gr.Column(min_width=220):
                            for name in half:
                                lo, hi = uv.ADJUST_RANGES[name]
                                adjust_sliders.append(gr.Slider(lo, hi, value=0, step=0.01,
                                                                label=uv.ADJUST_LABELS[name],
                                                                elem_id=f"bm_adj_{name}"))

            with gr.Accordion("Include / Exclude", open=False, elem_id="bm_inex_acc"):
                w["inex"] = gr.Radio(list(INEX_MODES), value="Off", label="Mode", elem_id="bm_inex")
                w["inex_blocks"] = gr.CheckboxGroup(uv.inex_choices(uv.SD1), value=[], label="Blocks",
                                                    elem_id="bm_inex_blocks")
                w["inex_elements"] = gr.Textbox(label="Elements (key substrings, comma separated)",
                                                max_lines=1, elem_id="bm_inex_elements")

            with gr.Accordion("Generation parameters (0 or blank = as in txt2img)", open=False,
                              elem_id="bm_gen_acc"):
                w["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="bm_prompt")
                w["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=2, elem_id="bm_negative")
                with gr.Row():
                    samplers = list(getattr(host, "list_samplers", list)())
                    w["sampler"] = gr.Dropdown(["", *samplers], value="", label="Sampler",
                                               allow_custom_value=True, elem_id="bm_sampler")
                    w["steps"] = gr.Number(0, label="Steps", precision=0, elem_id="bm_steps")
                    w["cfg_scale"] = gr.Number(0, label="CFG scale", elem_id="bm_cfg")
                with gr.Row():
                    w["width"] = gr.Number(0, label="Width", precision=0, elem_id="bm_width")
                    w["height"] = gr.Number(0, label="Height", precision=0, elem_id="bm_height")
                    w["gen_seed"] = gr.Number(-1, label="Seed", precision=0, elem_id="bm_gen_seed")
                    w["batch_size"] = gr.Number(0, label="Batch size", precision=0, elem_id="bm_batch")
                build_generation_extras(host, w)
                extras.append(gen_defaults.build(w, GEN_KEYS))

            with gr.Accordion("X/Y/Z plot", open=False, elem_id="bm_xyz_acc"):
                for axis, default in (("x", "alpha"), ("y", "none"), ("z", "none")):
                    with gr.Row(equal_height=True):
                        w[f"{axis}_type"] = gr.Dropdown(list(AXIS_TYPES), value=default,
                                                        label=f"{axis.upper()} type", elem_id=f"bm_{axis}_type",
                                                        scale=1, min_width=140)
                        w[f"{axis}_values"] = gr.Textbox(label=f"{axis.upper()} values", lines=1, max_lines=8,
                                                         elem_id=f"bm_{axis}_values", scale=3)
                gr.Markdown(XYZ_HELP, elem_id="bm_xyz_help")
                plot_btn = gr.Button("Run X/Y/Z plot", elem_id="bm_xyz_run", interactive=not gen_off)
                panels.plot_extras(gen_off)
                extras.append(xyz_helpers.build(models))
            panels.dice(gen_off, live_off)

        with gr.Column(scale=2, min_width=360):
            with gr.Row():
                merge_btn = gr.Button("Merge", variant="primary", elem_id="bm_merge", min_width=90,
                                      interactive=not live_off)
                merge_gen_btn = gr.Button("Merge & Generate", elem_id="bm_merge_gen", min_width=90,
                                          interactive=not (live_off or gen_off))
                gen_btn = gr.Button("Generate", elem_id="bm_generate", min_width=90, interactive=not gen_off)
                stop_btn = gr.Button("Stop", variant="stop", elem_id="bm_stop", min_width=90)
            with gr.Row():
                file_btn = gr.Button("Merge to file", variant="primary", elem_id="bm_save_file", min_width=110)
                # the file "Merge to file" would replace, and the user's answer to the page's question (set
                # by CONFIRM_OVERWRITE_JS in the page; the checkbox itself is never shown)
                w["overwrite_target"] = gr.Textbox("", visible=False, elem_id="bm_overwrite_target")
                w["overwrite_ok"] = gr.Checkbox(False, visible=False, elem_id="bm_overwrite_ok")
                save_btn = gr.Button("Save current merge", elem_id="bm_save_current", min_width=110,
                                     interactive=not live_off)
                restore_btn = gr.Button("Restore base model", elem_id="bm_restore", min_width=110,
                                        interactive=not live_off)
            notes = []
            if live_off:
                notes.append(f"Merge, Save current merge, Restore: unavailable. {live_off}")
            if gen_off:
                notes.append(f"Generate: unavailable. {gen_off}")
            gr.Markdown("\n\n".join(f"*{n}*" for n in notes), visible=bool(notes), elem_id="bm_unavailable")
            message = gr.Textbox(label="Message", lines=3, max_lines=12, interactive=False,
                                 elem_id="bm_message")
            loaded = gr.Textbox(h.loaded_model(), label="Loaded model", max_lines=1, interactive=False,
                                elem_id="bm_loaded")
            with gr.Row(equal_height=False):
                merge_id = gr.Number(-1, label="Load settings from merge ID (-1 = last)", precision=0,
                                     elem_id="bm_merge_id", scale=3)
                load_btn = gr.Button("Load settings", elem_id="bm_load_settings", size="sm", scale=1,
                                     min_width=100)
            extras.append(recipe_text.build())
            gallery = gr.Gallery(label="Images", columns=2, height=320, object_fit="contain",
                                 elem_id="bm_gallery")
            infotext = gr.Textbox(label="Generation info", lines=3, interactive=False, elem_id="bm_infotext")
            with gr.Accordion("Inspect a model", open=False, elem_id="bm_inspect_acc"):
                with gr.Row(equal_height=True):
                    inspect_model = gr.Dropdown(models, value=None, label="Model", elem_id="bm_inspect_model",
                                                scale=3)
                    inspect_btn = gr.Button("Inspect", elem_id="bm_inspect", scale=1, min_width=80)
                inspect_out = gr.Textbox(label="Description", lines=12, max_lines=40, interactive=False,
                                         show_copy_button=True, elem_id="bm_inspect_out")

    with gr.Accordion("History", open=False, elem_id="bm_history_acc"):
        with gr.Row(equal_height=True):
            search_words = gr.Textbox(label="Search words (blank = latest merges)", max_lines=1,
                                      elem_id="bm_search", scale=4)
            search_mode = gr.Radio(["and", "or"], value="and", label="Match", elem_id="bm_search_mode", scale=1,
                                   min_width=120)
            search_btn = gr.Button("Search / reload", elem_id="bm_search_btn", scale=1, min_width=120)
        history = gr.Dataframe(headers=list(uv.HISTORY_COLUMNS), datatype=["str"] * len(uv.HISTORY_COLUMNS),
                               value=_initial_history(h), interactive=False, wrap=True, elem_id="bm_history")

    methods_panel.wire(h, w, method_panel, calc_note=calc_note, refresh=refresh, blocks_row=blocks_row,
                       preset=preset, chart=chart)
    build_housekeeping(h, error_message)
    return dict(panels=panels, block_sliders=block_sliders, adjust_sliders=adjust_sliders, preset=preset, chart=chart,
                calc_note=calc_note, message=message, loaded=loaded, gallery=gallery, infotext=infotext,
                history=history, search_words=search_words, search_mode=search_mode, merge_id=merge_id,
                inspect_model=inspect_model, inspect_out=inspect_out, extras=extras,
                buttons=dict(refresh=refresh, merge=merge_btn, merge_gen=merge_gen_btn, generate=gen_btn,
                             stop=stop_btn, file=file_btn, save=save_btn, restore=restore_btn, plot=plot_btn,
                             load=load_btn, search=search_btn, inspect=inspect_btn))


def _initial_history(h: Handlers) -> list[list[str]]:
    try:
        return h.history_rows()
    except Exception as e:  # noqa: BLE001 - an unreadable history must not break the tab
        log.warning("Block Merger: cannot read the merge history: %s", e)
        return uv.history_table([])


# --------------------------------------------------------------------------------------------------------------
# events


def _wire(h: Handlers, w, block_sliders, adjust_sliders, preset, chart, calc_note, message, loaded, gallery, infotext,
          history, search_words, search_mode, merge_id, inspect_model, inspect_out, buttons) -> None:
    presets = h.service.presets
    action_inputs = [w[k] for k in ACTION_KEYS]
    action_outputs = [message, gallery, infotext, loaded, history]

    live = js_event(live_js(ACTION_KEYS.index("txt2img_live")))  # generating buttons read txt2img's live values
    for name, method in (("merge", h.merge), ("merge_gen", h.merge_and_generate), ("generate", h.generate),
                         ("save", h.save_current), ("restore", h.restore), ("plot", h.plot)):
        buttons[name].click(make_action(h, method), action_inputs, action_outputs,
                            **(live if name in ("merge_gen", "generate", "plot") else {}))
    _wire_merge_to_file(h, w, action_inputs, action_outputs, buttons["file"])
    buttons["stop"].click(_guard(h.stop, lambda msg: msg), None, message, queue=False)

    # models
    model_keys = ("model_a", "model_b", "model_c")

    def refresh(*names):
        choices = model_choices(h.host, names)
        return [gr.update(choices=choices, value=n or None) for n in names]

    buttons["refresh"].click(_guard(refresh, lambda msg: [_skip()] * 4),
                             [w[k] for k in model_keys] + [inspect_model],
                             [w[k] for k in model_keys] + [inspect_model], queue=False)

    # merge mode / calc mode explanations
    def on_mode(mode, calc):
        beta = gr.update(interactive=uv.uses_beta(mode, calc))
        return gr.update(info=uv.mode_info(mode)), uv.calc_info(mode, calc), beta

    def on_calc(mode, calc):
        mode = uv.implied_mode(mode, calc)
        return gr.update(value=mode, info=uv.mode_info(mode)), uv.calc_info(mode, calc), \
            gr.update(interactive=uv.uses_beta(mode, calc))

    w["mode"].change(on_mode, [w["mode"], w["calc"]], [w["mode"], calc_note, w["beta"]], queue=False)
    w["calc"].change(on_calc, [w["mode"], w["calc"]], [w["mode"], calc_note, w["beta"]], queue=False)

    # block weights: sliders -> text (user moves a slider), text -> sliders (user types), the chart follows the text
    def text_typed(text, block_type, *current):
        values = uv.text_to_sliders(text, block_type, current, presets)
        return [_skip()] * 26 if values is None else [gr.update(value=v) for v in values]

    # `release` (end of a drag, or leaving the number box), computed in the page: never dropped, never late
    for position, slider in enumerate(block_sliders):
        slider.release(None, [w["weights_alpha"], w["block_type"], *block_sliders], w["weights_alpha"],
                       queue=False, **js_event(slider_to_text_js(position)))
    # gradio drops an event while the same one is still running, so fast typing can outrun `input`; leaving the
    # field (`blur`) syncs once more with the final text.
    for event in (w["weights_alpha"].input, w["weights_alpha"].blur):
        event(text_typed, [w["weights_alpha"], w["block_type"], *block_sliders], block_sliders, queue=False)

    def redraw(use_mbw, alpha_text, beta_text, block_type):
        return weights_svg(alpha_text, beta_text, block_type, presets, bool(use_mbw))

    chart_inputs = [w["use_mbw"], w["weights_alpha"], w["weights_beta"], w["block_type"]]
    for source in chart_inputs:
        source.change(redraw, chart_inputs, chart, queue=False)
    for source in (w["weights_alpha"], w["weights_beta"]):
        source.blur(redraw, chart_inputs, chart, queue=False)

    def preset_chosen(name, block_type, *current):
        values = presets.get(name or "")
        if values is None:
            return [_skip(), _skip(), *([_skip()] * 26)]
        sliders = uv.text_to_sliders(values, uv.SD1, current, presets) or list(current)
        text = uv.sliders_to_text(sliders, block_type) if block_type == uv.SDXL else values
        return [gr.update(value=text), gr.update(value=True), *[gr.update(value=v) for v in sliders]]

    preset.change(preset_chosen, [preset, w["block_type"], *block_sliders],
                  [w["weights_alpha"], w["use_mbw"], *block_sliders], queue=False)

    hidden = [BLOCKS_26.index(label) for label in uv.XL_HIDDEN]

    def block_type_changed(block_type, alpha_text, beta_text, inex_blocks, *current):
        choices = uv.inex_choices(block_type)
        return [
            gr.update(value=uv.convert_block_type(alpha_text, block_type, current, presets)),
            gr.update(value=uv.convert_block_type(beta_text, block_type, current, presets)),
            gr.update(choices=choices, value=[b for b in inex_blocks or () if b in choices]),
            *[gr.update(visible=block_type != uv.SDXL) for _ in hidden],
        ]

    w["block_type"].change(
        block_type_changed, [w["block_type"], w["weights_alpha"], w["weights_beta"], w["inex_blocks"], *block_sliders],
        [w["weights_alpha"], w["weights_beta"], w["inex_blocks"], *[block_sliders[i] for i in hidden]], queue=False)

    # adjust: the same two-way sync
    def adjust_moved(*values):
        return uv.adjust_to_text(values)

    def adjust_typed(text):
        values = uv.text_to_adjust(text)
        return [_skip()] * 8 if values is None else [gr.update(value=v) for v in values]

    for slider in adjust_sliders:
        slider.release(adjust_moved, adjust_sliders, w["adjust"], queue=False)
    for event in (w["adjust"].input, w["adjust"].blur):
        event(adjust_typed, w["adjust"], adjust_sliders, queue=False)

    # load settings from a merge ID
    load_outputs = [*settings_outputs(w, block_sliders, adjust_sliders), message]

    def load_settings(merge_id, *current):
        resolved, values = h.settings_from_id(merge_id)
        return [*settings_updates(h, values, current), f"Loaded the settings of merge {resolved}."]

    buttons["load"].click(_guard(load_settings, lambda msg: [*([_skip()] * (len(load_outputs) - 1)), msg]),
                          [merge_id, *block_sliders], load_outputs, queue=False)

    # history search and inspect
    def search(words, mode):
        return h.history_rows(words, mode), ""

    buttons["search"].click(_guard(search, lambda msg: (_skip(), msg)), [search_words, search_mode],
                            [history, message], queue=False)
    search_words.submit(_guard(search, lambda msg: (_skip(), msg)), [search_words, search_mode], [history, message],
                        queue=False)
    buttons["inspect"].click(_guard(h.inspect, lambda msg: msg), inspect_model, inspect_out)


def slider_to_text_js(position: int) -> str:
    """The page-side handler of the block slider at `position`: javascript/block_merger.js's blockMergerSliderMoved
    (values.slider_moved in the page), given the positions the text lists for the block type chosen."""
    visible = {block_type: list(uv.visible_positions(block_type)) for block_type in uv.BLOCK_TYPES}
    return (f"(text, blockType, ...sliders) => window.blockMergerSliderMoved({position}, "
            f"{json.dumps(visible)}[blockType] || {json.dumps(visible[uv.SD1])}, text, sliders.slice(0, 26))")


def settings_updates(h: Handlers, values: dict[str, Any], current: Sequence[float]) -> list:
    """Updates that put a recipe's widget values (`values_from_recipe`) into the Merge tab: one per RECIPE_KEYS
    widget, then the 26 block sliders (`current`: where they are now) and the 8 adjust sliders (`settings_outputs`)."""
    presets = h.service.presets
    sliders = uv.text_to_sliders(values["weights_alpha"], values["block_type"], current, presets) \
        if values["use_mbw"] else None
    adjust = uv.text_to_adjust(values["adjust"])
    updates = []
    for key in RECIPE_KEYS:
        if key in ("model_a", "model_b", "model_c"):
            names = [values[k] for k in ("model_a", "model_b", "model_c")]
            updates.append(gr.update(choices=model_choices(h.host, names), value=values[key] or None))
        elif key == "models":
            updates.append(gr.update(choices=model_choices(h.host, values[key]), value=values[key]))
        elif key in ("weights_alpha", "weights_beta", "block_type") and not values["use_mbw"]:
            updates.append(_skip())  # the merge used no block weights: keep what the fields hold
        elif key == "inex_blocks":
            choices = uv.inex_choices(values["block_type"])
            updates.append(gr.update(choices=choices, value=[b for b in values[key] if b in choices]))
        else:
            updates.append(gr.update(value=values[key]))
    updates += [_skip()] * 26 if sliders is None else [gr.update(value=v) for v in sliders]
    updates += [_skip()] * 8 if adjust is None else [gr.update(value=v) for v in adjust]
    return updates


def settings_outputs(w: dict[str, Any], block_sliders: list, adjust_sliders: list) -> list:
    """The widgets `settings_updates` updates, in its order."""
    return [w[k] for k in RECIPE_KEYS] + block_sliders + adjust_sliders


def js_event(code: str) -> dict[str, str]:
    """The keyword that gives an event a function to run in the page: `_js` in gradio 3, `js` in gradio 4."""
    return {"_js" if int(gr.__version__.split(".")[0]) < 4 else "js": code}


def _wire_merge_to_file(h: Handlers, w, action_inputs, action_outputs, button) -> None:
    """"Merge to file" in two steps: find the file it would replace; then ask in the page (CONFIRM_OVERWRITE_JS, run
    before the second step's function, fills in the answer) and merge unless the user said no. (In gradio 3.41 a
    page-only step ends a chain: nothing after it runs, hence the question inside the second step.)"""
    target, ok = w["overwrite_target"], w["overwrite_ok"]
    save = make_action(h, h.save_to_file)

    def find_target(*values):
        return h.overwrite_target(dict(zip(ACTION_KEYS, values, strict=True)))

    def save_if_confirmed(path, confirmed, *values):
        if path and not confirmed:
            return f"Merge to file cancelled: {path} is kept.", _skip(), _skip(), h.loaded_model(), _skip()
        return save(*values)

    # a failure to find the target is reported by the merge itself, in the third step
    button.click(_guard(find_target, lambda msg: ""), action_inputs, target) \
        .then(save_if_confirmed, [target, ok, *action_inputs], action_outputs, **js_event(CONFIRM_OVERWRITE_JS))


def _history_or_skip(h: Handlers):
    try:
        return h.history_rows()
    except Exception:  # noqa: BLE001 - the action itself succeeded; keep the old table
        return _skip()


def handler_values(**values: Any) -> dict[str, Any]:
    """Every action widget's value by name: the tab's defaults, with `values` replacing some (tests, scripts)."""
    defaults = dict(model_a="", model_b="", model_c="", mode=WEIGHT_SUM, calc="normal", alpha=0.5, beta=0.25,
                    use_mbw=False, weights_alpha="", weights_beta="", block_type=uv.SD1, elemental="", adjust="",
                    inex="Off", inex_blocks=[], inex_elements="", gamma=0.3, seed=-1,
                    save_flags=list(uv.DEFAULT_SAVE_FLAGS), save_dtype="keep", bake_vae=uv.NO_VAE, custom_name="",
                    prompt="", negative_prompt="", steps=0, sampler="", cfg_scale=0, width=0, height=0, gen_seed=-1,
                    batch_size=1, x_type="alpha", x_values="", y_type="none", y_values="", z_type="none",
                    z_values="", **mv.METHOD_DEFAULTS, **GEN_EXTRA_DEFAULTS)
    unknown = set(values) - set(defaults)
    if unknown:
        raise TypeError(f"unknown widget(s): {', '.join(sorted(unknown))}")
    defaults.update(values)
    return {k: defaults[k] for k in ACTION_KEYS}


__all__: Sequence[str] = ("build_tab", "Handlers", "ActionResult", "ACTION_KEYS", "RECIPE_KEYS", "ROOT_ID",
                          "handler_values", "error_message", "make_action", "js_event")
