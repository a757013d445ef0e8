"""History: the merge log CSV, read back exactly, robust against crashes and foreign files."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import threading

import pytest

from lib_merge.core.errors import MergeError
from lib_merge.io.history import COLUMNS, History, HistoryWarning

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
    assert hist.append("after crash", {"alpha": 1}) == 3
    with pytest.warns(HistoryWarning):
        rows = hist.rows()
    assert [(r["id"], r["name"]) for r in rows] == [(1, "one"), (2, "two"), (3, "after crash")]
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
    assert hist.append("three", {}) == 2
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


def test_foreign_file_is_never_touched(hist):
    hist.path.parent.mkdir(parents=True)
    seed_header = '"ID","time","name","weights alpha","weights beta","model A"\n1,2023,x,1,2,a\n'
    hist.path.write_text(seed_header)
    for call in (hist.rows, lambda: hist.get(-1), lambda: hist.search("x"), lambda: hist.append("n", {})):
        with pytest.raises(MergeError, match="not a Block Merger history file") as info:
            call()
        assert str(hist.path) in str(info.value)
    assert hist.path.read_text() == seed_header


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
