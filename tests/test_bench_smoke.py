"""Smoke test of the benchmark harness (bench/run.py) on tiny synthetic models: every task once, one run.

It checks that the harness runs end to end and writes a complete report with sound result checks. It never looks at
timings (they are meaningless on tiny models and on a shared machine) and never writes bench/RESULTS.md.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import run as bench_run  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"


def _fingerprint(path: Path):
    return path.read_bytes() if path.exists() else None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    before = _fingerprint(RESULTS)
    out = tmp / "R.md"
    args = ["--inline", "--no-mecha", "--silent", "--factor", "16", "--cache", str(tmp / "models"),
            "--workdir", str(tmp / "work"), "--output", str(out), "--appendix", str(tmp / "none.md"),
            "--runs", "1", "--fast-runs", "1", "--sdxl-runs", "1", "--smooth-full-runs", "0", "--tasks", "all"]
    assert bench_run.main(args) == 0
    assert _fingerprint(RESULTS) == before, "the smoke test must not touch bench/RESULTS.md"
    raw = json.loads((tmp / "work" / "results.json").read_text())
    return tmp, out.read_text(), raw


def test_every_task_reported(report):
    _, text, raw = report
    assert [t["name"] for t in raw["tasks"]] == list(bench_run.TASKS)
    for title in bench_run.TITLES.values():
        assert title in text
    for section in ("## Machine", "## Summary", "## Targets (issue 6)", "torch", "cores"):
        assert section in text
    assert ("No CUDA device" in text) or ("CUDA device present" in text)


def test_no_contender_failed(report):
    _, text, raw = report
    for task in raw["tasks"]:
        assert task["skipped"] is None, task["skipped"]
        assert task["rows"], task["name"]
        for label, row in task["rows"].items():
            for m in row["measures"]:
                assert m["error"] is None, f"{task['name']} / {label}: {m['error']}"
                assert m["time"] is not None and m["time"] >= 0
    assert "FAILED" not in text and "task failed" not in text


def test_results_checked_against_the_seed(report):
    _, _, raw = report
    checks = {t["name"]: dict((what, c) for what, c in t["checks"]) for t in raw["tasks"]}
    # Weight sum is bit-identical to the seed's, in memory, into live tensors and through the CLI
    for task, label in (("ws_mem", "ours → new dict vs seed"), ("ws_mem", "ours → live tensors vs seed"),
                        ("ws_save", "ours CLI (process) vs seed merge + save")):
        c = checks[task][label]
        assert c["keys"] > 0 and c["identical"] == c["keys"], (task, c)
    # Add difference: ours rounds once, so it is within half an fp16 ulp of the exact value
    c = checks["adddiff_mem"]["ours → new dict vs exact A + α(B − C) (float64)"]
    assert c["keys"] > 0 and c["max_ulps"] <= 0.5 + 1e-9
    # smoothAdd was compared on every timed key; differences are fp16 rounding of values of order 1
    smooth = [c for what, c in checks["smoothadd"].items() if what.startswith("ours MT (same key subset)")]
    assert smooth and smooth[0]["keys"] > 0 and smooth[0]["max_abs"] < 1e-2
    # the re-merge check compares the live tensors with the seed formula
    assert "max abs diff 0" in next(iter(checks["remerge"].values()))


def test_targets_are_evaluated(report):
    _, text, raw = report
    names = [t["name"] for task in raw["tasks"] for t in task["targets"]]
    assert any("vs seed ≥ 5x" in n for n in names)
    assert any("≤ 10 %" in n for n in names)
    assert any("peak RSS ≤ 9 GB" in n for n in names)
    assert "## Targets (issue 6)" in text


def test_child_processes_report_rss(tmp_path):
    """The real mode: a task in fresh processes, with peak RSS from the child."""
    out = tmp_path / "R.md"
    args = ["--no-mecha", "--silent", "--factor", "16", "--cache", str(tmp_path / "models"),
            "--workdir", str(tmp_path / "work"), "--output", str(out), "--appendix", str(tmp_path / "none.md"),
            "--runs", "1", "--fast-runs", "1", "--quiet-wait", "0", "--tasks", "remerge"]
    assert bench_run.main(args) == 0
    raw = json.loads((tmp_path / "work" / "results.json").read_text())
    (task,) = raw["tasks"]
    m = task["rows"]["ours"]["measures"][0]
    assert m["error"] is None and m["rss"] and m["rss"] > 10**6
    assert "re-merge M00" in out.read_text()
