"""What a benchmark run produces: one Measure per contender run, one TaskResult per task, and their medians."""

from __future__ import annotations

import dataclasses
import statistics

GB = 1e9


@dataclasses.dataclass
class Measure:
    time: float | None
    rss: int | None
    data: dict
    error: str | None = None


@dataclasses.dataclass
class TaskResult:
    name: str
    title: str
    rows: dict = dataclasses.field(default_factory=dict)  # label -> {"kind", "measures": [Measure]}
    ratios: list = dataclasses.field(default_factory=list)  # (ours, baseline, ratio|None, note)
    checks: list = dataclasses.field(default_factory=list)  # (what, compare dict | str)
    notes: list = dataclasses.field(default_factory=list)
    targets: list = dataclasses.field(default_factory=list)  # dicts: name, value, goal, met, text
    extra: dict = dataclasses.field(default_factory=dict)
    skipped: str | None = None


def median_time(row) -> float | None:
    ts = [m.time for m in row["measures"] if m.time is not None]
    return statistics.median(ts) if ts else None


def median_cpu(row) -> float | None:
    cs = [m.data.get("cpu") for m in row["measures"] if m.data.get("cpu") is not None]
    return statistics.median(cs) if cs else None


def max_rss(row) -> int | None:
    rs = [m.rss for m in row["measures"] if m.rss]
    return max(rs) if rs else None

def settings(args, machine) -> dict:
    return {"argv": list(args.argv), "runs": args.runs, "fast_runs": args.fast_runs, "sdxl_runs": args.sdxl_runs,
            "smooth_full_runs": args.smooth_full_runs, "date": machine.get("date"), "git": machine.get("git")}
