"""The reservation queue of X/Y/Z plots: snapshots of the tab's settings, run one after another.

One queue per tab (the tab's handlers own it; nothing is kept at module level). Entries wait until "Run queue" takes
them in order; a waiting entry can be removed at any time, also while an earlier one runs. A failing entry is marked
and the queue goes on with the next, as in the seed (whose first-run bug, running the plot on screen before the
queue, is not copied).

Given a file (beside the merge history), the queue outlives a restart, which the seed's in-memory list did not: the
file is rewritten atomically after every change; a plot that was running when the WebUI stopped is waiting again;
the images of finished plots are not kept, only their records (the latest KEEP_DONE). A damaged file is moved aside
with a notice (`notice`) and the queue starts empty.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import MergeError
from ..io.json_store import read_or_set_aside, write_json

WAITING, RUNNING, FINISHED, FAILED = "waiting", "running", "finished", "error"
HEADERS = ("#", "status", "X", "Y", "Z", "message")
log = logging.getLogger("block_merger")
MAX_ENTRIES = 100
KEEP_DONE = 50  # finished / failed records kept in the file
STATUSES = (WAITING, RUNNING, FINISHED, FAILED)


@dataclass
class QueueEntry:
    number: int
    values: dict[str, Any]  # the tab's widget values when it was reserved
    extra: Any = None  # e.g. the dice settings of a Run Rand (plain JSON data, so that it can be kept)
    status: str = WAITING
    message: str = ""
    results: list = field(default_factory=list)

    def axis(self, name: str) -> str:
        kind = self.values.get(f"{name}_type") or "none"
        return "" if kind == "none" else f"{kind}: {str(self.values.get(f'{name}_values') or '')[:40]}"


def _entries_from(data: Any) -> list[QueueEntry]:
    """The file's JSON -> entries (ValueError for anything else); a running entry is waiting again."""
    if not isinstance(data, list):
        raise ValueError("it does not hold a list of plots")
    entries = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("values"), dict) \
                or type(item.get("number")) is not int or item.get("status") not in STATUSES:
            raise ValueError(f"an entry is not a queued plot: {str(item)[:80]}")
        status = WAITING if item["status"] == RUNNING else item["status"]
        entries.append(QueueEntry(item["number"], item["values"], item.get("extra"), status,
                                  str(item.get("message") or "")))
    if len({e.number for e in entries}) != len(entries):
        raise ValueError("two entries have the same number")
    return entries


class PlotQueue:
    def __init__(self, path: str | Path | None = None):
        """A queue kept in memory only, or (`path`) also in that JSON file, read back here."""
        self.path = Path(path) if path is not None else None
        self._entries: list[QueueEntry] = []
        self.notice = ""  # why the file was set aside, until the queue is written again
        if self.path is not None:
            self._entries, self.notice = read_or_set_aside(self.path, _entries_from, [], "plot queue")
        self._next = max((e.number for e in self._entries), default=0) + 1
        self._lock = threading.Lock()

    def _save(self) -> None:
        """Write the queue to its file (called with the lock held, after every change)."""
        if self.path is None:
            return
        done = [e for e in self._entries if e.status in (FINISHED, FAILED)]
        kept = [e for e in self._entries if e.status not in (FINISHED, FAILED) or e in done[-KEEP_DONE:]]
        try:
            write_json(self.path, [{"number": e.number, "status": e.status, "message": e.message,
                                    "values": e.values, "extra": e.extra} for e in kept])
        except (OSError, MergeError) as e:  # the queue goes on in memory; the user is told it is not kept
            self.notice = f"The plot queue cannot be written to {self.path} ({e}); it is kept until a restart only."
            log.warning("Block Merger: %s", self.notice)
        else:
            self.notice = ""

    def add(self, values: dict[str, Any], extra: Any = None) -> int:
        try:  # refused here, not when the file is written: a snapshot must be plain data to be kept
            json.dumps([values, extra])
        except (TypeError, ValueError) as e:
            raise MergeError(f"This plot's settings cannot be queued ({e}).") from None
        with self._lock:
            if sum(e.status == WAITING for e in self._entries) >= MAX_ENTRIES:
                raise MergeError(f"The queue holds {MAX_ENTRIES} waiting plots; run or remove some first.")
            entry = QueueEntry(self._next, dict(values), extra)
            self._entries.append(entry)
            self._next += 1
            self._save()
            return entry.number

    def remove(self, number: int) -> None:
        """Remove a waiting entry (-1: every waiting entry); one that ran or runs is kept, as its record."""
        with self._lock:
            if number == -1:
                self._entries = [e for e in self._entries if e.status != WAITING]
                self._save()
                return
            entry = next((e for e in self._entries if e.number == number), None)
            if entry is None:
                raise MergeError(f"No queued plot #{number}.")
            if entry.status != WAITING:
                raise MergeError(f"Plot #{number} is {entry.status}; only waiting plots can be removed.")
            self._entries.remove(entry)
            self._save()

    def clear_done(self) -> None:
        with self._lock:
            self._entries = [e for e in self._entries if e.status in (WAITING, RUNNING)]
            self._save()

    def _take(self) -> QueueEntry | None:
        with self._lock:
            if any(e.status == RUNNING for e in self._entries):
                raise MergeError("The queue is already running.")
            entry = next((e for e in self._entries if e.status == WAITING), None)
            if entry is not None:
                entry.status = RUNNING
                self._save()
            return entry

    def _finish(self, entry: QueueEntry, status: str, message: str) -> None:
        with self._lock:
            entry.status, entry.message = status, message
            self._save()

    def run(self, plot: Callable[[QueueEntry], tuple[str, list]], stopped: Callable[[], bool] = lambda: False) \
            -> list[QueueEntry]:
        """Run waiting entries in order until none is left (or `stopped()`); `plot(entry)` returns (message,
        images) or raises. Returns the entries that ran."""
        done = []
        while not stopped():
            entry = self._take()
            if entry is None:
                break
            try:
                message, entry.results = plot(entry)
                self._finish(entry, FINISHED, message)
            except Exception as e:  # noqa: BLE001 - a failing plot is recorded; the queue goes on
                self._finish(entry, FAILED, str(e))
            done.append(entry)
        return done

    def table(self) -> list[list[str]]:
        with self._lock:
            rows = [[str(e.number), e.status, e.axis("x"), e.axis("y"), e.axis("z"), e.message[:120]]
                    for e in self._entries]
        return rows or [["", "", "", "", "", ""]]
