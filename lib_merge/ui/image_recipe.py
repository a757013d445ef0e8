"""IDs from images: the merge recipe of a generated PNG, read back from its infotext (PNG text `parameters`).

Two writers are understood:
- Block Merger writes the whole recipe as JSON in `Merge recipe: "{...}"` (the WebUI quotes values holding commas
  or colons with JSON string quoting), beside `Merge: <name>`;
- SuperMerger writes only a merge ID: `Model: <merge name> ID <n>`; the recipe is row <n> of SuperMerger's own
  `mergehistory.csv` (23 columns, seed-behaviour §6.4), which is read when its path is known.

The seed takes the text after the last " ID " whatever it is (an image without one gives its prompt) and fails the
whole call on an image without infotext; here each case is a clear message.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import MergeError
from ..core.kernels import CALC_MODES, MERGE_MODES
from ..core.recipe import Recipe
from ..service.merge_service import INFOTEXT_FAILED, INFOTEXT_MERGE, INFOTEXT_RECIPE
from . import values as uv

#: one `Name: value` of an infotext's parameter line; a value is a JSON-quoted string or runs to the next comma
_PARAM = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SUPERMERGER_ID = re.compile(r"\sID (\d+)\s*$")
#: SuperMerger's history columns (seed-behaviour §6.4; its own header names are stale), the ones a recipe needs
SM_COLUMNS = {"id": 0, "name": 2, "weights_alpha": 3, "weights_beta": 4, "model_a": 5, "model_b": 6, "model_c": 7,
              "alpha": 8, "beta": 9, "mode": 10, "use_mbw": 11, "elemental": 15, "calc": 16, "seed": 17,
              "adjust": 18, "gamma": 19, "inex": 20, "inex_blocks": 21, "inex_elements": 22}


@dataclass(frozen=True)
class ImageRecipe:
    """What an image says about its merge: widget values to fill the Merge tab with, and where they came from."""

    values: dict[str, Any]
    source: str  # one line for the message: "Block Merger recipe of <name>", "SuperMerger merge ID 12 (...)"
    notes: tuple[str, ...] = ()  # what could not be matched (a model hash not found among the models)


def infotext_of(info: Mapping[str, Any]) -> str:
    """The infotext of an opened PNG (PIL's `image.info`); MergeError when it carries none."""
    text = info.get("parameters")
    if not isinstance(text, str) or not text.strip():
        raise MergeError("This image has no generation info (no PNG text \"parameters\"): it was not saved by the "
                         "WebUI with its infotext, or it was converted since. Use the PNG file the WebUI saved.")
    return text


def parse_parameters(infotext: str) -> dict[str, str]:
    """The `Name: value` parameters of an infotext's last line, JSON-quoted values unquoted."""
    last = infotext.strip().splitlines()[-1]
    params: dict[str, str] = {}
    for name, value in _PARAM.findall(last):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass  # not JSON quoting after all: keep the text
        params[name.strip()] = value
    return params


def recipe_of_image(info: Mapping[str, Any], supermerger_history: Path | None = None,
                    model_names: Sequence[str] = ()) -> ImageRecipe:
    """The merge recipe of a PNG's infotext as Merge-tab widget values (MergeError saying why there is none)."""
    params = parse_parameters(infotext_of(info))
    if INFOTEXT_RECIPE in params:
        try:
            recipe = Recipe.from_json(params[INFOTEXT_RECIPE])
        except MergeError as e:
            raise MergeError(f"The image's Block Merger recipe cannot be read: {e}") from e
        name = params.get(INFOTEXT_MERGE) or recipe.title()
        return ImageRecipe(uv.values_from_recipe(recipe.to_dict()), f"the Block Merger recipe of {name}")
    match = _SUPERMERGER_ID.search(params.get("Model", ""))
    if match:
        return _supermerger(int(match.group(1)), params["Model"][:match.start()].strip(), supermerger_history,
                            model_names)
    if INFOTEXT_FAILED in params:
        raise MergeError(f"This image was generated after a merge failed ({params[INFOTEXT_FAILED]}), so no merge "
                         "recipe is recorded in it.")
    raise MergeError("This image carries no merge recipe: its infotext has neither Block Merger's \"Merge recipe\" "
                     "nor SuperMerger's \"Model: ... ID n\" (it was generated with a plain checkpoint, or before "
                     "any merge was loaded).")


def _supermerger(merge_id: int, name: str, history: Path | None, model_names: Sequence[str]) -> ImageRecipe:
    where = f"SuperMerger merge ID {merge_id} ({name})"
    if history is None or not str(history).strip():
        raise MergeError(f"This image was made by {where}. Its recipe is in SuperMerger's mergehistory.csv: give "
                         "that file's path (in the SuperMerger history field) to read it.")
    row = supermerger_row(Path(history), merge_id)
    values, notes = values_from_supermerger(row, lambda short: match_model(short, model_names))
    return ImageRecipe(values, where, tuple(notes))


def supermerger_row(path: Path, merge_id: int) -> list[str]:
    """Row `merge_id` of SuperMerger's history CSV (the row whose first cell is the ID)."""
    try:
        with path.open(encoding="utf-8", newline="") as f:
            for row in csv.reader(f):
                if row and row[0].strip() == str(merge_id):
                    if len(row) < len(SM_COLUMNS) + 4:
                        raise MergeError(f"Merge ID {merge_id} in {path} has {len(row)} columns, not SuperMerger's "
                                         f"23: the file is not SuperMerger's merge history.")
                    return row
    except OSError as e:
        raise MergeError(f"Cannot read SuperMerger's history {path}: {e.strerror or e}.") from e
    except (csv.Error, UnicodeDecodeError) as e:
        raise MergeError(f"{path} is not a readable CSV file ({e}).") from e
    raise MergeError(f"Merge ID {merge_id} is not in {path}: the image comes from another SuperMerger history.")


def match_model(short_hash: str, names: Sequence[str]) -> str | None:
    """The model title holding `[short_hash]` (the WebUI's titles end with their short hash), or None."""
    short_hash = short_hash.strip().lower()
    if not short_hash:
        return None
    return next((n for n in names if f"[{short_hash}]" in n.lower()), None)


def _list_cell(text: str) -> list[str]:
    """A Python list repr as SuperMerger writes it (`['IN01', 'OUT02']`) -> its items."""
    return [item.strip().strip("'\"") for item in text.strip().strip("[]").split(",") if item.strip().strip("'\"")]


def values_from_supermerger(row: Sequence[str], find_model: Callable[[str], str | None],
                            ) -> tuple[dict[str, Any], list[str]]:
    """A SuperMerger history row -> (Merge-tab widget values, notes on what could not be matched)."""
    cell = {name: row[i].strip() for name, i in SM_COLUMNS.items()}
    notes = []
    models = {}
    for key in ("model_a", "model_b", "model_c"):
        short = cell[key]
        found = find_model(short) if short else None
        if short and found is None:
            notes.append(f"{key.replace('_', ' ').title()} (hash {short}) is not among the models; choose it.")
        models[key] = found or ""
    mode = cell["mode"].split(":", 1)[0].strip()
    if mode not in MERGE_MODES:
        raise MergeError(f"SuperMerger merge mode {mode!r} is unknown here (known: {', '.join(MERGE_MODES)}).")
    calc = cell["calc"] if cell["calc"] in CALC_MODES else "normal"
    if cell["calc"] and calc != cell["calc"]:
        notes.append(f"Calc mode {cell['calc']!r} is unknown here; normal is set.")
    weights = {k: _drop_xl_padding(cell[k]) for k in ("weights_alpha", "weights_beta")}
    block_type = uv.SDXL if len(uv.weight_tokens(weights["weights_alpha"])) == 20 else uv.SD1
    inex = cell["inex"] if cell["inex"] in ("Off", "Include", "Exclude") else "Off"
    values = {
        **models, "mode": mode, "calc": calc, "alpha": _float(cell["alpha"], 0.5), "beta": _float(cell["beta"], 0.25),
        "use_mbw": cell["use_mbw"].lower() == "true", **weights, "block_type": block_type,
        "elemental": cell["elemental"], "adjust": cell["adjust"], "inex": inex,
        "inex_blocks": _list_cell(cell["inex_blocks"]) if inex != "Off" else [],
        "inex_elements": ",".join(_list_cell(cell["inex_elements"])) if inex != "Off" else "",
        "gamma": _float(cell["gamma"], 0.3), "seed": int(_float(cell["seed"], -1)),
    }
    return values, notes


def _drop_xl_padding(text: str) -> str:
    """SuperMerger logs SDXL weights with a 21st padding 0 (its VAE slot, #467): the 20 block values remain."""
    tokens = uv.weight_tokens(text)
    return ",".join(tokens[:20]) if len(tokens) == 21 else text


def _float(text: str, default: float) -> float:
    value = uv.number_or_none(text)
    return default if value is None else value
