"""Widget values <-> merge recipe, for the tab (`tab.py`). Pure functions: no gradio, no files, easy to test.

The tab's text fields are the truth (what a recipe records); sliders are a way to edit them. Block weights are
shown on 26 sliders in BASE, IN00-IN11, M00, OUT00-OUT11 order; with the SDXL block type, the text holds the 20 SDXL
values and the sliders of IN09-IN11 and OUT09-OUT11 are hidden (their values are kept for switching back).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..core.arch import BLOCKS_26, BLOCKS_XL, BLOCKS_XL_FINE, Arch
from ..core.errors import MergeError
from ..core.kernels import CALC_MODES, MERGE_MODES, MODE_FORMULAS, WEIGHT_SUM
from ..core.recipe import NEEDS_C, Recipe, check_text_size
from ..core.weights import ADJUST_NAMES, INEX_EXTRAS, Presets, parse_adjust, parse_block_weights, random_table
from ..hosts.base import GenerationRequest
from ..io.checkpoint import SaveOptions
from . import method_values as mv

SD1, SDXL = "SD1", "SDXL"
BLOCK_TYPES = (SD1, SDXL)
#: positions (in BLOCKS_26) of the 20 SDXL blocks: BASE, IN00-IN08, M00, OUT00-OUT08
XL_POSITIONS = tuple(BLOCKS_26.index(label) for label in BLOCKS_XL)
XL_HIDDEN = tuple(label for label in BLOCKS_26 if label not in BLOCKS_XL)
WEIGHT_RANGE = (-1.0, 2.0)
ADJUST_RANGES = {name: (-6.0, 6.0) if name in ("IN", "OUT", "OUT2") else (-10.0, 10.0) for name in ADJUST_NAMES}
ADJUST_LABELS = {
    "IN": "IN (detail/noise, input)",
    "OUT": "OUT (detail/noise, output)",
    "OUT2": "OUT2 (detail/noise, final conv)",
    "CONT": "CONT (contrast)",
    "BRI": "BRI (brightness)",
    "COL1": "COL1 (cyan-red)",
    "COL2": "COL2 (magenta-green)",
    "COL3": "COL3 (yellow-blue)",
}
SAVE_FLAGS = ("save model", "overwrite", "safetensors", "prune", "save metadata", "Reset CLIP ids", "copy config",
              "log ratios")
DEFAULT_SAVE_FLAGS = ("safetensors", "save metadata")
SAVE_DTYPE_CHOICES = ("keep", "fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2")
NO_VAE = "None"
DEFAULT_WEIGHT = 0.5


# --------------------------------------------------------------------------------------------------------------
# numbers and texts


def fmt(value: float) -> str:
    """A slider value as the weights text shows it: at most 4 decimals (a typed 0.12345 shows as 0.1235; the
    slider's step is 0.001), no trailing zeros."""
    value = round(float(value), 4)
    if value == 0:
        value = 0.0  # no "-0"
    return f"{value:g}" if abs(value) < 1e6 else repr(value)


def weight_tokens(text: str) -> list[str]:
    tokens = [t.strip() for t in (text or "").replace("\n", ",").split(",")]
    if tokens and tokens[-1] == "":
        tokens.pop()  # one trailing comma
    return tokens


def number_or_none(token: str) -> float | None:
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def block_labels(block_type: str) -> tuple[str, ...]:
    return BLOCKS_XL if block_type == SDXL else BLOCKS_26


def visible_positions(block_type: str) -> tuple[int, ...]:
    """Which of the 26 sliders the block type shows (and the text lists), in text order."""
    return XL_POSITIONS if block_type == SDXL else tuple(range(26))


def sliders_to_text(values: Sequence[float], block_type: str = SD1) -> str:
    """26 slider values -> the weights text (26 values, or the 20 visible ones for SDXL)."""
    if len(values) != 26:
        raise ValueError(f"expected 26 slider values, got {len(values)}")
    return ",".join(fmt(values[i]) for i in visible_positions(block_type))


def text_to_sliders(text: str, block_type: str, current: Sequence[float],
                    presets: Presets | None = None) -> list[float] | None:
    """The weights text -> 26 slider values, or None while the text is not a complete list (still being typed).

    A preset name is looked up. 26 values fill every slider; 20 values (SDXL) fill the visible SDXL sliders and keep
    the others. R/U (random) entries and values outside the slider range keep the slider where it is.
    """
    text = (text or "").strip()
    if presets is not None and text and "," not in text:
        text = presets.get(text) or text
    tokens = weight_tokens(text)
    if len(tokens) == 26:
        positions: Sequence[int] = range(26)
    elif len(tokens) == 20:
        positions = XL_POSITIONS
    else:
        return None
    out = [float(v) for v in current] if len(current) == 26 else [DEFAULT_WEIGHT] * 26
    numbers = [number_or_none(t) for t in tokens]
    if any(n is None and t not in ("R", "U") for n, t in zip(numbers, tokens, strict=True)):
        return None
    for pos, number in zip(positions, numbers, strict=True):
        if number is not None:
            out[pos] = min(max(number, WEIGHT_RANGE[0]), WEIGHT_RANGE[1])
    return out


def convert_block_type(text: str, new_type: str, current: Sequence[float], presets: Presets | None = None) -> str:
    """The weights text after switching the block type: 26 <-> 20 values (hidden blocks from the sliders).

    Text that is not a complete list (or holds a preset name) is kept as it is.
    """
    tokens = weight_tokens(text)
    if len(tokens) == 26 and new_type == SDXL:
        return ",".join(tokens[i] for i in XL_POSITIONS)
    if len(tokens) == 20 and new_type == SD1:
        full = [fmt(v) for v in current] if len(current) == 26 else [fmt(DEFAULT_WEIGHT)] * 26
        for pos, token in zip(XL_POSITIONS, tokens, strict=True):
            full[pos] = token
        return ",".join(full)
    return text


def adjust_to_text(values: Sequence[float]) -> str:
    """8 adjust sliders -> text; all zero -> "" (Adjust off)."""
    if len(values) != 8:
        raise ValueError(f"expected 8 adjust values, got {len(values)}")
    return "" if not any(float(v) for v in values) else ",".join(fmt(v) for v in values)


def text_to_adjust(text: str) -> list[float] | None:
    """Adjust text -> 8 slider values ("" -> all zero), or None while it is not 8 numbers."""
    text = (text or "").strip()
    if not text:
        return [0.0] * 8
    tokens = weight_tokens(text)
    numbers = [number_or_none(t) for t in tokens]
    if len(tokens) != 8 or any(n is None for n in numbers):
        return None
    return [min(max(n, ADJUST_RANGES[name][0]), ADJUST_RANGES[name][1])
            for n, name in zip(numbers, ADJUST_NAMES, strict=True)]


def split_list(text: str | Iterable[str]) -> tuple[str, ...]:
    """Comma/space separated names (a text, or a list of them) -> a tuple without blanks."""
    items = [text] if isinstance(text, str) else list(text or ())
    return tuple(t.strip() for item in items for t in item.replace(",", " ").split() if t.strip())


def inex_choices(block_type: str) -> list[str]:
    return [*block_labels(block_type), *reversed(INEX_EXTRAS)]  # ..., VAE, Adjust


# --------------------------------------------------------------------------------------------------------------
# explanations


def mode_info(mode: str) -> str:
    return f"{mode}: {MODE_FORMULAS.get(mode, '?')}" + ("; needs model C" if mode in NEEDS_C else "")


def pair_problem(mode: str, calc: str) -> str | None:
    """Why this merge mode / calc mode pair cannot run (the recipe's own message), or None when it can."""
    try:
        Recipe("A", "B", "C", mode=mode, calc=calc).validate(Presets({}))
    except MergeError as e:
        return str(e)
    return None


def calc_info(mode: str, calc: str) -> str:
    """A short explanation of a calc mode for the chosen merge mode, with what will happen or why it cannot."""
    c = CALC_MODES.get(calc)
    if c is None:
        return f"Unknown calc mode {calc!r}."
    lines = [f"**{c.name}**: {c.summary}."]
    problem = pair_problem(mode, calc)
    if c.implies and c.implies != mode:
        lines.append(f"{c.name} always merges as **{c.implies}** ({MODE_FORMULAS[c.implies]}): the merge mode is "
                     f"switched to it.")
    elif problem:
        lines.append(f"⚠ Not possible: {problem} Merging refuses this pair; choose another merge or calc mode.")
    notes = []
    if not c.uses_b:
        notes.append("model B is not used")
    if c.uses_beta:
        notes.append("beta is used")
    if c.name == "extract":
        notes.append("gamma sets how selective it is")
    if notes:
        lines.append("Here " + ", ".join(notes) + ".")
    return " ".join(lines)


def uses_beta(mode: str, calc: str) -> bool:
    c = CALC_MODES.get(calc)
    return mode in ("Triple sum", "sum Twice") or bool(c and c.uses_beta)


def implied_mode(mode: str, calc: str) -> str:
    c = CALC_MODES.get(calc)
    return c.implies if c is not None and c.implies else mode


# --------------------------------------------------------------------------------------------------------------
# recipe


_ANY_LAYOUT = Arch("sdxl")  # accepts 20 and 26 values: the count check before any model is opened
_FLUX_LAYOUT = Arch("flux")  # 61 values (typed into the weights text; the sliders show SD1/SDXL blocks)


def check_weights(text: str, what: str, block_type: str, presets: Presets) -> str:
    """Resolve a preset name and check the number of block weights before any file is read (the core's message)."""
    text = (text or "").strip()
    single_number = "," not in text and number_or_none(text) is not None and presets.get(text) is None
    resolved = text if single_number else presets.resolve(text)  # "0.5" is one weight, not an unknown preset
    if resolved:
        if block_type == SD1 and len(weight_tokens(resolved)) in (20, len(BLOCKS_XL_FINE)):
            layout = "SDXL" if len(weight_tokens(resolved)) == 20 else "extended SDXL"
            raise MergeError(f"Block weights for {what} have {len(weight_tokens(resolved))} values (the {layout} "
                             f"layout) but the block type is SD1; choose block type SDXL or give 26 values.")
        layout = _FLUX_LAYOUT if len(weight_tokens(resolved)) == len(_FLUX_LAYOUT.blocks) else _ANY_LAYOUT
        parse_block_weights(resolved, layout, what, random_table(0))
    return resolved


def recipe_from_values(
    model_a: str = "", model_b: str = "", model_c: str = "", mode: str = WEIGHT_SUM, calc: str = "normal",
    alpha: float = 0.5, beta: float = 0.25, use_mbw: bool = False, weights_alpha: str = "", weights_beta: str = "",
    block_type: str = SD1, elemental: str = "", adjust: str = "", inex: str = "Off",
    inex_blocks: Sequence[str] = (), inex_elements: str = "", gamma: float = 0.3, seed: float | int = -1,
    presets: Presets | None = None, method: str = mv.OFF, **others: Any,
) -> Recipe:
    """The tab's widget values -> a validated Recipe (MergeError with the message to show when they cannot merge).

    MBW off ignores every weight field. A preset name in a weight field becomes its values. A merge method (see
    `method_values`) takes model A as its base and its own widgets from `others`; models B/C, the merge and calc
    modes and beta then do not apply. Unknown keyword arguments (other widgets) are ignored so callers can pass every
    widget by name.
    """
    presets = presets or Presets.load()
    if isinstance(inex_elements, (list, tuple)):  # a multiselect's list of element names
        inex_elements = ",".join(str(e) for e in inex_elements)
    texts = {"model_a": model_a, "model_b": model_b, "model_c": model_c, "weights_alpha": weights_alpha,
             "weights_beta": weights_beta, "elemental": elemental, "adjust": adjust, "inex_elements": inex_elements}
    for name, text in texts.items():  # before anything parses them
        if text is not None and not isinstance(text, str):
            raise MergeError(f"The {name.replace('_', ' ')} field must be text, not {text!r:.60}.")
        check_text_size(name, text)
    check_text_size("inex_blocks", inex_blocks)
    if mode not in MERGE_MODES:
        raise MergeError(f"Choose a merge mode ({', '.join(MERGE_MODES)}).")
    alpha, beta, gamma = (_number(v, name) for v, name in ((alpha, "alpha"), (beta, "beta"), (gamma, "gamma")))
    seed = _int(seed, "seed", None)
    fields = mv.method_fields(method, others)
    wa = wb = ""
    if use_mbw:
        wa = check_weights(weights_alpha or "", "alpha", block_type, presets)
        for name in (n for n in fields if n.startswith("weights_")):
            fields[name] = check_weights(fields[name], name.removeprefix("weights_"), block_type, presets)
        if not wa and not any(fields.get(n) for n in fields if n.startswith("weights_")):
            raise MergeError("use MBW is on but the block weights for alpha are empty; enter 26 values, pick a "
                             "preset, or turn MBW off.")
        wb = check_weights(weights_beta or "", "beta", block_type, presets)
    if inex != "Off" and not split_list(inex_blocks) and not split_list(inex_elements):
        raise MergeError(f"Include/Exclude is {inex} but no blocks or elements are chosen; tick blocks (e.g. IN01, "
                         f"OUT02) or type elements (e.g. attn), or set it to Off.")
    parse_adjust(adjust)
    if fields:
        if not use_mbw:
            fields.update({n: "" for n in fields if n.startswith("weights_")})
        recipe = Recipe(
            model_a=model_a or "", alpha=alpha, weights_alpha=wa, elemental=(elemental or "").strip(),
            adjust=(adjust or "").strip(), inex=inex, inex_blocks=split_list(inex_blocks) if inex != "Off" else (),
            inex_elements=split_list(inex_elements) if inex != "Off" else (), seed=seed, **fields,
        )
        return recipe.validate(presets)
    recipe = Recipe(
        model_a=model_a or "", model_b=model_b or "", model_c=model_c or "", mode=mode, calc=calc,
        alpha=alpha, beta=beta, weights_alpha=wa, weights_beta=wb, elemental=(elemental or "").strip(),
        adjust=(adjust or "").strip(), inex=inex, inex_blocks=split_list(inex_blocks) if inex != "Off" else (),
        inex_elements=split_list(inex_elements) if inex != "Off" else (), gamma=gamma, seed=seed,
    )
    return recipe.validate(presets)


def values_from_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A logged recipe (History.recipe) -> widget values by name, the inverse of `recipe_from_values`."""
    r = Recipe.from_dict(dict(recipe))
    wa, wb = r.weights_alpha, r.weights_beta
    method = mv.widget_values(r)
    texts = [wa, wb, *(method[k] for k in method if k.startswith("weights_"))]
    block_type = SDXL if any(len(weight_tokens(t)) == 20 for t in texts) else SD1
    inex_blocks = [b for b in r.inex_blocks]
    return {
        "model_a": r.model_a, "model_b": r.model_b, "model_c": r.model_c, "mode": r.mode, "calc": r.calc,
        "alpha": r.alpha, "beta": r.beta, "use_mbw": any(t.strip() for t in texts), "weights_alpha": wa,
        "weights_beta": wb,
        "block_type": block_type, "elemental": r.elemental, "adjust": r.adjust, "inex": r.inex,
        "inex_blocks": inex_blocks, "inex_elements": ",".join(r.inex_elements), "gamma": r.gamma, "seed": r.seed,
        **method,
    }


def save_options_from_values(flags: Sequence[str] = DEFAULT_SAVE_FLAGS, dtype: str = "keep",
                             bake_vae: str | None = None) -> tuple[SaveOptions, dict[str, bool]]:
    """Options widgets -> (SaveOptions, {"overwrite", "safetensors", "metadata", "save model", "log ratios"}).

    "log ratios" (the seed's "debug") writes every key's ratios to the console when merging."""
    flags = set(flags or ())
    unknown = flags - set(SAVE_FLAGS)
    if unknown:
        raise MergeError(f"Unknown save option(s): {', '.join(sorted(unknown))}.")
    vae = bake_vae if bake_vae and bake_vae != NO_VAE else None
    options = SaveOptions(dtype=dtype or "keep", prune="prune" in flags, bake_vae=vae,
                          reset_clip_ids="Reset CLIP ids" in flags, copy_config="copy config" in flags)
    return options, {"overwrite": "overwrite" in flags, "safetensors": "safetensors" in flags,
                     "metadata": "save metadata" in flags, "save model": "save model" in flags,
                     "log ratios": "log ratios" in flags}


def _number(value: Any, name: str) -> float:
    """A number field's value (the API may send anything): a finite float, or a MergeError naming the field."""
    if value is None or value == "":
        raise MergeError(f"{name} is empty; enter a number.")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise MergeError(f"{name} must be a number, not {value!r:.60}.") from None
    if not math.isfinite(number):
        raise MergeError(f"{name} must be a finite number, not {value!r:.60}.")
    return number


def _int(value: Any, name: str, default: int | None = 0) -> int:
    """A whole-number field's value; blank is `default` (None: blank is an error)."""
    if (value is None or value == "") and default is not None:
        return default
    number = _number(value, name)
    if number != int(number):
        raise MergeError(f"{name} must be a whole number, not {value!r:.60}.")
    return int(number)


TXT2IMG = "as txt2img"
SWITCH_CHOICES = (TXT2IMG, "on", "off")  # restore faces, tiling, hires fix: blank takes txt2img's


def _live_number(live: Mapping[str, Any], name: str) -> float | None:
    value = live.get(name)
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _switch(value: Any, live: Mapping[str, Any], name: str) -> bool | None:
    """A tri-state field: "on"/"off" as chosen; "as txt2img" takes the live checkbox (None when unknown)."""
    if value in ("on", "off"):
        return value == "on"
    if value not in (None, "", TXT2IMG):
        raise MergeError(f"{name} must be one of {', '.join(SWITCH_CHOICES)}, not {value!r:.40}.")
    live_value = live.get(name)
    return live_value if isinstance(live_value, bool) else None


def live_values(text: Any) -> dict[str, Any]:
    """The txt2img values the page read from the txt2img tab (JSON from javascript/block_merger.js); {} when there
    are none (the standalone app, the API) or they cannot be read: the host's saved defaults then apply."""
    if not isinstance(text, str) or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def request_from_values(prompt: str = "", negative_prompt: str = "", steps: Any = 0, sampler: str = "",
                        cfg_scale: Any = 0, width: Any = 0, height: Any = 0, seed: Any = -1,
                        batch_size: Any = 1, batch_count: Any = 0, restore_faces: Any = TXT2IMG,
                        tiling: Any = TXT2IMG, styles: Any = (), enable_hr: Any = TXT2IMG, hr_upscaler: Any = "",
                        hr_steps: Any = 0, hr_denoise: Any = 0, hr_scale: Any = 0,
                        txt2img_live: Any = "") -> GenerationRequest:
    """Generation widgets -> GenerationRequest; 0 or blank means "as in txt2img": the live txt2img values the page
    sent (`txt2img_live`, JSON), else the host's saved defaults. The seed is the tab's own (-1: random)."""
    live = live_values(txt2img_live)
    steps, width, height = (_int(v, n) for v, n in ((steps, "Steps"), (width, "Width"), (height, "Height")))
    seed, batch = _int(seed, "Seed", -1), _int(batch_size, "Batch size", 1)
    count, hr_steps = _int(batch_count, "Batch count", 0), _int(hr_steps, "Hires steps", 0)
    numbers = {}
    for name, value in (("CFG scale", cfg_scale), ("Denoising strength", hr_denoise), ("Upscale by", hr_scale)):
        try:
            numbers[name] = float(value or 0)
        except (TypeError, ValueError):
            raise MergeError(f"{name} must be a number, not {value!r}.") from None
    for name, value in (("Steps", steps), ("Width", width), ("Height", height), ("Batch count", count),
                        ("Hires steps", hr_steps), *numbers.items()):
        if value < 0 or not math.isfinite(value):
            raise MergeError(f"{name} cannot be negative (0 means as in txt2img).")
    if width % 8 or height % 8:
        raise MergeError("Width and height must be multiples of 8 (or 0 for txt2img's).")
    if batch < 0:
        raise MergeError("Batch size cannot be negative (0 means as in txt2img).")
    if numbers["Denoising strength"] > 1:
        raise MergeError("Denoising strength must be between 0 and 1 (0 means as in txt2img).")

    def pick(mine, name, kind=float):
        if mine:
            return mine
        number = _live_number(live, name)
        return kind(number) if number is not None and number > 0 else mine

    chosen_styles = tuple(split_styles(styles)) or tuple(str(s) for s in live.get("styles") or () if s)
    hires = _switch(enable_hr, live, "enable_hr")
    return GenerationRequest(
        prompt=prompt or str(live.get("prompt") or ""),
        negative_prompt=negative_prompt or str(live.get("negative_prompt") or ""),
        steps=pick(steps, "steps", int), sampler=(sampler or "").strip() or str(live.get("sampler") or ""),
        scheduler="" if (sampler or "").strip() else str(live.get("scheduler") or ""),
        cfg_scale=pick(numbers["CFG scale"], "cfg_scale"), width=pick(width, "width", int),
        height=pick(height, "height", int), seed=seed, batch_size=pick(batch, "batch_size", int),
        batch_count=pick(count, "batch_count", int), restore_faces=_switch(restore_faces, live, "restore_faces"),
        tiling=_switch(tiling, live, "tiling"), styles=chosen_styles, enable_hr=bool(hires),
        hr_scale=pick(numbers["Upscale by"], "hr_scale"),
        hr_upscaler=(hr_upscaler or "").strip() or str(live.get("hr_upscaler") or ""),
        hr_steps=pick(hr_steps, "hr_steps", int), denoising_strength=pick(numbers["Denoising strength"], "denoising"),
    )


def split_styles(styles: Any) -> list[str]:
    """Style names from a multiselect (a list) or a comma-separated text."""
    items = styles.split(",") if isinstance(styles, str) else list(styles or ())
    return [str(s).strip() for s in items if str(s).strip()]


HISTORY_COLUMNS = ("id", "time", "name", "mode", "calc", "alpha", "beta", "weights_alpha", "model_a", "model_b",
                   "model_c")


def history_table(rows: Sequence[Mapping[str, Any]], limit: int = 50) -> list[list[str]]:
    """History rows (oldest first) -> table rows, newest first."""
    def cells(row: Mapping[str, Any]) -> list[str]:
        recipe = row.get("recipe")
        shown = {**row, **mv.history_cells(recipe if isinstance(recipe, Mapping) else {})}
        return [str(shown.get(c, "")) for c in HISTORY_COLUMNS]

    table = [cells(row) for row in list(rows)[-limit:]] if limit > 0 else []
    table.reverse()
    return table or [["" for _ in HISTORY_COLUMNS]]
