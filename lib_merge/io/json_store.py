"""Small JSON files the tab keeps beside the merge history (the plot queue, the generation defaults).

Written whole and atomically, so a crash leaves the old file or the new one, never half of one. A file that cannot
be read back (truncated, edited by hand, not what its reader expects) is moved aside, never deleted, and the caller
gets a one-line notice to show the user; the tab then starts from nothing instead of failing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..core.errors import MergeError
from ..core.untrusted_json import loads
from .write import atomic_output

log = logging.getLogger("block_merger")
T = TypeVar("T")
MAX_FILE = 5_000_000


def read_or_set_aside(path: Path, parse: Callable[[Any], T], empty: T, what: str) -> tuple[T, str]:
    """(`parse(the file's JSON)`, "") when the file reads, (`empty`, "") when there is none; a damaged file (bad
    JSON, or `parse` raising ValueError/TypeError/KeyError/MergeError) is renamed to `<name>.damaged-<time>` and
    (`empty`, a notice saying so) returned."""
    if not path.exists():
        return empty, ""
    try:
        return parse(loads(path.read_bytes(), MAX_FILE)), ""
    except (OSError, ValueError, TypeError, KeyError, MergeError) as e:
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            path.replace(aside)
        except OSError as moved:
            notice = f"The {what} file {path} cannot be read ({e}) nor moved aside ({moved}); starting empty."
        else:
            notice = f"The {what} file {path} could not be read ({e}); it was moved to {aside.name} and " \
                     f"Block Merger started with an empty one."
        log.warning("Block Merger: %s", notice)
        return empty, notice


def write_json(path: Path, data: Any) -> None:
    """Replace `path` with `data` as JSON, atomically (its folder is made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
