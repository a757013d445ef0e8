"""Running an X/Y/Z plot in the tab: merge each distinct recipe once, generate every cell, draw one grid per Z.

Stop ends the plot after the current cell and keeps the finished part. Afterwards the model is put back the way it
was (the merge that was loaded, or the base checkpoint).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..core.engine import ScratchPool
from ..core.xyz import Axis, Cell, GenParams, axis_label, draw_grid, merge_order, parse_axis, plan_cells
from ..hosts.base import GenerationRequest
from ..service.merge_service import MergeService


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
    """Parse (type, text) for X, Y, Z against model A's architecture."""
    plan, _ = service.plan(base_recipe)
    rng = random.Random(seed)
    return [parse_axis(kind, text, plan.arch, service.presets, rng) for kind, text in specs], plan.arch


def caption_for(base_recipe, axes: Sequence[Axis | None]) -> str:
    varied = ", ".join(f"{name}: {a.kind}" for name, a in zip("XYZ", axes, strict=False) if a is not None)
    return f"{base_recipe.title()}  |  {varied}" if varied else base_recipe.title()


def run_plot(service: MergeService, base_recipe, request: GenerationRequest, specs: Sequence[tuple[str, str]]) \
        -> PlotResult:
    """Plot in the tab (the caller holds the host's lock and job)."""
    host = service.host
    axes, arch = parse_axes(service, base_recipe, specs)
    gen = GenParams(seed=request.seed if request.seed != -1 else random.randrange(2**32), prompt=request.prompt)
    cells = plan_cells(base_recipe, gen, axes, arch, service.presets)
    images: dict[tuple[int, int, int], Image.Image] = {}
    first_info = ""
    merges, done, stopped = 0, 0, False
    scratch = ScratchPool()  # buffers kept from cell to cell: a small re-merge touches no fresh memory
    try:
        for group in merge_order(cells):
            if host.interrupted():
                stopped = True
                break
            outcome = service.merge_and_load(group[0].recipe, commit=False, scratch=scratch)
            merges += 1
            for cell in group:
                if host.interrupted():
                    stopped = True
                    break
                result = service.generate(_request(request, cell))
                if not result.images:  # the host was interrupted inside generation
                    stopped = True
                    break
                images[(cell.x, cell.y, cell.z)] = result.images[0]
                first_info = first_info or (result.infotexts[0] if result.infotexts else "")
                done += 1
                host.progress(done, len(cells), f"X/Y/Z plot: {outcome.identity.name}")
            if stopped:
                break
    finally:
        service.reconcile(None)  # back to the user's own choice: their merge, or the base checkpoint
    grids, saved = _grids(cells, images, axes, base_recipe, host)
    info = "\n".join(t for t in (caption_for(base_recipe, axes), first_info and f"First cell: {first_info}") if t)
    return PlotResult(grids, saved, done, len(cells), merges, stopped, info)


def _request(request: GenerationRequest, cell: Cell) -> GenerationRequest:
    """A cell's request: its seed and prompt, one batch (txt2img's batch count is not a plot's)."""
    return dataclasses.replace(request, seed=cell.gen.seed, prompt=cell.gen.prompt, batch_count=1)


def _grids(cells, images, axes, base_recipe, host) -> tuple[list[Image.Image], list[Path]]:
    if not images:
        return [], []
    x_axis, y_axis, z_axis = (list(axes) + [None, None, None])[:3]
    size = next(iter(images.values())).size
    grids, saved = [], []
    for z in sorted({c.z for c in cells}):
        title = axis_label(z_axis, z) if z_axis else ""
        layer = {(x, y): image for (x, y, zz), image in images.items() if zz == z}
        grid = draw_grid(layer, x_axis, y_axis, title, caption_for(base_recipe, axes), size)
        grids.append(grid)
        path = host.save_grid(grid, caption_for(base_recipe, axes))
        if path is not None:
            saved.append(path)
    return grids, saved
