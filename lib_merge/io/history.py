"""The merge log: an append-only CSV that survives crashes and reproduces any merge exactly.

The seed's log had a stale header, hand-rolled quoting and rewrote the whole file after every merge. Here the
header names every column, rows are written by the csv module in one append + fsync, each row is one physical
line (newlines in display columns are escaped), so a row torn by a crash is skipped rather than corrupting its
neighbours, and the full recipe JSON travels in the last column so reading back never depends on the columns.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
import time
import warnings
from pathlib import Path

from ..core import untrusted_json
from ..core.errors import MergeError
from ..core.recipe import MAX_RECIPE_JSON

RECIPE_FIELDS = (
    "model_a",
    "model_b",
    "model_c",
    "mode",
    "calc",
    "alpha",
    "beta",
    "weights_alpha",
    "weights_beta",
    "elemental",
    "adjust",
    "inex",
    "inex_blocks",
    "inex_elements",
    "gamma",
    "seed",
)
COLUMNS = ("id", "time", "name", *RECIPE_FIELDS, "recipe")
TIME_FORMAT = "%Y.%m.%d %H.%M.%S"
MAX_SEARCH = 1_000  # characters of search words: each word is looked for in every row


class HistoryWarning(UserWarning):
    """A history line could not be read (usually the last one, torn by a crash) and was skipped."""


def _csv_line(values: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


HEADER_LINE = _csv_line(list(COLUMNS))


def _display(value: object) -> str:
    """One readable cell: strings as they are, other values as JSON; newlines escaped to keep one line per row."""
    if value is None:
        text = ""
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False)
    return text.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n")


class History:
    """Merge log at `path` (a CSV file; its folder is created on the first append)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.Lock()

    # --- reading -------------------------------------------------------------------------------------------

    def _read(self) -> tuple[list[dict], bytes, bool]:
        """All readable rows, the raw file bytes, and whether the file has a complete header line."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return [], b"", False
        except OSError as e:
            raise MergeError(f"Cannot read merge history {self.path}: {e.strerror or e}.") from e
        text = raw.decode("utf-8", errors="replace").lstrip("\ufeff")
        lines = text.split("\n")
        first = lines[0].rstrip("\r")
        header = HEADER_LINE.rstrip("\n")
        if first != header:
            if len(lines) == 1 and header.startswith(first):
                if first:
                    warnings.warn(
                        f"{self.path}: the header line is incomplete (torn by a crash).", HistoryWarning, stacklevel=3
                    )
                return [], raw, False
            raise MergeError(
                f"{self.path} is not a Block Merger history file (its first line is {first[:80]!r}). "
                "It was left untouched; move it away or choose another history file."
            )
        rows = []
        for number, line in enumerate(lines[1:], start=2):
            line = line.rstrip("\r")
            if not line:
                continue
            row = self._parse(line)
            if row is None:
                warnings.warn(
                    f"{self.path}: line {number} is incomplete or damaged (a crash while writing?) and was skipped.",
                    HistoryWarning,
                    stacklevel=3,
                )
                continue
            rows.append(row)
        return rows, raw, True

    @staticmethod
    def _parse(line: str) -> dict | None:
        try:
            fields = next(csv.reader([line], strict=True))
        except (csv.Error, StopIteration):
            return None
        if len(fields) != len(COLUMNS):
            return None
        row: dict[str, object] = dict(zip(COLUMNS, fields, strict=True))
        try:
            row["id"] = int(fields[0])
            recipe = untrusted_json.loads(fields[-1], MAX_RECIPE_JSON)
        except ValueError:  # not a number, not JSON, too long or too deeply nested: this row only is skipped
            return None
        if not isinstance(recipe, dict) or row["id"] < 1:
            return None
        row["recipe"] = recipe
        return row

    def rows(self, limit: int | None = None) -> list[dict]:
        """Rows oldest first; with `limit`, only the newest `limit` of them."""
        rows, _, _ = self._read()
        if limit is not None:
            rows = rows[-limit:] if limit > 0 else []
        return rows

    def get(self, merge_id: int) -> dict:
        """One row: a positive ID, or -1 for the last row, -2 for the one before, ... (Python-style)."""
        rows, _, _ = self._read()
        if merge_id < 0:
            if -merge_id <= len(rows):
                return rows[merge_id]
        elif merge_id > 0:
            for row in rows:
                if row["id"] == merge_id:
                    return row
        known = f"IDs {rows[0]['id']}-{rows[-1]['id']} exist" if rows else "it is empty"
        raise MergeError(f"No merge with ID {merge_id} in history {self.path} ({known}).")

    def recipe(self, merge_id: int) -> dict:
        """The exact recipe dict that was logged under `merge_id` (same addressing as `get`)."""
        return self.get(merge_id)["recipe"]

    def search(self, words: str, mode: str = "and") -> list[dict]:
        """Rows where all (mode "and") or any (mode "or") of the words occur in some field, ignoring case."""
        if mode not in ("and", "or"):
            raise MergeError(f"Search mode must be 'and' or 'or', not {mode!r:.60}.")
        if len(words) > MAX_SEARCH:
            raise MergeError(f"The search text holds {len(words):,} characters; at most {MAX_SEARCH:,} are allowed.")
        terms = [w.lower() for w in words.split()]
        rows, _, _ = self._read()
        if not terms:
            return rows
        match = all if mode == "and" else any
        out = []
        for row in rows:
            hay = "\n".join(
                json.dumps(row[c], ensure_ascii=False) if c == "recipe" else str(row[c]) for c in COLUMNS
            ).lower()
            if match(t in hay for t in terms):
                out.append(row)
        return out

    # --- writing -------------------------------------------------------------------------------------------

    def append(self, name: str, recipe: dict) -> int:
        """Log one merge; returns its new ID (the highest ID so far + 1)."""
        try:
            recipe_json = json.dumps(recipe, ensure_ascii=False, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise MergeError(f"The recipe cannot be written to the history as JSON: {e}") from e
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", HistoryWarning)
                rows, raw, has_header = self._read()
            new_id = max((r["id"] for r in rows), default=0) + 1
            values = [str(new_id), time.strftime(TIME_FORMAT), _display(name)]
            values += [_display(recipe.get(f)) for f in RECIPE_FIELDS]
            values.append(recipe_json)
            line = _csv_line(values).encode("utf-8")
            if not has_header:
                self._start(HEADER_LINE.encode("utf-8") + line)
            else:
                self._append((b"" if raw.endswith(b"\n") else b"\n") + line)
        return new_id

    def _append(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def _start(self, data: bytes) -> None:
        """A new file, or one holding only a torn header: write header + first row atomically."""
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
