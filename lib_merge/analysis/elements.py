"""Elements: every key of a model with its block, shape and dtype, so users can write elemental and
include/exclude rules. Only the file's header is read (the seed loads the whole model to list its keys)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.arch import detect_arch
from ..io.checkpoint import open_checkpoint


@dataclass(frozen=True)
class Element:
    """One key: its merge block ("" when never merged), its fine label (SDXL's finer include/exclude name)."""

    index: int
    key: str
    block: str
    fine: str
    shape: tuple[int, ...]
    dtype: str


def list_elements(path: Path, contains: str = "") -> list[Element]:
    """Every key of the checkpoint in file order; `contains` keeps keys holding that text, or whose block or fine
    label is that text (case-insensitive: "attn2", "OUT11", "IN410").

    Indices stay those of the whole file, so a filtered list still says where a key sits."""
    needle = contains.lower()
    out = []
    with open_checkpoint(path) as ckpt:
        keys = ckpt.keys()
        arch = detect_arch(set(keys), ckpt.shape, str(path))
        for index, key in enumerate(keys):
            labels = arch.block_of(key) if "model" in key else None
            fine, block = labels if labels else ("", "")
            if needle not in key.lower() and needle not in (block.lower(), fine.lower()):
                continue
            dtype = str(ckpt.dtype(key)).replace("torch.", "")
            out.append(Element(index, key, block, fine, tuple(ckpt.shape(key)), dtype))
    return out


def format_elements(elements: list[Element]) -> str:
    """One line per key: index, block (and fine label where it differs), shape, dtype, key."""
    lines = [f"{'No.':>5}  {'block':<12}{'shape':<22}{'dtype':<10}key"]
    for e in elements:
        label = e.block if e.fine in ("", e.block) else f"{e.block}/{e.fine}"
        shape = "x".join(str(d) for d in e.shape) or "scalar"
        lines.append(f"{e.index:>5}  {label or '-':<12}{shape:<22}{e.dtype:<10}{e.key}")
    lines.append(f"{len(elements)} keys")
    return "\n".join(lines)
