"""The reservation queue of X/Y/Z plots: snapshots of the tab's settings, run one after another.

One queue per tab (the tab's handlers own it; nothing is kept at module level). Entries wait until "Run queue" takes
them in order; a waiting entry can be removed at any time, also while an earlier one runs. A failing entry is marked
and the queue goes on with the next, as in the seed (whose first-run bug, running the plot on screen before the
queue, is not copied).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import MergeError

WAITING, RUNNING, FINISHED, FAILED = "waiting", "running", "finished", "error"
HEADERS = ("#", "status", "X", "Y", "Z", "message")
MAX_ENTRIES = 100


@dataclass
class QueueEntry:
    number: int
    values: dict[str, Any]  # the tab's widget values when it was reserved
    extra: Any = None  # e.g. the dice settings of a Run Rand
    status: str = WAITING
    message: str = ""
    results: list = field(default_factory=list)

    def axis(self, name: str) -> str:
        kind = self.values.get(f"{name}_type") or "none"
        return "" if kind == "none" else f"{kind}: {str(self.values.get(f'{name}_values') or '')[:40]}"


class PlotQueue:
    def __init__(self):
        self._entries: list[QueueEntry] = []
        self._next = 1
        self._lock = threading.Lock()

    def add(self, values: dict[str, Any], extra: Any = None) -> int:
        with self._lock:
            if sum(e.status == WAITING for e in self._entries) >= MAX_ENTRIES:
                raise MergeError(f"The queue holds {MAX_ENTRIES} waiting plots; run or remove some first.")
            entry = QueueEntry(self._next, dict(values), extra)
            self._entries.append(entry)
            self._next += 1
            return entry.number

    def remove(self, number: int) -> None:
        """Remove a waiting entry (-1: every waiting entry); one that ran or runs is kept, as its record."""
        with self._lock:
            if number == -1:
                self._entries = [e for e in self._entries if e.status != WAITING]
                return
            entry = next((e for e in self._entries if e.number == number), None)
            if entry is None:
                raise MergeError(f"No queued plot #{number}.")
            if entry.status != WAITING:
                raise MergeError(f"Plot #{number} is {entry.status}; only waiting plots can be removed.")
            self._entries.remove(entry)

    def clear_done(self) -> None:
        with self._lock:
            self._entries = [e for e in self._entries if e.status in (WAITING, RUNNING)]

    def _take(self) -> QueueEntry | None:
        with self._lock:
            if any(e.status == RUNNING for e in self._entries):
                raise MergeError("The queue is already running.")
            entry = next((e for e in self._entries if e.status == WAITING), None)
            if entry is not None:
                entry.status = RUNNING
            return entry

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
                entry.message, entry.results = plot(entry)
                entry.status = FINISHED
            except Exception as e:  # noqa: BLE001 - a failing plot is recorded; the queue goes on
                entry.status, entry.message = FAILED, str(e)
            done.append(entry)
        return done

    def table(self) -> list[list[str]]:
        with self._lock:
            rows = [[str(e.number), e.status, e.axis("x"), e.axis("y"), e.axis("z"), e.message[:120]]
                    for e in self._entries]
        return rows or [["", "", "", "", "", ""]]
