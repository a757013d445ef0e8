"""The Merge tab's method panel and model-family editor (gradio 3.41 components; logic in `method_values`).

Method panel: a choice of merge method beside the four merge modes, its formula, and the models it merges into the
base (model A). The model list is one multiselect dropdown rather than N hidden dropdowns revealed one by one:
gradio 3.41 has no dynamic components, a multiselect takes any number of models with the WebUI's own model list,
keeps them in the order picked (the order of model weights and of a method's models), and a model is removed with
its chip's ×; a fixed set of dropdowns would cap N and need add/remove buttons. While a method is chosen, the
merge/calc modes, models B/C and beta are hidden (they do not apply) and alpha is relabelled λ (slerp: t). The
method's parameters (density, drop, epsilon) are sliders, and each can also be given per block (text fields beside
alpha's block weights, taking numbers or a preset name, with MBW on; a preset dropdown beside each fills it, as
alpha's does) and by elemental rules.

Model-family editor: when the chosen models are Flux, the 26 SD block sliders and the SD1/SDXL switch are hidden and
the block weights are edited as text (61 values: CLIP, T5, IN, D00-D18, S00-S37, OUT) with the chart and the FLUX_*
presets; a flat weight list is converted between 26 and 61 values. A note warns when fp8 is involved (fp8 inputs, or
an fp8 save dtype).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import gradio as gr

from ..core.arch import BLOCKS_FLUX, detect_arch
from ..core.errors import MergeError
from ..core.recipe import METHOD_PARAMS
from ..core.weights import Presets
from ..hosts.base import Host, model_choices
from ..io.read import open_checkpoint
from ..io.save_options import FP8_DTYPES
from . import method_values as mv
from .values import weight_tokens

log = logging.getLogger("block_merger")

SD_WEIGHTS_LABEL = "Weights for alpha (BASE, IN00-IN11, M00, OUT00-OUT11)"
FLUX_WEIGHTS_LABEL = f"Weights for alpha: {len(BLOCKS_FLUX)} Flux blocks (CLIP, T5, IN, D00-D18, S00-S37, OUT)"
#: presets are weight curves, mostly within [0, 1]: what a parameter's blocks must keep to (the merge names a block
#: outside)
PRESET_LIMITS = {"density": "every block > 0 (at most 1)", "drop": "every block < 1 (at least 0)",
                 "epsilon": "1 - density ± epsilon/2 within [0, 1)"}
FP8_NOTE = ("⚠ fp8 {what}: merged in fp32 and rounded once, but fp8 keeps only 3 (e4m3fn) or 2 (e5m2) mantissa bits, "
            "so the saved weights lose precision; choose fp16 or bf16 in Options -> Save dtype to keep it.")


def build(w: dict[str, Any], models: Sequence[str]) -> dict[str, Any]:
    """The method choice, its explanation, the model list and the parameter sliders (render below the model row)."""
    with gr.Row(equal_height=False):
        w["method"] = gr.Dropdown(list(mv.METHOD_CHOICES), value=mv.OFF, label="Merge method (base + N models)",
                                  elem_id="bm_method", scale=2, min_width=200)
        w["models"] = gr.Dropdown(list(models), value=[], multiselect=True, visible=False,
                                  label="Models merged into the base (model A), in the order picked",
                                  elem_id="bm_models", scale=5, min_width=300)
    info = gr.Markdown(mv.method_info(mv.OFF), elem_id="bm_method_info")
    with gr.Row(visible=False, elem_id="bm_method_params") as params_row:
        w["model_weights"] = gr.Textbox(label="Model weights wᵢ (one per model; blank = all 1)", max_lines=1,
                                        elem_id="bm_model_weights", min_width=160)
        w["density"] = gr.Slider(0, 1, value=mv.METHOD_DEFAULTS["density"], step=0.001,
                                 label="density (fraction kept, > 0)", elem_id="bm_density", min_width=160)
        w["drop"] = gr.Slider(0, 1, value=mv.METHOD_DEFAULTS["drop"], step=0.001, label="drop (probability, < 1)",
                              elem_id="bm_drop", min_width=160)
        w["epsilon"] = gr.Slider(0, 1, value=mv.METHOD_DEFAULTS["epsilon"], step=0.001,
                                 label="epsilon (spread of drop probabilities)", elem_id="bm_epsilon", min_width=160)
    note = gr.Markdown("", visible=False, elem_id="bm_model_note")
    return dict(info=info, params_row=params_row, note=note)


def build_block_weights(w: dict[str, Any], presets: Sequence[str]) -> dict[str, gr.Dropdown]:
    """Per-block and elemental texts for the method's parameters (render in the block-weights accordion), each
    per-block text with a dropdown of block-weight presets that fills it; returns the dropdowns by parameter."""
    chosen = {}
    for p in METHOD_PARAMS:
        with gr.Row(equal_height=True):
            w[f"weights_{p}"] = gr.Textbox(label=f"Weights for {p} (per block, as alpha's: numbers or a preset "
                                                 f"name; blank = the {p} slider)", max_lines=2, visible=False,
                                           elem_id=f"bm_weights_{p}", scale=4)
            chosen[p] = gr.Dropdown(list(presets), value=None, label=f"Preset (sets {p} weights)", visible=False,
                                    info=PRESET_LIMITS[p], elem_id=f"bm_preset_{p}", scale=1, min_width=180)
    for p in METHOD_PARAMS:
        w[f"elemental_{p}"] = gr.Textbox(label=f"Elemental rules for {p} (Blocks:Elements:Value, one per line)",
                                         lines=1, visible=False, elem_id=f"bm_elemental_{p}")
    return chosen


def model_facts(host: Host, names: Sequence[str]) -> tuple[set[str], list[str]]:
    """(the families of the chosen .safetensors models, the names of those holding fp8 tensors), read from their
    headers; a model that cannot be read is left out (the merge itself reports it)."""
    families: set[str] = set()
    fp8: list[str] = []
    for name in dict.fromkeys(n for n in names if n):
        try:
            path = host.resolve_model(name)
            if path.suffix.lower() != ".safetensors":
                continue  # a pickle would be loaded whole just to look
            with open_checkpoint(path) as ckpt:
                keys = ckpt.keys()
                families.add(detect_arch(set(keys), ckpt.shape, name).family)
                if any(ckpt.dtype(k) in FP8_DTYPES for k in keys):
                    fp8.append(name)
        except (MergeError, OSError, ValueError) as e:
            log.debug("Block Merger: cannot look into %s: %s", name, e)
    return families, fp8


def family_note(families: set[str], fp8_inputs: Sequence[str], save_dtype: str) -> str:
    lines = []
    if "flux" in families:
        lines.append(f"Flux: the block weights are {len(BLOCKS_FLUX)} values (CLIP, T5, IN, D00-D18, S00-S37, OUT), "
                     f"typed or from a FLUX_* preset; the chart shows them.")
    what = []
    if fp8_inputs:
        what.append(f"input{'s' if len(fp8_inputs) > 1 else ''} ({', '.join(fp8_inputs)})")
    if (save_dtype or "").startswith("fp8"):
        what.append(f"save dtype ({save_dtype})")
    elif fp8_inputs and save_dtype in ("", "keep", None):
        what.append("kept as fp8 by Save dtype keep")
    if what:
        lines.append(FP8_NOTE.format(what=", ".join(what)))
    return "\n\n".join(lines)


def convert_flat(text: str, flux: bool) -> str | None:
    """A flat weight list (every value the same) in the other layout's length, or None to keep the text."""
    tokens = weight_tokens(text)
    target = len(BLOCKS_FLUX) if flux else 26
    if len(tokens) in (20, 26, len(BLOCKS_FLUX)) and len(tokens) != target and len(set(tokens)) == 1:
        return ",".join(tokens[:1] * target)
    return None


def preset_names(presets: Presets, flux: bool) -> list[str]:
    """The presets of the family's length (the SD dropdown lists the 26-value ones)."""
    return presets.names(len(BLOCKS_FLUX) if flux else 26)


def wire(h, w: dict[str, Any], panel: dict[str, Any], calc_note, refresh, blocks_row, preset, chart) -> None:
    """The panel's events: the method shows its controls; picking one sets alpha to its λ; Refresh also updates the
    model list; the chosen models' family switches the block-weight editor and the fp8 note."""
    per_block = [w[f"{prefix}_{p}"] for prefix in ("weights", "elemental") for p in METHOD_PARAMS]
    per_block += [panel["presets"][p] for p in METHOD_PARAMS]
    merge_mode_widgets = [w["mode"], w["calc"], calc_note, w["model_b"], w["model_c"], w["beta"]]
    outputs = [panel["info"], w["models"], panel["params_row"], w["model_weights"],
               *(w[p] for p in METHOD_PARAMS), *per_block, *merge_mode_widgets, w["model_a"], w["alpha"]]

    def method_changed(method):
        show = mv.shown(method)
        on = show["method"]
        updates = [mv.method_info(method), gr.update(visible=on), gr.update(visible=on),
                   gr.update(visible=show["model_weights"]), *(gr.update(visible=show[p]) for p in METHOD_PARAMS)]
        updates += [gr.update(visible=show[p]) for _ in ("weights", "elemental", "preset") for p in METHOD_PARAMS]
        updates += [gr.update(visible=show["merge_modes"]) for _ in merge_mode_widgets]
        updates += [gr.update(label="Base model (A)" if on else "Model A"), gr.update(label=mv.alpha_label(method))]
        return updates

    w["method"].change(method_changed, w["method"], outputs, queue=False)

    def method_picked(method):  # the user's pick only (not Load settings): start from the method's λ
        alpha = mv.default_alpha(method)
        return gr.update() if alpha is None else gr.update(value=alpha)

    w["method"].input(method_picked, w["method"], w["alpha"], queue=False)

    def refresh_models(chosen):
        chosen = list(chosen or [])
        return gr.update(choices=model_choices(h.host, chosen), value=chosen)

    refresh.click(refresh_models, w["models"], w["models"], queue=False)

    presets = h.service.presets

    def param_preset_chosen(name):  # as alpha's preset: the values into the text, and MBW on (the text needs it)
        values = presets.get(name or "")
        return (gr.update(), gr.update()) if values is None else (gr.update(value=values), gr.update(value=True))

    for p, dropdown in panel["presets"].items():
        dropdown.change(param_preset_chosen, dropdown, [w[f"weights_{p}"], w["use_mbw"]], queue=False)

    sources = [w["model_a"], w["model_b"], w["model_c"], w["models"], w["method"], w["save_dtype"]]

    def models_changed(a, b, c, models, method, save_dtype, weights_alpha):
        names = [a, *(models or [])] if mv.method_name(method) else [a, b, c]
        families, fp8 = model_facts(h.host, names)
        flux = "flux" in families
        note = family_note(families, fp8, save_dtype)
        converted = convert_flat(weights_alpha, flux)
        return [gr.update(value=note, visible=bool(note)), gr.update(visible=not flux),
                gr.update(visible=not flux),
                gr.update(label=FLUX_WEIGHTS_LABEL if flux else SD_WEIGHTS_LABEL,
                          **({} if converted is None else {"value": converted})),
                *(gr.update(choices=preset_names(presets, flux)) for _ in range(1 + len(METHOD_PARAMS)))]

    family_outputs = [panel["note"], blocks_row, w["block_type"], w["weights_alpha"], preset,
                      *(panel["presets"][p] for p in METHOD_PARAMS)]
    for source in sources:
        source.change(models_changed, [*sources, w["weights_alpha"]], family_outputs, queue=False)
