"""Block Merger's axes in the WebUI's own X/Y/Z plot script.

An axis only records what a cell asks for on the processing object (a new dict per cell, since the WebUI copies
`p` shallowly); the AlwaysVisible script's `before_process` turns that request into a recipe and merges only when
it differs from what is loaded. Merge axes get a cost above the checkpoint axis so merges sit in the outer loops.
The xyz module is passed in (found through the WebUI's script registry), so nothing here imports the WebUI.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..core.errors import MergeError
from ..core.kernels import CALC_MODES, MERGE_MODES
from ..core.recipe import Recipe
from ..core.weights import Presets, parse_number

PREFIX = "[Block Merger] "
REQUEST_ATTR = "block_merger_xyz"


def _set(field: str) -> Callable[[Any, Any, Any], None]:
    def apply(p, value, values) -> None:
        setattr(p, REQUEST_ATTR, {**getattr(p, REQUEST_ATTR, {}), field: value})
    return apply


def _split(separator: str) -> Callable[[str], list[str]]:
    """Values that contain commas (weights, elemental) are separated by `|` in the X/Y/Z text box."""
    def prepare(text: str) -> list[str]:
        return [v.strip() for v in text.split(separator) if v.strip()]
    return prepare


def _pinpoint(text: str) -> list[str]:
    """`BLOCK=value` items, e.g. `OUT05=0.2, OUT05=0.8, IN04=1`."""
    items = [v.strip() for v in text.split(",") if v.strip()]
    for item in items:
        block, sep, value = item.partition("=")
        if not sep or not block.strip():
            raise MergeError(f"Pinpoint block value {item!r} must be BLOCK=value, e.g. OUT05=0.3.")
        parse_number(value.strip(), f"Pinpoint block {item!r}")
    return items


def axis_options(xyz: Any, resolve_model: Callable[[str], object], list_models: Callable[[], list[str]],
                 presets: Callable[[], Presets]) -> list[Any]:
    """The AxisOption objects to add; `resolve_model` raises MergeError for an unknown model (used in confirm)."""
    AxisOption = xyz.AxisOption

    def confirm_models(p, values) -> None:
        for name in values:
            resolve_model(name)

    def confirm_weights(p, values) -> None:
        for text in values:
            presets().resolve(text)

    def choices(options):
        return lambda: list(options)

    return [
        AxisOption(PREFIX + "Model A", str, _set("model_a"), confirm=confirm_models, cost=1.5, choices=list_models),
        AxisOption(PREFIX + "Model B", str, _set("model_b"), confirm=confirm_models, cost=1.5, choices=list_models),
        AxisOption(PREFIX + "Model C", str, _set("model_c"), confirm=confirm_models, cost=1.5, choices=list_models),
        AxisOption(PREFIX + "Merge mode", str, _set("mode"), cost=1.2, choices=choices(MERGE_MODES)),
        AxisOption(PREFIX + "Calc mode", str, _set("calc"), cost=1.2, choices=choices(CALC_MODES)),
        AxisOption(PREFIX + "Alpha", float, _set("alpha"), cost=1.1),
        AxisOption(PREFIX + "Beta", float, _set("beta"), cost=1.1),
        AxisOption(PREFIX + "Block weights (| separated)", str, _set("weights_alpha"), confirm=confirm_weights,
                   cost=1.1, prepare=_split("|")),
        AxisOption(PREFIX + "Pinpoint block (BLOCK=value)", str, _set("pinpoint"), cost=1.1, prepare=_pinpoint),
        AxisOption(PREFIX + "Elemental (| separated)", str, _set("elemental"), cost=1.1, prepare=_split("|")),
    ]


def register(xyz: Any, options: list[Any]) -> bool:
    """Add the axes once (idempotent: the WebUI may call us at import and again in on_before_ui)."""
    if any(getattr(opt, "label", "").startswith(PREFIX) for opt in xyz.axis_options):
        return False
    xyz.axis_options.extend(options)
    return True


def requested_recipe(p: Any, base: Recipe | None, default_model_a: str, blocks: tuple[str, ...]) -> Recipe | None:
    """The recipe a cell asks for: the base recipe (the user's merge) with the cell's fields; None if none asked."""
    fields = dict(getattr(p, REQUEST_ATTR, {}) or {})
    if not fields:
        return None
    pinpoint = fields.pop("pinpoint", None)
    recipe = base or Recipe(default_model_a)
    recipe = dataclasses.replace(recipe, **fields)
    if pinpoint is not None:
        block, _, value = pinpoint.partition("=")
        block = block.strip()
        if block not in blocks:
            raise MergeError(f"Pinpoint block {block!r} is not one of {', '.join(blocks)}.")
        weights = recipe.weights_alpha.split(",") if recipe.mbw else [f"{recipe.alpha:g}"] * len(blocks)
        if len(weights) != len(blocks):
            raise MergeError(f"Pinpoint block needs {len(blocks)} block weights in the base recipe; it has "
                             f"{len(weights)}.")
        weights[blocks.index(block)] = value.strip()
        recipe = dataclasses.replace(recipe, weights_alpha=",".join(w.strip() for w in weights))
    return recipe
