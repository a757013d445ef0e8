"""Running an X/Y/Z plot in the tab: merge each distinct recipe once, generate every cell, draw one grid per Z.

Each cell is its merge with the LoRAs the user baked into the loaded model (if any) baked again on top. Stop ends
the plot after the current cell and keeps the finished part. Afterwards the model is put back the way it
was (the merge that was loaded, or the base checkpoint).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.engine import ScratchPool
from ..core.errors import MergeError
from ..core.random_weights import RandomSpec
from ..core.recipe import Recipe
from ..core.xyz import (
    RANDOM_ROW,
    Axis,
    Cell,
    GenParams,
    axis_label,
    draw_grid,
    is_run_rand,
    merge_order,
    parse_axis,
    plan_cells,
)
from ..hosts.base import GenerationRequest
from ..service.merge_service import MergeService
from .effective_files import Difference, save_effective_files


@dataclass
class PlotResult:
    grids: list[Image.Image]
    saved: list[Path]
    cells_done: int
    cells_total: int
    merges: int
    stopped: bool
    info: str = ""  # for the tab's "Generation info": what the grid shows, and the first cell's infotext

    def message(self) -> str:
        state = "stopped after" if self.stopped else "finished:"
        return (f"X/Y/Z plot {state} {self.cells_done} of {self.cells_total} cells, {self.merges} merges, "
                f"{len(self.grids)} grid(s).")


def parse_axes(service: MergeService, base_recipe, specs: Sequence[tuple[str, str]], seed: int | None = None) \
        -> tuple[list[Axis | None], object]:
    """Parse (type, text) for X, Y, Z against model A's architecture (a merge ID axis: the first logged merge's)."""
    ids = next((text for kind, text in specs if kind == "merge ID" and (text or "").strip()), "")
    if ids:
        first = ids.split(",")[0].strip()
        try:
            base_recipe = logged_recipe(service)(int(first))
        except ValueError:
            raise MergeError(f"Plot axis 'merge ID': {first!r} is not a merge ID (a whole number).") from None
    plan, _ = service.plan(base_recipe)
    rng = random.Random(seed)
    return [parse_axis(kind, text, plan.arch, service.presets, rng) for kind, text in specs], plan.arch


def caption_for(base_recipe, axes: Sequence[Axis | None]) -> str:
    varied = ", ".join(f"{name}: {a.kind}" for name, a in zip("XYZ", axes, strict=False) if a is not None)
    return f"{base_recipe.title()}  |  {varied}" if varied else base_recipe.title()


def logged_recipe(service: MergeService):
    """A merge ID -> the recipe the history logged for it (everything is replayed: the log holds whole recipes)."""
    history = service.history()

    def get(merge_id: int) -> Recipe:
        return Recipe.from_dict(dict(history.recipe(merge_id)))
    return get


def run_plot(service: MergeService, base_recipe, request: GenerationRequest, specs: Sequence[tuple[str, str]],
             random_spec: RandomSpec | None = None) -> PlotResult:
    """Plot in the tab (the caller holds the host's lock and job). `random_spec` draws the "random" cells."""
    host = service.host
    axes, arch = parse_axes(service, base_recipe, specs)
    gen = GenParams(seed=request.seed if request.seed != -1 else random.randrange(2**32), prompt=request.prompt)
    cells = plan_cells(base_recipe, gen, axes, arch, service.presets, random_spec, logged_recipe(service))
    images: dict[tuple[int, int, int], Image.Image] = {}
    first_info = ""
    merges, done, stopped = 0, 0, False
    scratch = ScratchPool()  # buffers kept from cell to cell: a small re-merge touches no fresh memory
    try:
        for group in merge_order(cells):
            if host.interrupted():
                stopped = True
                break
            outcome = service.merge_transient(group[0].recipe, scratch=scratch)
            merges += 1
            for cell in group:
                if host.interrupted():
                    stopped = True
                    break
                image, result = _generate_cell(service, request, cell)
                if image is None:  # the host was interrupted inside generation
                    stopped = True
                    break
                images[(cell.x, cell.y, cell.z)] = image
                first_info = first_info or (result.infotexts[0] if result.infotexts else "")
                done += 1
                host.progress(done, len(cells), f"X/Y/Z plot: {outcome.identity.name}")
            if stopped:
                break
    finally:
        service.reconcile(None)  # back to the user's own choice: their merge, or the base checkpoint
    grids, saved, note = _grids(cells, images, axes, base_recipe, host)
    seeds = [f"({c.x},{c.y}) {c.label}: merge {c.recipe.fingerprint()[:10]}" for c in cells if c.label]
    info = "\n".join(t for t in (caption_for(base_recipe, axes), "\n".join(seeds), note,
                                 first_info and f"First cell: {first_info}") if t)
    return PlotResult(grids, saved, done, len(cells), merges, stopped, info)


def _request(request: GenerationRequest, cell: Cell) -> GenerationRequest:
    """A cell's request: its seed and prompt, one batch (txt2img's batch count is not a plot's); a prompt3 cell's
    prompts as one batch of them."""
    return dataclasses.replace(request, seed=cell.gen.seed, prompt=cell.gen.prompt, batch_count=1,
                               prompts=tuple(cell.gen.prompts))


def _generate_cell(service: MergeService, request: GenerationRequest, cell: Cell):
    """(the cell's image, the generation result); a prompt3 cell is one batch of its prompts, shown side by side
    as one image (the batch's own images, not the WebUI's grid of them). (None, result) when the host was
    interrupted. (Another cell shows the first image, which is the WebUI's grid when batch size > 1.)"""
    result = service.generate(_request(request, cell))
    if not cell.gen.prompts:
        return (result.images[0] if result.images else None), result
    images = result.images[result.first_image:]
    wanted = len(cell.gen.prompts)
    if len(images) < wanted:
        return None, result
    w, h = images[0].size
    strip = Image.new("RGB", (w * wanted, h), "black")
    for i, image in enumerate(images[:wanted]):
        strip.paste(image.convert("RGB").resize((w, h)), (i * w, 0))
    return strip, result


#: the effective checker: a pixel counts as changed when a channel differs from the baseline's by more than this
DIFF_THRESHOLD = 20


def changed_share(image: Image.Image, baseline: Image.Image) -> tuple[float, Image.Image]:
    """(percent of pixels that differ from the baseline by more than DIFF_THRESHOLD in any channel, the inverted
    difference image), the seed's "effective" check."""
    a = np.asarray(image.convert("RGB").resize(baseline.size), dtype=np.int16)
    b = np.asarray(baseline.convert("RGB"), dtype=np.int16)
    diff = np.abs(a - b)
    changed = (diff > DIFF_THRESHOLD).any(axis=2)
    return 100.0 * float(changed.mean()), Image.fromarray((255 - diff).astype(np.uint8))


def _cell_name(axes, pos) -> str:
    return ", ".join(f"{a.kind} {a.labels[i]}" for a, i in zip(axes, pos, strict=False) if a is not None)


def _effective(cells, images, axes) -> tuple[dict, dict, list[Difference]]:
    """For an "effective" axis: per cell, the changed share against the baseline cell of its row/column, the
    inverted difference images (keyed like `images`), and the comparisons made, in cell order."""
    index = next((i for i, a in enumerate(axes) if a is not None and a.kind == "effective"), None)
    labels, diffs, found = {}, {}, []
    if index is None:
        return labels, diffs, found
    for cell in cells:
        pos = (cell.x, cell.y, cell.z)
        base = list(pos)
        base[index] = 0
        if pos == tuple(base) or pos not in images or tuple(base) not in images:
            continue
        share, diff = changed_share(images[pos], images[tuple(base)])
        labels[pos] = f"Diff: {share:.1f}%"
        diffs[pos] = diff
        found.append(Difference(pos, tuple(base), _cell_name(axes, pos), _cell_name(axes, base), share))
    return labels, diffs, found


def _grids(cells, images, axes, base_recipe, host) -> tuple[list[Image.Image], list[Path], str]:
    """(the grids, the files saved, a note on the effective check's files); an "effective" axis's GIFs and CSV
    are saved beside the first grid when the host saves grids."""
    if not images:
        return [], [], ""
    x_axis, y_axis, z_axis = (list(axes) + [None, None, None])[:3]
    size = next(iter(images.values())).size
    own = {(c.x, c.y, c.z): c.label for c in cells if c.label}
    diff_labels, diffs, differences = _effective(cells, images, axes)
    for pos, text in diff_labels.items():
        own[pos] = "\n".join(filter(None, [own.get(pos, ""), text]))
    shape = None
    if is_run_rand(axes):
        count = len(cells)
        shape = (min(count, RANDOM_ROW), -(-count // RANDOM_ROW))
    caption = caption_for(base_recipe, axes)
    grids, saved = [], []
    for layer_images, what in ((images, ""), (diffs, "differences from the baseline (inverted)")):
        for z in sorted({c.z for c in cells}):
            layer = {(x, y): image for (x, y, zz), image in layer_images.items() if zz == z}
            if not layer:
                continue
            title = "  ".join(filter(None, [axis_label(z_axis, z) if z_axis else "", what]))
            labels = {(x, y): text for (x, y, zz), text in own.items() if zz == z}
            grid = draw_grid(layer, x_axis, y_axis, title, caption, size, labels or None, shape)
            grids.append(grid)
            path = host.save_grid(grid, caption)
            if path is not None:
                saved.append(path)
    note = ""
    if differences and saved:
        try:
            files = save_effective_files(saved[0], differences, images)
        except (MergeError, OSError) as e:  # the plot's grids are kept; only these files are missing
            note = f"The effective check's GIFs and CSV were not saved: {e}"
        else:
            saved += files
            note = f"Effective check: {len(files) - 1} GIFs and {files[0].name} beside {saved[0].name}"
    elif differences:
        note = "Effective check: no GIFs or CSV, as grids are not saved (the WebUI's grid saving is off)"
    return grids, saved, note
