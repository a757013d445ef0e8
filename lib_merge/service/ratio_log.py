"""The per-key log of the ratios a merge uses (the seed's "debug" print), off by default: for every key of a plan,
its block, what happens to it (merged, or copied from A or B) and, for merged keys, alpha and beta after block
weights, elemental rules and random draws. Written to the console (stderr), where the seed printed it."""

from __future__ import annotations

import sys
from typing import TextIO

from ..core.engine import MERGE, MergePlan

KINDS = {"a": "copy A", "b": "copy B", MERGE: "merge"}


def ratio_lines(plan: MergePlan) -> list[str]:
    """One line per key: block, kind, alpha and beta (merged keys only), key."""
    lines = [f"Block Merger ratios for {plan.recipe.title()} ({len(plan.jobs)} keys):"]
    for job in plan.jobs:
        ratios = f"alpha={job.alpha:.6g} beta={job.beta:.6g}" if job.kind == MERGE else "-"
        lines.append(f"  {job.block or '-':<8} {KINDS.get(job.kind, job.kind):<7} {ratios:<32} {job.key}")
    return lines


def write_ratio_log(plan: MergePlan, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    stream.write("\n".join(ratio_lines(plan)) + "\n")
    stream.flush()
