"""LoRA block weights: `name:ratio[:blocks]` specs, LoRA Block Weight presets, and the 12/17/20/26 expansion.

The expansion is the seed's (and the LoRA Block Weight extension's) `to26`: value i goes to the slot of label i of
the list for that count, and slots not listed get 0 (seed-lora-analysis.md §2.1). Unlike the seed, the ratio
multiplies literal values too (the seed ignores it there, its issue #463), unknown preset names and wrong counts
are refused instead of silently becoming the plain ratio, and `#` comment lines are skipped in preset files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..core.arch import BLOCKS_26
from ..core.weights import Presets, parse_number
from .formats import LoraError

SHIPPED_PRESETS = Path(__file__).resolve().parent.parent / "data" / "lbwpresets.txt"

#: For each accepted count, the 26-slot label each value lands on.
LABELS = {
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6))),
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12))),
    20: ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))),
    26: BLOCKS_26,
}
COUNTS = ", ".join(str(n) for n in LABELS)


def load_presets(*user_files: str | Path | None) -> Presets:
    """The shipped LoRA Block Weight presets, then each user file (`NAME:v1,v2,...` lines, `#` comments); a later
    entry replaces an earlier one. Lines whose value count is not 12/17/20/26 are skipped, as LBW does."""
    table: dict[str, str] = {}
    for path in (SHIPPED_PRESETS, *(f for f in user_files if f)):
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise LoraError(f"Cannot read the LoRA block-weight preset file {path}: {e.strerror or e}.") from e
        for line in lines:
            name, sep, values = line.partition(":")
            if sep and not line.lstrip().startswith("#") and name.strip() and len(values.split(",")) in LABELS:
                table[name.strip()] = values.strip()
    return Presets(table)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: its file, its ratio, and optional block weights (a preset name or 12/17/20/26 values)."""

    path: str
    ratio: float = 1.0
    blocks: str = ""

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def text(self) -> str:
        return f"{self.path}:{self.ratio:g}" + (f":{self.blocks}" if self.blocks else "")

    def slot_ratios(self, presets: Presets) -> dict[str, float]:
        """Ratio per 26-slot label (BASE, IN00..IN11, M00, OUT00..OUT11), the block weights times the ratio."""
        blocks = self.blocks.strip()
        if not blocks:
            return dict.fromkeys(BLOCKS_26, self.ratio)
        if "," not in blocks:
            found = presets.get(blocks)
            if found is None:
                known = ", ".join(presets.names(None))
                raise LoraError(f"LoRA {self.name}: unknown block-weight preset {blocks!r}; use one of {known}, "
                                f"or give {COUNTS} comma-separated values.")
            blocks = found
        values = [parse_number(v.strip(), f"LoRA {self.name} block weights") for v in blocks.split(",")]
        labels = LABELS.get(len(values))
        if labels is None:
            raise LoraError(f"LoRA {self.name}: {len(values)} block weights given; LoRA block weights need "
                            f"{COUNTS} values (or a preset name).")
        slots = dict.fromkeys(BLOCKS_26, 0.0)
        for label, value in zip(labels, values, strict=True):
            slots[label] = value * self.ratio
        return slots


_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def parse_spec(text: str) -> LoraSpec:
    """`path[:ratio[:blocks]]` (a Windows drive letter is part of the path); ratio defaults to 1."""
    text = (text or "").strip()
    drive = text[:2] if _DRIVE.match(text) else ""
    parts = text[len(drive):].split(":")
    path = drive + parts[0].strip()
    if not parts[0].strip():
        raise LoraError(f"LoRA spec {text!r} names no file; write it as file:ratio[:block weights].")
    if len(parts) > 3:
        raise LoraError(f"LoRA spec {text!r} has too many ':'; write it as file:ratio[:block weights].")
    ratio = parse_number(parts[1].strip(), f"ratio of LoRA {Path(path).stem}") if len(parts) > 1 else 1.0
    return LoraSpec(path, ratio, parts[2].strip() if len(parts) > 2 else "")


def _starts_spec(piece: str) -> bool:
    """Whether a comma-separated piece starts a new spec (`name:...`) rather than continuing block values."""
    head, sep, _ = piece.partition(":")
    if not sep or not head.strip():
        return False
    try:
        float(head)
    except ValueError:
        return True
    return False


def split_specs(text: str) -> list[str]:
    """Spec texts from a field: one per line, or several on a line separated by commas (the seed's format); a comma
    followed by a plain value continues the previous spec's block weights (`a:1:1,0,0,...`)."""
    specs: list[str] = []
    for line in (text or "").splitlines():
        if line.lstrip().startswith("#"):
            continue
        start = len(specs)
        for piece in line.split(","):
            if len(specs) > start and not _starts_spec(piece):
                specs[-1] += "," + piece
            elif piece.strip():
                specs.append(piece)
    return [s.strip() for s in specs if s.strip()]
