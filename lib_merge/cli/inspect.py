"""`python -m lib_merge inspect FILE`: what a checkpoint is, block by block, and the recipe it was merged from."""

from __future__ import annotations

import json
from collections import Counter
from math import prod
from pathlib import Path

from ..core import untrusted_json
from ..core.arch import detect_arch
from ..io.checkpoint import open_checkpoint


def describe(path: Path) -> str:
    with open_checkpoint(path) as ckpt:
        keys = ckpt.keys()
        arch = detect_arch(set(keys), ckpt.shape, str(path))
        per_block: Counter[str] = Counter()
        per_dtype: Counter[str] = Counter()
        for key in keys:
            n = prod(ckpt.shape(key))
            per_dtype[str(ckpt.dtype(key)).replace("torch.", "")] += n
            labels = arch.block_of(key) if "model" in key else None
            per_block[labels[1] if labels else "(not merged)"] += n
        metadata = dict(ckpt.metadata)
    total = sum(per_block.values())
    lines = [
        f"File:         {path}",
        f"Architecture: {arch.describe()} ({len(arch.blocks)} blocks, U-Net input channels {arch.in_channels})",
        f"Tensors:      {len(keys)}",
        f"Parameters:   {total:,}",
        "Dtypes:       " + ", ".join(f"{d} {n:,}" for d, n in per_dtype.most_common()),
        "Parameters per block:",
    ]
    for label in (*arch.blocks, "(not merged)"):
        if per_block[label]:
            lines.append(f"  {label:<13}{per_block[label]:>15,}  {100 * per_block[label] / total:5.1f}%")
    if metadata:
        lines.append("Metadata:")
        for name, value in sorted(metadata.items()):
            lines.append(f"  {name}: {_pretty(value)}")
    else:
        lines.append("Metadata:     none")
    return "\n".join(lines)


def _pretty(value: str) -> str:
    """JSON values (the recipe, the model tree) indented under their name; anything else as it is."""
    try:
        decoded = untrusted_json.loads(value, len(value))  # from a header already size-checked
    except ValueError:
        return value
    if not isinstance(decoded, (dict, list)):
        return value
    return "\n    " + json.dumps(decoded, indent=2, sort_keys=True).replace("\n", "\n    ")
