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

from ..core.arch import Arch
from ..core.errors import MergeError
from ..core.kernels import CALC_MODES, MERGE_MODES
from ..core.methods import METHODS
from ..core.random_weights import RandomSpec, spec_from_dict
from ..core.recipe import Recipe
from ..core.weights import INEX_EXTRAS, Presets, expand_blocks, parse_number
from ..core.xyz import GenParams, build_cell

PREFIX = "[Block Merger] "
REQUEST_ATTR = "block_merger_xyz"
AXES_ATTR = "block_merger_xyz_axes"

#: checks a sample request of the whole plot (every axis of ours, its first value); raises MergeError
CheckPlot = Callable[[Any, dict], None]


@dataclasses.dataclass
class PlotAxes:
    """What our axes' confirm steps saw for one plot, kept on the plot's `p` (shared by the cells' shallow copies):
    a sample value per field, so the first cell can check that the cells make a complete merge before any image."""

    sample: dict = dataclasses.field(default_factory=dict)
    checked: bool = False


def _confirm(field: str, check_values: Callable[[list], None] | None = None) -> Callable[[Any, list], None]:
    def confirm(p, values) -> None:
        if check_values is not None:
            check_values(values)
        if p is not None and values:
            axes = getattr(p, AXES_ATTR, None)
            if axes is None:
                axes = PlotAxes()
                setattr(p, AXES_ATTR, axes)
            axes.sample[field] = values[0]
    return confirm


def _set(field: str, check: CheckPlot) -> Callable[[Any, Any, Any], None]:
    def apply(p, value, values) -> None:
        axes = getattr(p, AXES_ATTR, None)
        if axes is not None and not axes.checked:
            # the X/Y/Z script calls every confirm before the first cell and lets an exception from `apply` end the
            # plot (one from the generation itself only leaves a cell empty): refuse here, before any image
            axes.checked = True
            check(p, dict(axes.sample))
        request = getattr(p, REQUEST_ATTR, {})
        if field == "random":  # on X and Y (and Z) at once: every seed is kept, the cell draws from all of them
            value = (*request.get(field, ()), value)
        setattr(p, REQUEST_ATTR, {**request, field: value})
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
                 presets: Callable[[], Presets], check: CheckPlot) -> list[Any]:
    """The AxisOption objects to add; `resolve_model` raises MergeError for an unknown model (used in confirm);
    `check(p, sample)` refuses a plot whose cells cannot make a merge (e.g. no model B anywhere)."""
    AxisOption = xyz.AxisOption

    def models(values) -> None:
        for name in values:
            resolve_model(name)

    def weights(values) -> None:
        for text in values:
            presets().resolve(text)

    def choices(options):
        return lambda: list(options)

    def axis(label, type_, field, check_values=None, **kw):
        return AxisOption(PREFIX + label, type_, _set(field, check), confirm=_confirm(field, check_values), **kw)

    return [
        axis("Model A", str, "model_a", models, cost=1.5, choices=list_models),
        axis("Model B", str, "model_b", models, cost=1.5, choices=list_models),
        axis("Model C", str, "model_c", models, cost=1.5, choices=list_models),
        axis("Merge mode", str, "mode", cost=1.2, choices=choices(MERGE_MODES)),
        axis("Calc mode", str, "calc", cost=1.2, choices=choices(CALC_MODES)),
        axis("Alpha", float, "alpha", cost=1.1),
        axis("Beta", float, "beta", cost=1.1),
        axis("Block weights (| separated)", str, "weights_alpha", weights, cost=1.1, prepare=_split("|")),
        axis("Pinpoint block (BLOCK=value)", str, "pinpoint", cost=1.1, prepare=_pinpoint),
        axis("Elemental (| separated)", str, "elemental", cost=1.1, prepare=_split("|")),
        axis("Method", str, "method", cost=1.2, choices=choices(METHODS)),
        *(axis(name.capitalize(), float, name, cost=1.1) for name in ("density", "drop", "epsilon")),
        axis("Block weights beta (| separated)", str, "weights_beta", weights, cost=1.1, prepare=_split("|")),
        axis("Include blocks (| separated)", str, "include", cost=1.1, prepare=_blocks),
        axis("Exclude blocks (| separated)", str, "exclude", cost=1.1, prepare=_blocks),
        axis("Add include blocks (| separated)", str, "add include", cost=1.1, prepare=_blocks),
        axis("Add exclude blocks (| separated)", str, "add exclude", cost=1.1, prepare=_blocks),
        axis("Add elemental (| separated)", str, "add elemental", cost=1.1, prepare=_split("|")),
        axis("Adjust (| separated)", str, "adjust", cost=1.1, prepare=_split("|")),
        axis("Random weights seed", int, "random", cost=1.1),
        axis("Merge ID", int, "merge ID", cost=1.3),
    ]


def _blocks(text: str) -> list[str]:
    """Cells of space- or comma-separated block names, separated by `|` (e.g. `IN01 IN02 | OUT05`)."""
    return [" ".join(v.replace(",", " ").split()) for v in text.split("|") if v.strip()]


def register(xyz: Any, options: list[Any]) -> bool:
    """Add the axes once (idempotent: the WebUI may call us at import and again in on_before_ui)."""
    if any(getattr(opt, "label", "").startswith(PREFIX) for opt in xyz.axis_options):
        return False
    xyz.axis_options.extend(options)
    return True


#: request fields that are not recipe fields: handled like the tab's plot axes of the same names (core.xyz)
CELL_AXES = {"include": "include blocks", "exclude": "exclude blocks", "add include": "add include",
             "add exclude": "add exclude", "add elemental": "add elemental", "random": "random"}


def requested_recipe(p: Any, base: Recipe | None, default_model_a: str, blocks: tuple[str, ...],
                     logged: Callable[[int], Recipe] | None = None) -> Recipe | None:
    """The recipe a cell asks for: the base recipe (the user's merge; a Merge ID cell: the logged merge) with the
    cell's fields; None if none asked. A random seed draws with the dice settings the base recipe was made with
    (R on every block when it was not a random merge)."""
    fields = dict(getattr(p, REQUEST_ATTR, {}) or {})
    if not fields:
        return None
    pinpoint = fields.pop("pinpoint", None)
    merge_id = fields.pop("merge ID", None)
    cell = {CELL_AXES[k]: fields.pop(k) for k in list(fields) if k in CELL_AXES}
    recipe = base or Recipe(default_model_a)
    if merge_id is not None:
        if logged is None:
            raise MergeError("A Merge ID axis needs the merge history.")
        recipe = logged(int(merge_id))
    recipe = dataclasses.replace(recipe, **fields)
    if cell:
        arch = {len(a.blocks): a for a in (Arch("sd1"), Arch("sdxl"), Arch("flux"))}.get(len(blocks), Arch("sd1"))
        for kind in ("include blocks", "exclude blocks", "add include", "add exclude"):
            if kind in cell:
                cell[kind] = frozenset(expand_blocks(str(cell[kind]).split(), arch.blocks,
                                                     frozenset(INEX_EXTRAS), "Include/Exclude blocks"))
        if "add elemental" in cell:
            cell["add elemental"] = str(cell["add elemental"]).replace("\n", ",")
        random = recipe.extra.get("random")
        spec = spec_from_dict(random) if isinstance(random, dict) else RandomSpec()
        seeds = cell.pop("random", ())  # the seeds of every random axis (`_set` keeps them all)
        pairs = [*cell.items(), *(("random", s) for s in (seeds if isinstance(seeds, tuple) else (seeds,)))]
        recipe, _ = build_cell(recipe, GenParams(), pairs, arch, Presets({}), spec)
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
