"""History: the merge log CSV, read back exactly, robust against crashes and foreign files."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import pytest

from lib_merge.core.errors import MergeError
from lib_merge.io.history import COLUMNS, History, HistoryWarning

ROOT = Path(__file__).resolve().parent.parent

EXPECTED_COLUMNS = [
    "id",
    "time",
    "name",
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
    "recipe",
]

RECIPE_1 = {
    "model_a": "animeA.safetensors",
    "model_b": "realB.safetensors",
    "model_c": None,
    "mode": "Weight sum",
    "calc": "normal",
    "alpha": 0.35,
    "beta": 0.0,
    "weights_alpha": "0,0.5,1,0.5,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "elemental": "IN00:attn:0.5\nOUT05:norm:0",
    "adjust": [0, 0, 0, 0, 1, 0, 0, 0],
    "seed": -1,
    "extra": {"nested": ["x", 1.5, True]},
}
RECIPE_2 = {
    "model_a": 'quote"d, comma.ckpt',
    "model_b": "Ümlaut 名前.safetensors",
    "mode": "Add difference",
    "alpha": 1,
}


def parse_file(path):
    """Independent reading of the CSV with the csv module."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


@pytest.fixture
def hist(tmp_path):
    return History(tmp_path / "logs" / "mergehistory.csv")


def test_columns_are_fixed():
    assert list(COLUMNS) == EXPECTED_COLUMNS


def test_append_creates_folder_header_and_rows(hist):
    assert hist.append("A + B", RECIPE_1) == 1
    assert hist.append("second", RECIPE_2) == 2
    rows = parse_file(hist.path)
    assert rows[0] == EXPECTED_COLUMNS
    assert len(rows) == 3
    first = dict(zip(EXPECTED_COLUMNS, rows[1], strict=True))
    assert first["id"] == "1" and first["name"] == "A + B"
    assert re.fullmatch(r"\d{4}\.\d{2}\.\d{2} \d{2}\.\d{2}\.\d{2}", first["time"])
    assert first["model_a"] == "animeA.safetensors" and first["model_c"] == ""
    assert first["alpha"] == "0.35" and first["seed"] == "-1"
    assert first["adjust"] == "[0, 0, 0, 0, 1, 0, 0, 0]"
    assert first["elemental"] == "IN00:attn:0.5\\nOUT05:norm:0"  # one physical line per row
    assert json.loads(first["recipe"]) == RECIPE_1
    second = dict(zip(EXPECTED_COLUMNS, rows[2], strict=True))
    assert second["model_a"] == 'quote"d, comma.ckpt'
    assert second["model_b"] == "Ümlaut 名前.safetensors"
    assert hist.path.read_bytes().count(b"\n") == 3


def test_get_is_exact_and_python_style(hist):
    for i in range(3):
        hist.append(f"m{i}", {**RECIPE_1, "alpha": i / 10})
    assert hist.get(1)["recipe"] == {**RECIPE_1, "alpha": 0.0}
    assert hist.get(-1)["id"] == 3 and hist.get(-1)["name"] == "m2"
    assert hist.get(-2)["id"] == 2
    assert hist.get(-3)["id"] == 1
    assert hist.recipe(2) == {**RECIPE_1, "alpha": 0.1}
    assert hist.recipe(-1)["elemental"] == "IN00:attn:0.5\nOUT05:norm:0"
    for bad in (0, 4, -4, 99):
        with pytest.raises(MergeError, match=str(bad)) as info:
            hist.get(bad)
        assert str(hist.path) in str(info.value)


def test_get_on_missing_file(hist):
    assert hist.rows() == []
    with pytest.raises(MergeError, match="empty"):
        hist.get(-1)
    assert not hist.path.exists()


def test_rows_and_limit(hist):
    for i in range(5):
        hist.append(f"m{i}", {"i": i})
    assert [r["id"] for r in hist.rows()] == [1, 2, 3, 4, 5]
    assert [r["id"] for r in hist.rows(limit=2)] == [4, 5]
    assert hist.rows(limit=0) == []
    assert [r["id"] for r in hist.rows(limit=50)] == [1, 2, 3, 4, 5]
    assert hist.rows()[0]["recipe"] == {"i": 0}


def test_search(hist):
    hist.append("anime merge", {"model_a": "AnimeA.safetensors", "model_b": "real.safetensors", "mode": "Weight sum"})
    hist.append("photo", {"model_a": "Photo.safetensors", "model_b": "real.safetensors", "mode": "Add difference"})
    hist.append("other", {"model_a": "x", "calc": "cosineA"})
    ids = lambda rows: [r["id"] for r in rows]  # noqa: E731
    assert ids(hist.search("ANIME")) == [1]
    assert ids(hist.search("real")) == [1, 2]
    assert ids(hist.search("real weight")) == [1]
    assert ids(hist.search("anime photo", mode="or")) == [1, 2]
    assert ids(hist.search("anime photo", mode="and")) == []
    assert ids(hist.search("COSINEA")) == [3]
    assert ids(hist.search("")) == [1, 2, 3]
    with pytest.raises(MergeError, match="and"):
        hist.search("x", mode="xor")


def test_torn_last_line_is_skipped_and_next_append_starts_fresh(hist):
    hist.append("one", RECIPE_1)
    hist.append("two", RECIPE_2)
    full = hist.path.read_bytes()
    # simulate a crash in the middle of writing row 3 (inside a quoted field)
    hist.append("three", {"model_a": "x, y", "alpha": 0.5})
    raw = hist.path.read_bytes()
    torn = raw[: len(full) + (len(raw) - len(full)) // 2]
    hist.path.write_bytes(torn)
    with pytest.warns(HistoryWarning, match="line 4"):
        rows = hist.rows()
    assert [r["id"] for r in rows] == [1, 2]
    with pytest.warns(HistoryWarning):
        assert hist.get(-1)["name"] == "two"
    # the torn row's merge happened (an image may name it as merge 3): its ID is not given again
    assert hist.append("after crash", {"alpha": 1}) == 4
    with pytest.warns(HistoryWarning):
        rows = hist.rows()
    assert [(r["id"], r["name"]) for r in rows] == [(1, "one"), (2, "two"), (4, "after crash")]
    assert hist.path.read_bytes().startswith(torn + b"\n")


@pytest.mark.parametrize("cut", [1, 5, 30, -40, -2])
def test_any_torn_tail_keeps_earlier_rows(hist, cut):
    hist.append("one", RECIPE_1)
    before = hist.path.read_bytes()
    hist.append("two", RECIPE_2)
    raw = hist.path.read_bytes()
    tail = len(raw) - len(before)
    keep = cut if cut > 0 else tail + cut
    hist.path.write_bytes(raw[: len(before) + keep])
    with pytest.warns(HistoryWarning):
        assert [r["id"] for r in hist.rows()] == [1]
    # once the torn row shows its ID ("2,"), that ID is taken; a lone "2" is no ID yet
    assert hist.append("three", {}) == (2 if keep < 2 else 3)
    with pytest.warns(HistoryWarning):
        assert [r["name"] for r in hist.rows()] == ["one", "three"]


def test_torn_utf8_in_last_line(hist):
    hist.append("名前", {"model_a": "名前"})
    raw = hist.path.read_bytes()
    hist.path.write_bytes(raw + "2,2024.01.01 00.00.00,名".encode()[:-1])
    with pytest.warns(HistoryWarning):
        assert [r["name"] for r in hist.rows()] == ["名前"]


def test_file_without_final_newline_but_complete_row(hist):
    hist.append("one", {"a": 1})
    hist.path.write_bytes(hist.path.read_bytes().rstrip(b"\n"))
    assert [r["id"] for r in hist.rows()] == [1]
    assert hist.append("two", {"a": 2}) == 2
    assert [r["recipe"] for r in hist.rows()] == [{"a": 1}, {"a": 2}]


def test_torn_header_of_new_file(hist):
    hist.path.parent.mkdir(parents=True)
    hist.path.write_bytes(b"id,time,na")
    with pytest.warns(HistoryWarning, match="header"):
        assert hist.rows() == []
    assert hist.append("first", {"a": 1}) == 1
    assert parse_file(hist.path)[0] == EXPECTED_COLUMNS
    assert [r["id"] for r in hist.rows()] == [1]


def test_empty_existing_file(hist):
    hist.path.parent.mkdir(parents=True)
    hist.path.write_bytes(b"")
    assert hist.rows() == []
    assert hist.append("first", {}) == 1
    assert len(parse_file(hist.path)) == 2


def test_foreign_file_is_refused_by_reads_and_set_aside_by_a_merge(hist):
    hist.path.parent.mkdir(parents=True)
    seed_header = '"ID","time","name","weights alpha","weights beta","model A"\n1,2023,x,1,2,a\n'
    hist.path.write_text(seed_header)
    for call in (hist.rows, lambda: hist.get(-1), lambda: hist.search("x")):
        with pytest.raises(MergeError, match="not a Block Merger history file") as info:
            call()
        assert str(hist.path) in str(info.value)
    assert hist.path.read_text() == seed_header  # reading never moves it
    with pytest.warns(HistoryWarning, match="not a Block Merger history file.*kept as") as caught:
        assert hist.append("n", {"a": 1}) == 1
    kept = [p for p in hist.path.parent.iterdir() if p.name.startswith("mergehistory.not-history-")]
    assert len(kept) == 1 and kept[0].name in str(caught[0].message)
    assert kept[0].read_text() == seed_header  # set aside, byte for byte, never deleted
    assert [r["recipe"] for r in hist.rows()] == [{"a": 1}]


def test_damaged_middle_line_is_skipped(hist):
    hist.append("one", {"a": 1})
    hist.append("two", {"a": 2})
    lines = hist.path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines.insert(2, "garbage,line\n")
    lines.insert(3, '9,t,n,,,,,,,,,,,,,,,,,"[1, 2]"\n')  # right width, recipe not an object
    hist.path.write_text("".join(lines), encoding="utf-8")
    with pytest.warns(HistoryWarning) as caught:
        assert [r["id"] for r in hist.rows()] == [1, 2]
    assert len(caught) == 2
    assert hist.append("three", {}) == 3  # appending does not repeat the warnings


def test_ids_continue_after_reopen(tmp_path):
    path = tmp_path / "h.csv"
    History(path).append("a", {})
    History(path).append("b", {})
    assert History(path).append("c", {}) == 3
    assert [r["id"] for r in History(path).rows()] == [1, 2, 3]


def test_unserialisable_recipe_is_refused_without_writing(hist):
    with pytest.raises(MergeError, match="JSON"):
        hist.append("bad", {"x": object()})
    assert not hist.path.exists()


def test_append_is_one_write_with_fsync(hist, monkeypatch):
    hist.append("one", {})
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    before = hist.path.read_bytes()
    hist.append("two", {"alpha": 0.5})
    after = hist.path.read_bytes()
    assert after.startswith(before)  # appended, never rewritten
    assert synced
    assert after[len(before) :].count(b"\n") == 1


def test_concurrent_appends_get_distinct_ids(hist):
    ids = []
    lock = threading.Lock()

    def worker(i):
        new = hist.append(f"t{i}", {"i": i})
        with lock:
            ids.append(new)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ids) == list(range(1, 11))
    assert sorted(r["recipe"]["i"] for r in hist.rows()) == list(range(10))


def test_crlf_file_is_read(hist):
    hist.append("one", {"a": 1})
    text = hist.path.read_text(encoding="utf-8").replace("\n", "\r\n")
    hist.path.write_bytes(text.encode("utf-8"))
    assert hist.get(-1)["recipe"] == {"a": 1}
    assert hist.append("two", {"a": 2}) == 2
    assert [r["name"] for r in hist.rows()] == ["one", "two"]


def test_recipe_column_is_authoritative(hist):
    """Display columns are for people; the recipe JSON reproduces the merge even if they are edited."""
    hist.append("one", RECIPE_1)
    rows = parse_file(hist.path)
    rows[1][EXPECTED_COLUMNS.index("alpha")] = "999"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    hist.path.write_text(buf.getvalue(), encoding="utf-8")
    row = hist.get(1)
    assert row["alpha"] == "999" and row["recipe"]["alpha"] == 0.35


# -- several processes, one log (issue 13, item 3) --------------------------------------------------------------

APPENDER = """
import os, sys, time
from lib_merge.io.history import History
path, who, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
while not os.path.exists(go):  # start together, so the appends really race
    time.sleep(0.005)
log = History(path)
for i in range(count):
    print(log.append(f"{who}-{i}", {"who": who, "i": i, "pad": who * 5000}), flush=True)
"""


def test_processes_appending_at_once_get_unique_ids_and_whole_rows(tmp_path):
    path, go = tmp_path / "shared" / "history.csv", tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), who, "15", str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for who in "abcde"]
    go.write_text("")
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    ids = [int(line) for out, _ in results for line in out.split()]
    assert sorted(ids) == list(range(1, 76))
    rows = parse_file(path)  # independent reading: every line a whole row of the right width
    assert rows[0] == EXPECTED_COLUMNS and all(len(r) == len(EXPECTED_COLUMNS) for r in rows[1:])
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 76))
    logged = sorted((json.loads(r[-1])["who"], json.loads(r[-1])["i"]) for r in rows[1:])
    assert logged == sorted((who, i) for who in "abcde" for i in range(15))
    assert all(json.loads(r[-1])["pad"] == json.loads(r[-1])["who"] * 5000 for r in rows[1:])


# -- the cost of a merge's row does not grow with the log (item 11) ---------------------------------------------


def big_history(path, count):
    """A log of `count` rows as appends would have written them (the template row repeated with new IDs)."""
    History(path).append("template", RECIPE_1)
    header, line = path.read_text(encoding="utf-8").splitlines(keepends=True)
    rest = line.split(",", 1)[1]
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(header)
        f.writelines(f"{i},{rest}" for i in range(1, count + 1))
    return History(path)


def bytes_read() -> int:
    """What this process has read through system calls so far (Linux)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts reads with Linux's /proc/self/io")
def test_appending_to_a_150000_row_log_reads_a_bounded_number_of_bytes(tmp_path):
    log = big_history(tmp_path / "big.csv", 150_000)
    size = log.path.stat().st_size
    assert size > 50_000_000
    before = bytes_read()
    assert log.append("next", {"alpha": 0.25}) == 150_001
    spent = bytes_read() - before
    assert spent < 1_000_000, f"read {spent} bytes of a {size}-byte log to append one row"
    last = log.path.read_bytes()[-2000:].split(b"\n")[-2].decode("utf-8")
    assert last.startswith("150001,") and last.endswith('"{""alpha"": 0.25}"')


def test_reading_a_large_log_streams_it(tmp_path):
    log = big_history(tmp_path / "big.csv", 20_000)
    size = log.path.stat().st_size
    for call in (lambda: log.search("nothing-matches-this"), lambda: log.rows(50), lambda: log.get(-2),
                 lambda: log.get(19_999)):
        tracemalloc.start()
        try:
            call()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < size / 10, f"peak {peak} bytes for a {size}-byte log"
    assert log.get(-2)["id"] == 19_999 and log.get(19_999)["id"] == 19_999
    assert [r["id"] for r in log.rows(3)] == [19_998, 19_999, 20_000]
    assert [r["id"] for r in log.search("realB", limit=2)] == [19_999, 20_000]
