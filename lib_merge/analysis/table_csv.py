"""An analysis as one CSV table (the seed's "save as csv"), for a spreadsheet or a script.

One row per block, then one per key, with a header (the seed wrote none). Columns: level ("block" or "key"), block,
key (empty on block rows), keys (the block's key count; empty on key rows), then for each pair of models its
cosine % (a block's mean), min cosine %, attn2 cosine %, ASimilarity %, and relative L2 distance. A value that does
not apply to the row, or is undefined (an all-zero tensor), is an empty cell. Numbers are written in full
(Python's shortest round-trip form), so a script reads back exactly what was computed.

The file is written atomically: a failure leaves no partial CSV, and an existing file is only replaced when asked.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ..io.write import atomic_output, check_output_path
from .similarity import Comparison

MEASURES = ("cosine %", "min cosine %", "attn2 cosine %", "ASimilarity %", "relative L2")


def _cell(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else repr(float(value))


def csv_rows(result: Comparison) -> list[list[str]]:
    """The header and the rows, as strings."""
    rows = [["level", "block", "key", "keys", *(f"{p} {m}" for p in result.pairs for m in MEASURES)]]
    for g in result.groups:
        rows.append(["block", g.group, "", str(g.keys), *(_cell(v) for p in result.pairs for v in (
            g.mean_cosine[p], g.min_cosine[p], g.attn2_cosine[p], g.asimilarity[p], g.rel_l2[p]))])
    for r in result.keys:
        rows.append(["key", r.group, r.key, "", *(_cell(v) for p in result.pairs for v in (
            r.pairs[p].cosine, None, None, None, r.pairs[p].rel_l2))])
    return rows


def save_csv(result: Comparison, path: str | Path, overwrite: bool = False) -> Path:
    """Write the table to `path` (atomically; an existing file only with `overwrite`, a compared model never)."""
    path = check_output_path(path, result.paths, overwrite)
    with atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(csv_rows(result))
    return path
