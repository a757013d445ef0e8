"""The merge log: an append-only CSV that survives crashes and reproduces any merge exactly.

The seed's log had a stale header, hand-rolled quoting and rewrote the whole file after every merge. Here the
header names every column, rows are written by the csv module in one append + fsync, each row is one physical
line (newlines in display columns are escaped), so a row torn by a crash is skipped rather than corrupting its
neighbours, and the full recipe JSON travels in the last column so reading back never depends on the columns.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import io
import json
import os
import re
import secrets
import stat
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import filelock

from ..core import untrusted_json
from ..core.errors import MergeError
from ..core.recipe import MAX_RECIPE_JSON
from .read import PICKLE_EXTS, SAFETENSORS_EXTS
from .write import same_file

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
MODEL_EXTS = SAFETENSORS_EXTS + PICKLE_EXTS
LOCK_TIMEOUT = 60  # seconds another process may hold the log (an append takes milliseconds)
MAX_LINE = 4 << 20  # bytes; a longer line is no row of ours and is skipped unread
TAIL_BLOCK = 64 << 10  # bytes read at a time, backwards, to find the last row
TAIL_LIMIT = 2 * MAX_LINE  # past this many bytes of unreadable tail, the next ID comes from a full scan
DAMAGED_ROW_ID = re.compile(r"^([1-9][0-9]{0,17}),")  # the ID a damaged or torn row still shows
MAX_SEARCH = 1_000  # characters of search words: each word is looked for in every row


class HistoryWarning(UserWarning):
    """A history line could not be read (usually the last one, torn by a crash) and was skipped."""


def _csv_line(values: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


HEADER_LINE = _csv_line(list(COLUMNS))
HEADER_BYTES = HEADER_LINE.encode("utf-8")


class _Foreign(Exception):
    """The file's first line is not our header (`first`: its beginning)."""

    def __init__(self, first: str):
        super().__init__(first)
        self.first = first


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
    """Merge log at `path` (a CSV file; its folder is created on the first append).

    Appends hold a lock file beside the log (`<name>.lock`, an OS file lock through `filelock`), so merges in
    several processes (CLI runs, the WebUI, the standalone app) get distinct IDs and never interleave their rows.
    The next ID comes from the last row, read from the end of the file, and reading streams the file line by line,
    so neither an append nor a search holds the whole log in memory, whatever its size.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.Lock()

    # --- checks --------------------------------------------------------------------------------------------

    def check(self, others: Iterable[tuple[str, str | os.PathLike[str] | None]] = ()) -> None:
        """Before a merge reads any tensor: refuse a log that is one of the merge's files (`others`: what it is,
        path) or cannot be written, and set a foreign file aside so the merge's row can be logged."""
        for what, other in others:
            if other is not None and same_file(self.path, Path(other)):
                raise MergeError(f"The history file {self.path} is {what} {other}; a merge never writes into its "
                                 "own files. Choose another history file.")
        if self.path.suffix.lower() in MODEL_EXTS:
            raise MergeError(f"The history file {self.path} has a model file's extension; the history is a CSV "
                             "file. Choose a name ending in .csv.")
        self._check_writable()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", HistoryWarning)
                self._header()
        except _Foreign:
            with self._locked():
                self._set_aside_if_foreign()

    def _check_writable(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise MergeError(f"The history file {self.path} cannot be accessed ({e.strerror or e}); choose another "
                             "history file.") from e
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                raise MergeError(f"The history file {self.path} is a folder; choose a file name.")
            if not stat.S_ISREG(st.st_mode):
                raise MergeError(f"The history file {self.path} is not a regular file; choose another file.")
            if not os.access(self.path, os.W_OK):
                raise MergeError(f"The history file {self.path} is read-only; make it writable or choose another "
                                 "history file.")
            folder = self.path.parent
        else:
            folder = self.path.parent
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent
        if not folder.is_dir():
            raise MergeError(f"The history file {self.path} cannot be created: {folder} is not a folder.")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise MergeError(f"The history file {self.path} cannot be written: folder {folder} is read-only. "
                             "Choose another history file.")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This log's lock, across threads and processes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.path.with_name(self.path.name + ".lock")), timeout=LOCK_TIMEOUT)
        with self._lock:
            try:
                lock.acquire()
            except filelock.Timeout:
                raise MergeError(f"The history file {self.path} stayed locked by another merge for {LOCK_TIMEOUT} s; "
                                 "try again when it has finished.") from None
            try:
                yield
            finally:
                lock.release()

    def _set_aside_if_foreign(self) -> Path | None:
        """Rename a file that is not a history (never delete it) and say so; the next append starts a new one."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", HistoryWarning)
                self._header()
            return None
        except _Foreign as foreign:
            first = foreign.first
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.stem}.not-history-{stamp}-{secrets.token_hex(3)}{self.path.suffix}")
        try:
            os.rename(self.path, aside)
        except OSError as e:
            raise MergeError(f"{self.path} is not a Block Merger history file (its first line is {first!r}) and could "
                             f"not be moved aside ({e.strerror or e}); move it away or choose another history "
                             "file.") from e
        warnings.warn(f"{self.path} was not a Block Merger history file (its first line is {first!r}); it was "
                      f"kept as {aside.name} and a new history was started.", HistoryWarning, stacklevel=4)
        return aside

    # --- reading -------------------------------------------------------------------------------------------

    def _open(self):
        """The log opened for reading (binary), or None when there is none yet."""
        try:
            return open(self.path, "rb")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise MergeError(f"Cannot read merge history {self.path}: {e.strerror or e}.") from e

    def _header(self, f=None) -> bool:
        """Whether the log has a complete header (rows may follow: `f` is left after it); False for no file, an empty
        one or a header torn by a crash; _Foreign for anything else."""
        if f is None:
            with contextlib.ExitStack() as stack:
                f = self._open()
                if f is None:
                    return False
                stack.enter_context(f)
                return self._header(f)
        line = f.readline(len(HEADER_BYTES) + 8)
        text = line.decode("utf-8", errors="replace").lstrip("\ufeff")
        first = text.rstrip("\n").rstrip("\r")
        header = HEADER_LINE.rstrip("\n")
        if first == header:
            return True
        if not text.endswith("\n") and header.startswith(first):
            if first:
                warnings.warn(f"{self.path}: the header line is incomplete (torn by a crash).", HistoryWarning,
                              stacklevel=4)
            return False
        raise _Foreign(first[:80])

    def _foreign_error(self, first: str) -> MergeError:
        return MergeError(f"{self.path} is not a Block Merger history file (its first line is {first!r}). It was left "
                          "untouched; the next merge keeps it under a new name and starts a new history.")

    def _scan(self) -> Iterator[dict]:
        """Every readable row, oldest first, read line by line (one row in memory at a time)."""
        f = self._open()
        if f is None:
            return
        with f:
            try:
                if not self._header(f):
                    return
            except _Foreign as foreign:
                raise self._foreign_error(foreign.first) from None
            number = 1
            while line := f.readline(MAX_LINE + 1):
                number += 1
                if len(line) > MAX_LINE and not line.endswith(b"\n"):
                    while line and not line.endswith(b"\n"):  # skip the rest of an overlong line unread
                        line = f.readline(MAX_LINE)
                    row = None
                else:
                    text = line.decode("utf-8", errors="replace").rstrip("\n").rstrip("\r")
                    if not text:
                        continue
                    row = self._parse(text)
                if row is None:
                    warnings.warn(
                        f"{self.path}: line {number} is incomplete or damaged (a crash while writing?) and was "
                        "skipped.", HistoryWarning, stacklevel=4)
                    continue
                yield row

    def _last_id(self, f, start: int, size: int) -> int:
        """The ID of the last row, reading backwards from the end: a row damaged or torn by a crash still counts
        when its ID can be read, and only when none of the last TAIL_LIMIT bytes is a row does it fall back to a
        scan."""
        pos, partial = size, b""
        while pos > start:
            step = min(TAIL_BLOCK, pos - start)
            pos -= step
            f.seek(pos)
            lines = (f.read(step) + partial).split(b"\n")
            partial = lines.pop(0) if pos > start else b""
            for line in reversed(lines):
                text = line.decode("utf-8", errors="replace").rstrip("\r")
                row = self._parse(text) if text else None
                if row is not None:
                    return int(row["id"])
                damaged = DAMAGED_ROW_ID.match(text)
                if damaged:  # its merge may be named by this ID elsewhere (an image's infotext): never reused
                    return int(damaged[1])
            if size - pos > TAIL_LIMIT:
                return max((int(r["id"]) for r in self._scan()), default=0)
        return 0

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
        if limit is None:
            return list(self._scan())
        return list(collections.deque(self._scan(), maxlen=limit)) if limit > 0 else []

    def get(self, merge_id: int) -> dict:
        """One row: a positive ID, or -1 for the last row, -2 for the one before, ... (Python-style)."""
        newest: collections.deque[dict] = collections.deque(maxlen=max(1, -merge_id))
        first = None
        for row in self._scan():
            if merge_id > 0 and row["id"] == merge_id:
                return row
            first = first or row
            newest.append(row)
        if merge_id < 0 and len(newest) == -merge_id:
            return newest[0]
        known = f"IDs {first['id']}-{newest[-1]['id']} exist" if first else "it is empty"
        raise MergeError(f"No merge with ID {merge_id} in history {self.path} ({known}).")

    def recipe(self, merge_id: int) -> dict:
        """The exact recipe dict that was logged under `merge_id` (same addressing as `get`)."""
        return self.get(merge_id)["recipe"]

    def search(self, words: str, mode: str = "and", limit: int | None = None) -> list[dict]:
        """Rows where all (mode "and") or any (mode "or") of the words occur in some field, ignoring case; with
        `limit`, only the newest `limit` matches are kept while the file streams by."""
        if mode not in ("and", "or"):
            raise MergeError(f"Search mode must be 'and' or 'or', not {mode!r:.60}.")
        if len(words) > MAX_SEARCH:
            raise MergeError(f"The search text holds {len(words):,} characters; at most {MAX_SEARCH:,} are allowed.")
        terms = [w.lower() for w in words.split()]
        match = all if mode == "and" else any
        found: collections.deque[dict] = collections.deque(maxlen=limit if limit and limit > 0 else None)
        for row in self._scan():
            hay = "\n".join(
                json.dumps(row[c], ensure_ascii=False) if c == "recipe" else str(row[c]) for c in COLUMNS
            ).lower()
            if match(t in hay for t in terms) or not terms:
                found.append(row)
        return list(found) if limit is None or limit > 0 else []

    # --- writing -------------------------------------------------------------------------------------------

    def append(self, name: str, recipe: dict) -> int:
        """Log one merge; returns its new ID (the last row's ID + 1), at a cost independent of the log's size."""
        try:
            recipe_json = json.dumps(recipe, ensure_ascii=False, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise MergeError(f"The recipe cannot be written to the history as JSON: {e}") from e
        with self._locked():
            self._set_aside_if_foreign()
            last_id, has_header, ends_with_newline = 0, False, True
            f = self._open()
            if f is not None:
                with f, warnings.catch_warnings():
                    warnings.simplefilter("ignore", HistoryWarning)
                    has_header = self._header(f)
                    size = os.fstat(f.fileno()).st_size
                    if has_header:
                        last_id = self._last_id(f, f.tell(), size)
                        f.seek(size - 1)
                        ends_with_newline = f.read(1) == b"\n"
            new_id = last_id + 1
            values = [str(new_id), time.strftime(TIME_FORMAT), _display(name)]
            values += [_display(recipe.get(field)) for field in RECIPE_FIELDS]
            values.append(recipe_json)
            line = _csv_line(values).encode("utf-8")
            if not has_header:
                self._start(HEADER_BYTES + line)
            else:
                self._append((b"" if ends_with_newline else b"\n") + line)
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
