"""The "effective" plot axis's files: an animated GIF per compared cell and a CSV of the differences.

The seed's effective checker ("save anime gif", "save csv") writes, for every cell compared with the baseline, a
two-frame GIF (the baseline, then the cell; one second each, looping) so a flip shows what the elemental change did,
and appends "label, changed %" rows to one CSV per model pair. Here both are written beside the plot's saved grid,
named after it (so one plot's files sit together and never mix with another's), atomically; the CSV has a header
and says which cell each row is and which baseline it was compared with, and is a new file per plot, not appended.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..io.write import atomic_output

FRAME_MS = 1000
CSV_HEADER = ("x", "y", "z", "cell", "baseline", "changed %")


@dataclass(frozen=True)
class Difference:
    """One cell compared with its baseline cell: grid positions, labels and the changed share in percent."""

    pos: tuple[int, int, int]
    base: tuple[int, int, int]
    label: str
    base_label: str
    changed: float


def _safe(text: str) -> str:
    return re.sub(r"[^\w.+=-]+", "_", text).strip("_")[:60] or "cell"


def save_gif(frames: Sequence[Image.Image], path: Path) -> Path:
    """An animated GIF of `frames` (all at the first frame's size), FRAME_MS each, looping; written atomically."""
    size = frames[0].size
    rgb = [f.convert("RGB").resize(size) for f in frames]
    with atomic_output(path) as tmp:
        rgb[0].save(tmp, format="GIF", save_all=True, append_images=rgb[1:], duration=FRAME_MS, loop=0,
                    optimize=False)
    return path


def save_differences_csv(differences: Sequence[Difference], path: Path) -> Path:
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_HEADER)
            for d in differences:
                writer.writerow([*d.pos, d.label, d.base_label, repr(d.changed)])
    return path


def save_effective_files(grid_path: Path, differences: Sequence[Difference],
                         images: dict[tuple[int, int, int], Image.Image]) -> list[Path]:
    """Beside the saved grid `<stem>.<ext>`: `<stem>-effective.csv` and `<stem>-effective-<n>-<cell>.gif` per
    compared cell. The paths written."""
    folder, stem = grid_path.parent, grid_path.stem
    written = [save_differences_csv(differences, folder / f"{stem}-effective.csv")]
    for n, d in enumerate(differences, 1):
        written.append(save_gif([images[d.base], images[d.pos]], folder / f"{stem}-effective-{n}-{_safe(d.label)}.gif"))
    return written
