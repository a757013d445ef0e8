"""X/Y/Z plots over merges: the seed's axis types and value syntax, cell planning, and the grid image.

Axis texts are parsed into values up front, so a typo is refused before anything merges. Cells are planned from a
base recipe and generation request; the runner merges each distinct recipe once (cells that change only the seed
or the prompt share a merge, whichever axis they are on) and draws one labelled grid per Z value.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .arch import BLOCKS_XL_FINE, Arch
from .errors import MergeError
from .kernels import CALC_MODES, MERGE_MODES
from .methods import METHODS
from .random_weights import RandomSpec
from .random_weights import apply as apply_random
from .recipe import Recipe
from .weights import ADJUST_NAMES, INEX_EXTRAS, Presets, expand_blocks, parse_number, sdxl_from_26

NONE = "none"
AXIS_TYPES = (
    NONE, "alpha", "beta", "alpha and beta", "seed", "mbw alpha", "mbw beta", "mbw alpha and beta",
    "model_A", "model_B", "model_C", "pinpoint blocks", "include blocks", "exclude blocks", "add include",
    "add exclude", "elemental", "add elemental", "pinpoint element", "pinpoint element ext", "effective",
    "adjust", "pinpoint adjust", "calcmode", "merge mode", "prompt", "prompt2", "prompt3", "random", "merge ID",
    "method", "density", "drop", "epsilon", "mbw density", "mbw drop", "mbw epsilon",
)
#: Axes that may appear twice (on X and Y), as in the seed. Random axes on several of X, Y and Z give each cell one
#: weight seed made from the axes' seeds (`cell_seed`).
REPEATABLE = ("add elemental", "random")
#: "random" cells: a random-weight seed each; Run Rand lays more than this many out in rows of this width.
RANDOM_ROW = 10
MAX_RANDOM_CELLS = 1000
#: Axes of the merge methods' parameters (they need a recipe with a method).
METHOD_AXES = ("density", "drop", "epsilon", "mbw density", "mbw drop", "mbw epsilon")
#: Axes whose values are combined with the value of an "alpha" (or "beta") axis in the same cell.
PINPOINT = ("pinpoint blocks", "pinpoint element", "pinpoint element ext", "effective", "pinpoint adjust")
#: Axes that change only what is generated, never the merge.
GENERATION_ONLY = ("seed", "prompt", "prompt2", "prompt3")
#: Axes that set recipe fields directly (pairs set two fields from one value).
RECIPE_FIELDS = {
    "alpha": ("alpha",), "beta": ("beta",), "alpha and beta": ("alpha", "beta"),
    "mbw alpha": ("weights_alpha",), "mbw beta": ("weights_beta",),
    "mbw alpha and beta": ("weights_alpha", "weights_beta"),
    "model_A": ("model_a",), "model_B": ("model_b",), "model_C": ("model_c",),
    "elemental": ("elemental",), "adjust": ("adjust",), "calcmode": ("calc",), "merge mode": ("mode",),
    "method": ("method",), "density": ("density",), "drop": ("drop",), "epsilon": ("epsilon",),
    "mbw density": ("weights_density",), "mbw drop": ("weights_drop",), "mbw epsilon": ("weights_epsilon",),
}


@dataclass(frozen=True)
class GenParams:
    """The per-cell generation settings an axis may change."""

    seed: int = -1
    prompt: str = ""
    prompts: tuple[str, ...] = ()  # prompt3: these prompts, generated as one batch shown in one cell


@dataclass(frozen=True)
class Axis:
    kind: str
    values: tuple  # parsed values, one per cell along this axis
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    x: int
    y: int
    z: int
    recipe: Recipe
    gen: GenParams
    label: str = ""  # a caption of its own (a random cell's weight seed)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _lines(text: str) -> list[str]:
    return [t.strip() for t in text.splitlines() if t.strip()]


def _paragraphs(text: str) -> list[str]:
    """Values separated by blank lines (elemental texts contain commas and newlines)."""
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.strip())
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


#: An axis's text: ten elemental texts at their own limit; anything longer is a paste gone wrong.
MAX_AXIS_TEXT = 100_000


def parse_axis(kind: str, text: str, arch: Arch, presets: Presets, rng: random.Random) -> Axis | None:
    """Parse one axis's text with the seed's syntax; None for an unused axis (type none or blank text)."""
    if kind not in AXIS_TYPES:
        raise MergeError(f"Unknown plot axis type {kind!r}; use one of: {', '.join(AXIS_TYPES)}.")
    text = text or ""
    if kind == NONE or not text.strip():
        return None
    what = f"Plot axis {kind!r}"
    if len(text) > MAX_AXIS_TEXT:
        raise MergeError(f"{what} holds {len(text):,} characters; at most {MAX_AXIS_TEXT:,} are allowed. Shorten it.")
    if kind in ("alpha", "beta", "density", "drop", "epsilon"):
        values = tuple(parse_number(v, what) for v in _csv(text))
        labels = tuple(f"{v:g}" for v in values)
    elif kind == "alpha and beta":
        pairs = []
        for item in _csv(text):
            parts = item.split()
            if len(parts) not in (1, 2):
                raise MergeError(f"{what}: {item!r} must be 'alpha beta' or one number for both.")
            numbers = [parse_number(p, what) for p in parts]
            pairs.append((numbers[0], numbers[-1]))
        values = tuple(pairs)
        labels = tuple(f"{a:g} {b:g}" for a, b in values)
    elif kind == "seed":
        drawn = rng.randrange(2**32)
        values = tuple(drawn if int(parse_number(v, what)) == -1 else int(parse_number(v, what)) for v in _csv(text))
        labels = tuple(str(v) for v in values)
    elif kind in ("mbw alpha", "mbw beta", "mbw density", "mbw drop", "mbw epsilon"):
        values = tuple(presets.resolve(line) for line in _lines(text))
        labels = tuple(_lines(text))
    elif kind == "mbw alpha and beta":
        lines = _lines(text)
        if len(lines) % 2:
            raise MergeError(f"{what}: give lines in pairs (an alpha line, then a beta line); got {len(lines)}.")
        values = tuple((presets.resolve(a), presets.resolve(b)) for a, b in zip(lines[::2], lines[1::2], strict=True))
        labels = tuple(f"alpha:({a}),beta:({b})" for a, b in zip(lines[::2], lines[1::2], strict=True))
    elif kind.startswith("model_"):
        values = labels = tuple(_csv(text))
    elif kind == "pinpoint blocks":
        values = tuple(_block_set(cell, arch, what) for cell in _csv(text))
        labels = tuple(_csv(text))
    elif kind in ("include blocks", "exclude blocks", "add include", "add exclude"):
        values = tuple(_block_set(cell, arch, what, extras=INEX_EXTRAS) for cell in _csv(text))
        labels = tuple(_csv(text))
    elif kind in ("elemental", "add elemental"):
        values = labels = tuple(_paragraphs(text))
    elif kind in ("pinpoint element", "pinpoint element ext", "effective"):
        items = [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]
        for item in items:
            if item.count(":") != 1:
                raise MergeError(f"{what}: {item!r} must be Blocks:Elements (the ratio comes from the alpha axis).")
        if kind == "effective":  # the baseline every other cell is compared with
            items = ["", *items]
        values = tuple(items)
        labels = tuple(item or "baseline" for item in items)
    elif kind == "random":
        values = _random_seeds(text, rng, what)
        labels = tuple(f"seed {v}" for v in values)
    elif kind == "merge ID":
        values = tuple(int(parse_number(v, what)) for v in _csv(text))
        labels = tuple(f"ID {v}" for v in values)
    elif kind in ("prompt2", "prompt3"):
        values = labels = tuple(_paragraphs(text))
    elif kind == "adjust":
        values = labels = tuple(_lines(text))
    elif kind == "pinpoint adjust":
        names = _csv(text)
        for name in names:
            if name not in ADJUST_NAMES:
                raise MergeError(f"{what}: {name!r} is not one of {', '.join(ADJUST_NAMES)}.")
        values = labels = tuple(names)
    elif kind == "calcmode":
        values = labels = tuple(_csv(text))
        for v in values:
            if v not in CALC_MODES:
                raise MergeError(f"{what}: unknown calc mode {v!r}; use {', '.join(CALC_MODES)}.")
    elif kind == "merge mode":
        values = labels = tuple(_csv(text))
        for v in values:
            if v not in MERGE_MODES:
                raise MergeError(f"{what}: unknown merge mode {v!r}; use {', '.join(MERGE_MODES)}.")
    elif kind == "method":
        values = labels = tuple(_csv(text))
        for v in values:
            if v not in METHODS:
                raise MergeError(f"{what}: unknown merge method {v!r}; use {', '.join(METHODS)}.")
    else:  # prompt
        values = labels = tuple(_lines(text))
    if not values:
        raise MergeError(f"{what} has no values.")
    return Axis(kind, tuple(values), tuple(labels))


def _random_seeds(text: str, rng: random.Random, what: str) -> tuple[int, ...]:
    """`N`: N fresh weight seeds; `#s1, #s2, ...`: those seeds (to redo chosen cells)."""
    items = _csv(text)
    if all(item.startswith("#") for item in items):
        seeds = tuple(int(parse_number(item[1:].strip(), what)) for item in items)
        for seed in seeds:
            if not 0 <= seed < 2**32:
                raise MergeError(f"{what}: seed {seed} is not between 0 and {2**32 - 1}.")
        return seeds
    if len(items) != 1:
        raise MergeError(f"{what}: give the number of cells (e.g. 8), or seeds written #123, #456.")
    count = parse_number(items[0], what)
    if count != int(count) or not 1 <= count <= MAX_RANDOM_CELLS:
        raise MergeError(f"{what}: the number of cells must be a whole number from 1 to {MAX_RANDOM_CELLS}.")
    return tuple(rng.randrange(2**32) for _ in range(int(count)))


def _block_set(cell: str, arch: Arch, what: str, extras: Sequence[str] = ()) -> frozenset[str]:
    tokens = cell.split()
    invert = bool(tokens) and tokens[0] == "NOT"
    chosen = set(expand_blocks(tokens[1:] if invert else tokens, arch.blocks, frozenset(extras), what))
    if invert:
        chosen = set(arch.blocks) | set(extras) if extras else set(arch.blocks)
        chosen -= set(expand_blocks(tokens[1:], arch.blocks, frozenset(extras), what))
    return frozenset(chosen)


def check_axes(axes: Sequence[Axis | None]) -> None:
    kinds = [a.kind for a in axes if a is not None]
    for kind in set(kinds) - set(REPEATABLE):
        if kinds.count(kind) > 1:
            raise MergeError(f"The axis type {kind!r} is used twice; each axis type may appear once.")
    for kind in kinds:
        if kind in PINPOINT and not {"alpha", "beta"} & set(kinds):
            raise MergeError(f"A {kind!r} axis takes its ratios from an 'alpha' (or 'beta') axis; add one.")


def _weights(recipe: Recipe, arch: Arch, field: str, base: float, presets: Presets) -> list[str]:
    text = presets.resolve(getattr(recipe, field))
    values = [t.strip() for t in text.split(",")] if text else [f"{base:g}"] * len(arch.blocks)
    if arch.is_sdxl and len(values) == 26:
        values = sdxl_from_26(values)
    if len(values) == len(BLOCKS_XL_FINE):
        raise MergeError("pinpoint blocks addresses the 20 SDXL blocks; with the 110 extended weights, plot "
                         "'mbw alpha' lines instead.")
    return values


def build_cell(base: Recipe, gen: GenParams, chosen: Mapping[str, object] | Sequence[tuple[str, object]],
               arch: Arch, presets: Presets, random_spec: RandomSpec | None = None,
               logged: Callable[[int], Recipe] | None = None) -> tuple[Recipe, GenParams]:
    """Apply one cell's axis values (kind -> value, or (kind, value) pairs where an axis type repeats) to the base
    recipe and generation settings. A merge ID replaces the base with the logged recipe (`logged`) first; a random
    seed draws the block weights with `random_spec` last."""
    pairs = list(chosen.items()) if isinstance(chosen, Mapping) else list(chosen)
    chosen = dict(pairs)
    if "merge ID" in chosen:
        if logged is None:
            raise MergeError("A 'merge ID' axis needs the merge history.")
        base = logged(chosen["merge ID"])
    fields: dict[str, object] = {}
    pinpoints = {k: v for k, v in chosen.items() if k in PINPOINT}
    ratio_kind = "alpha" if "alpha" in chosen else "beta"
    added = [v for k, v in pairs if k == "add elemental"]
    for kind, value in chosen.items():
        if kind in PINPOINT or (pinpoints and kind == ratio_kind) or kind in ("merge ID", "random", "add elemental"):
            continue
        if kind in ("prompt", "prompt2"):
            gen = dataclasses.replace(gen, prompt=value)
        elif kind == "prompt3":
            gen = dataclasses.replace(gen, prompts=tuple(_lines(value)))
        elif kind in GENERATION_ONLY:
            gen = dataclasses.replace(gen, **{kind: value})
        elif kind in RECIPE_FIELDS:
            names = RECIPE_FIELDS[kind]
            fields.update(zip(names, value if len(names) > 1 else (value,), strict=True))
        elif kind in ("add include", "add exclude"):  # added to the base's own selection
            fields["inex"] = "Include" if kind == "add include" else "Exclude"
            fields["inex_blocks"] = tuple(sorted(set(base.inex_blocks) | set(value)))
        else:  # include / exclude blocks
            fields["inex"] = "Include" if kind == "include blocks" else "Exclude"
            fields["inex_blocks"] = tuple(sorted(value))
    if added:
        fields["elemental"] = ",".join(filter(None, [str(fields.get("elemental", base.elemental)).strip(),
                                                     *(a.replace("\n", ",") for a in added)]))
    recipe = dataclasses.replace(base, **fields)
    seeds = [v for k, v in pairs if k == "random"]
    if seeds:
        recipe = apply_random(recipe, random_spec or RandomSpec(), cell_seed(seeds), arch, presets)
    ratio = chosen.get(ratio_kind)
    if "pinpoint blocks" in pinpoints:
        field = "weights_alpha" if ratio_kind == "alpha" else "weights_beta"
        base_ratio = recipe.alpha if ratio_kind == "alpha" else recipe.beta
        values = _weights(recipe, arch, field, base_ratio, presets)
        for i, label in enumerate(arch.blocks):
            if label in pinpoints["pinpoint blocks"]:
                values[i] = f"{ratio:g}"
        extra = {field: ",".join(values)}
        if field == "weights_beta" and not recipe.mbw:
            extra["weights_alpha"] = ",".join(_weights(recipe, arch, "weights_alpha", recipe.alpha, presets))
        recipe = dataclasses.replace(recipe, **extra)
    element = next((pinpoints[k] for k in ("pinpoint element", "pinpoint element ext", "effective") if k in pinpoints),
                   "")
    if element:  # (the effective axis's baseline cell adds nothing)
        entry = f"{element}:{ratio:g}"
        recipe = dataclasses.replace(recipe, elemental=",".join(filter(None, [recipe.elemental.strip(), entry])))
    if "pinpoint adjust" in pinpoints:
        values = [t.strip() for t in recipe.adjust.split(",")] if recipe.adjust.strip() else ["0"] * 8
        values[ADJUST_NAMES.index(pinpoints["pinpoint adjust"])] = f"{ratio:g}"
        recipe = dataclasses.replace(recipe, adjust=",".join(values))
    return recipe, gen


def plan_cells(base: Recipe, gen: GenParams, axes: Sequence[Axis | None], arch: Arch, presets: Presets,
               random_spec: RandomSpec | None = None, logged: Callable[[int], Recipe] | None = None) -> list[Cell]:
    """Every cell, z outermost then y then x, with its recipe validated (a bad combination fails before merging).

    A lone "random" axis of more than RANDOM_ROW cells is laid out in rows of RANDOM_ROW (the seed's Run Rand);
    random cells carry their seed as their own label."""
    check_axes(axes)
    kinds = {a.kind for a in axes if a is not None}
    if "alpha" in kinds and not kinds & set(PINPOINT) and base.mbw and not kinds & {"mbw alpha", "mbw alpha and beta"}:
        raise MergeError("An 'alpha' plot axis has no effect while block weights (MBW) are on, since their first "
                         "value replaces alpha: turn MBW off, or plot 'mbw alpha' or 'pinpoint blocks'.")
    x_axis, y_axis, z_axis = (list(axes) + [None, None, None])[:3]
    cells = []
    for zi, z in enumerate(z_axis.values if z_axis else (None,)):
        for yi, y in enumerate(y_axis.values if y_axis else (None,)):
            for xi, x in enumerate(x_axis.values if x_axis else (None,)):
                chosen = [(a.kind, v) for a, v in ((x_axis, x), (y_axis, y), (z_axis, z)) if a is not None]
                recipe, cell_gen = build_cell(base, gen, chosen, arch, presets, random_spec, logged)
                here = {k for k, _ in chosen}
                try:
                    recipe = recipe.validate(presets)
                    if set(METHOD_AXES) & here and not recipe.method:
                        raise MergeError("density, drop and epsilon belong to the merge methods (ties, dare, "
                                         "della...); choose a method to plot them.")
                    if {"beta", "alpha and beta"} & here and "pinpoint blocks" not in here \
                            and not recipe.uses_beta:
                        raise MergeError(f"beta has no effect in {recipe.mode} with calc mode {recipe.calc}; plot "
                                         f"beta with Triple sum, sum Twice, tensor, tensor2 or extract.")
                except MergeError as e:
                    raise MergeError(f"Plot cell {_cell_name(axes, xi, yi, zi)}: {e}") from None
                seeds = [v for k, v in chosen if k == "random"]
                label = f"seed {cell_seed(seeds)}" if seeds else ""
                cells.append(Cell(xi, yi, zi, recipe, cell_gen, label))
    if is_run_rand(axes) and len(cells) > RANDOM_ROW:
        cells = [dataclasses.replace(c, x=c.x % RANDOM_ROW, y=c.x // RANDOM_ROW) for c in cells]
    return cells


def cell_seed(seeds: Sequence[int]) -> int:
    """A random cell's weight seed: its axis's seed or, with random axes on two or three of X, Y and Z, one seed
    made from theirs (in X, Y, Z order) by numpy's SeedSequence, so every cell of the grid draws its own weights and
    the same axes give the same cells again. The cell's label shows the result; a random merge with it alone
    reproduces the cell."""
    if len(seeds) == 1:
        return int(seeds[0])
    return int(np.random.SeedSequence([int(s) for s in seeds]).generate_state(1, np.uint32)[0])


def is_run_rand(axes: Sequence[Axis | None]) -> bool:
    """A plot of random cells only (X random, no Y or Z): drawn as rows of RANDOM_ROW with per-cell labels."""
    used = [a for a in axes if a is not None]
    return len(used) == 1 and axes[0] is not None and axes[0].kind == "random"


def _cell_name(axes: Sequence[Axis | None], *index: int) -> str:
    parts = [f"{a.kind}={a.labels[i]}" for a, i in zip(axes, index, strict=False) if a is not None]
    return ", ".join(parts) or "(single cell)"


def merge_order(cells: Sequence[Cell]) -> list[list[Cell]]:
    """Cells grouped by recipe, groups in first-appearance order: each distinct recipe is merged exactly once."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.recipe.fingerprint(), []).append(cell)
    return list(groups.values())


# -- the grid image ----------------------------------------------------------------------------------------------

def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.replace(",", ", ").split(" "):
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def axis_label(axis: Axis | None, index: int) -> str:
    if axis is None:
        return ""
    return f"{axis.kind} = {axis.labels[index]}" if index == 0 else axis.labels[index]


def draw_grid(images: dict[tuple[int, int], Image.Image], x_axis: Axis | None, y_axis: Axis | None, title: str,
              caption: str, cell_size: tuple[int, int], cell_labels: Mapping[tuple[int, int], str] | None = None,
              shape: tuple[int, int] | None = None) -> Image.Image:
    """One grid: X labels on top, Y labels on the left, the Z value as a title and the merge formula below.
    `cell_labels` puts a caption above each cell (a random cell's seed); `shape` (columns, rows) overrides the
    axes' counts (Run Rand's rows). Missing cells (a stopped plot) stay black."""
    cols = shape[0] if shape else len(x_axis.values) if x_axis else 1
    rows = shape[1] if shape else len(y_axis.values) if y_axis else 1
    w, h = cell_size
    font_size = max(12, min(28, (w + h) // 25))
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font_size + 4
    x_lines = [_wrap(probe, axis_label(x_axis, i), font, w - 8) for i in range(cols)] if x_axis and not shape \
        else [[]]
    own = {pos: _wrap(probe, text, font, w - 8) for pos, text in (cell_labels or {}).items() if text}
    strip = line_h * max(len(v) for v in own.values()) + 4 if own else 0
    top_h = line_h * max(len(v) for v in x_lines) + 8 if x_axis and not shape else 0
    left_w = (w * 3) // 4 if y_axis else 0
    y_lines = [_wrap(probe, axis_label(y_axis, j), font, left_w - 8) for j in range(rows)] if y_axis else []
    title_lines = _wrap(probe, title, font, cols * w + left_w - 16) if title else []
    title_h = line_h * len(title_lines) + (8 if title_lines else 0)
    caption_lines = _wrap(probe, caption, font, cols * w + left_w - 16) if caption else []
    caption_h = line_h * len(caption_lines) + (8 if caption_lines else 0)
    row_h = h + strip
    grid = Image.new("RGB", (left_w + cols * w, title_h + top_h + rows * row_h + caption_h), "white")
    draw = ImageDraw.Draw(grid)
    for k, line in enumerate(title_lines):
        draw.text((8, 4 + k * line_h), line, fill="black", font=font)
    for i, lines in enumerate(x_lines):
        for k, line in enumerate(lines):
            tw = draw.textlength(line, font=font)
            draw.text((left_w + i * w + (w - tw) / 2, title_h + 4 + k * line_h), line, fill="black", font=font)
    for j, lines in enumerate(y_lines):
        y0 = title_h + top_h + j * row_h + strip + (h - line_h * len(lines)) / 2
        for k, line in enumerate(lines):
            tw = draw.textlength(line, font=font)
            draw.text(((left_w - tw) / 2, y0 + k * line_h), line, fill="black", font=font)
    for j in range(rows):
        for i in range(cols):
            box = (left_w + i * w, title_h + top_h + j * row_h + strip)
            for k, line in enumerate(own.get((i, j), ())):
                tw = draw.textlength(line, font=font)
                draw.text((box[0] + (w - tw) / 2, box[1] - strip + 2 + k * line_h), line, fill="black", font=font)
            image = images.get((i, j))
            if image is None:
                draw.rectangle((*box, box[0] + w - 1, box[1] + h - 1), fill="black")
            else:
                grid.paste(image.convert("RGB").resize((w, h)), box)
    for k, line in enumerate(caption_lines):
        draw.text((8, title_h + top_h + rows * row_h + 4 + k * line_h), line, fill="black", font=font)
    return grid

