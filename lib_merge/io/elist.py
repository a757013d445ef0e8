"""The E-list (the seed's "save E-list"): every merged key of a merge with the alpha and beta it was merged with,
as a CSV a spreadsheet opens, and back into Elemental rules that merge those keys with exactly those alphas.

The seed wrote `[key, alpha, beta]` rows after a random merge and had no way back (and crashed at HEAD). Here each
row also names the key's block and says whether an Elemental rule set its alpha (an ER/EU/EX draw, or a rule of the
user's): those rows become `BLOCK:key:alpha` rules when the file is loaded, so an elemental random merge can be kept,
edited and merged again without its seed. Rules are written shortest key first: a rule's key text matches every key
containing it and the last matching rule wins, so a longer key's own rule always comes after any shorter one that
also matches it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.engine import MERGE, MergePlan
from ..core.errors import MergeError
from ..core.recipe import TEXT_LIMITS
from ..core.weights import parse_elemental
from .write import atomic_output

HEADER = ("key", "block", "alpha", "beta", "elemental")
MAX_FILE = 20_000_000
ELIST_FOLDER = "block_merger_elists"


@dataclass(frozen=True)
class ElistRow:
    key: str
    block: str
    alpha: float
    beta: float
    elemental: bool  # an Elemental rule (or an ER/EU/EX draw) set this key's alpha


def elist_rows(plan: MergePlan) -> list[ElistRow]:
    """One row per merged key of `plan`, in the model's key order."""
    arch = plan.arch
    if arch is None:
        return []
    fines = frozenset(labels[0] for job in plan.jobs if (labels := arch.block_of(job.key))) if arch.is_sdxl \
        else frozenset()
    rules = parse_elemental(plan.recipe.elemental, arch, fines)
    rows = []
    for job in plan.jobs:
        if job.kind != MERGE:
            continue
        fine, block = arch.block_of(job.key) or (job.block, job.block)
        rows.append(ElistRow(job.key, job.block, job.alpha, job.beta,
                             any(rule.matches(job.key, fine, block) for rule in rules)))
    return rows


def write_elist(path: Path, rows: Sequence[ElistRow]) -> Path:
    """Write the rows as CSV (atomically; an existing file of that name is replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite=True) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        for r in rows:
            writer.writerow((r.key, r.block, repr(r.alpha), repr(r.beta), "yes" if r.elemental else "no"))
    return path


def read_elist(data: bytes, name: str = "E-list") -> list[ElistRow]:
    """Parse an E-list CSV; one clear MergeError for anything that is not one."""
    if len(data) > MAX_FILE:
        raise MergeError(f"{name} is {len(data):,} bytes; an E-list is at most {MAX_FILE:,}.")
    try:
        lines = list(csv.reader(io.StringIO(data.decode("utf-8-sig"))))
    except (UnicodeDecodeError, csv.Error) as e:
        raise MergeError(f"{name} is not an E-list CSV ({e}).") from None
    if not lines or tuple(c.strip() for c in lines[0]) != HEADER:
        raise MergeError(f"{name} is not an E-list: its first line must be {','.join(HEADER)} (the file Block "
                         f"Merger writes with 'save E-list').")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        if len(line) != len(HEADER):
            raise MergeError(f"{name}, line {number}: {len(line)} fields; an E-list row has {len(HEADER)}.")
        key, block, alpha, beta, elemental = (c.strip() for c in line)
        if not key or any(c in key for c in ":, \t") or not block or elemental not in ("yes", "no"):
            raise MergeError(f"{name}, line {number}: {','.join(line)[:120]!r} is not a key, block, alpha, beta, "
                             f"yes/no row.")
        try:
            rows.append(ElistRow(key, block, float(alpha), float(beta), elemental == "yes"))
        except ValueError:
            raise MergeError(f"{name}, line {number}: alpha {alpha!r} and beta {beta!r} must be numbers.") from None
    return rows


def elemental_from_elist(rows: Sequence[ElistRow], name: str = "E-list") -> str:
    """The Elemental text that gives each key an Elemental rule set its alpha exactly (see the module's note)."""
    chosen = sorted((r for r in rows if r.elemental), key=lambda r: (len(r.key), r.key))
    if not chosen:
        raise MergeError(f"{name} has no key whose alpha an Elemental rule set: its ratios come from the block weights "
                         f"alone, which the weights field already holds.")
    text = "\n".join(f"{r.block}:{r.key}:{r.alpha!r}" for r in chosen)
    limit = TEXT_LIMITS["elemental"]
    if len(text) > limit:
        raise MergeError(f"{name} gives {len(chosen)} Elemental rules ({len(text):,} characters); the Elemental field "
                         f"holds at most {limit:,}. Keep the rows of fewer blocks (set 'elemental' to no on the "
                         f"others) and load it again.")
    return text
