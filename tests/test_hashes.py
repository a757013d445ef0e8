"""HashCache: WebUI-compatible hashes computed once per file version."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from lib_merge.io.checkpoint import CheckpointError
from lib_merge.io.hashes import HashCache

MIB = 1024 * 1024


def make_file(path: Path, size: int, seed: int = 1) -> bytes:
    data = bytes((i * 31 + seed * 7 + (i >> 8)) & 0xFF for i in range(size))
    path.write_bytes(data)
    return data


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.safetensors"
    data = make_file(path, 2 * MIB + 12345)  # longer than 1 MiB + 64 KiB, and not a whole number of blocks
    return path, data


def counting_opens(monkeypatch):
    """Count real opens of regular files for reading through builtins.open."""
    opened: list[str] = []
    real = builtins.open

    def spy(file, mode="r", *a, **k):
        if "r" in mode and isinstance(file, (str, os.PathLike)) and str(file).endswith(".safetensors"):
            opened.append(str(file))
        return real(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    return opened


def test_sha256_matches_hashlib(model):
    path, data = model
    cache = HashCache()
    assert cache.sha256(path) == hashlib.sha256(data).hexdigest()
    assert cache.short_hash(path) == hashlib.sha256(data).hexdigest()[:10]


def test_legacy_hash_matches_webui_definition(model):
    path, data = model
    expected = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    assert HashCache().legacy_hash(path) == expected


def test_legacy_hash_of_small_files(tmp_path):
    """Shorter than 1 MiB: the WebUI hashes the (empty) read past the end; partly covered: what is there."""
    small = tmp_path / "small.ckpt"
    make_file(small, 1000)
    assert HashCache().legacy_hash(small) == hashlib.sha256(b"").hexdigest()[:8]
    partial = tmp_path / "partial.ckpt"
    data = make_file(partial, MIB + 100)
    assert HashCache().legacy_hash(partial) == hashlib.sha256(data[MIB:]).hexdigest()[:8]


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert HashCache().sha256(empty) == hashlib.sha256(b"").hexdigest()


def test_legacy_hash_nofile(tmp_path):
    cache = HashCache()
    assert cache.legacy_hash(tmp_path / "missing.ckpt") == "NOFILE"
    (tmp_path / "dir.ckpt").mkdir()
    assert cache.legacy_hash(tmp_path / "dir.ckpt") == "NOFILE"


def test_sha256_missing_file_is_clear_error(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError) as info:
        HashCache().sha256(missing)
    assert "missing.safetensors" in str(info.value)


def test_cache_hit_does_not_reread(model, monkeypatch):
    path, data = model
    cache = HashCache()
    opened = counting_opens(monkeypatch)
    first = cache.sha256(path)
    assert len(opened) == 1
    assert cache.sha256(path) == first
    assert cache.short_hash(path) == first[:10]
    assert len(opened) == 1
    cache.legacy_hash(path)
    cache.legacy_hash(path)
    assert len(opened) == 2


def test_same_file_by_other_spelling_is_a_hit(model, monkeypatch):
    path, _ = model
    cache = HashCache()
    cache.sha256(path)
    opened = counting_opens(monkeypatch)
    cache.sha256(path.parent / "." / path.name)
    assert opened == []


def test_changed_file_is_rehashed(model, monkeypatch):
    path, data = model
    cache = HashCache()
    old = cache.sha256(path)
    old_legacy = cache.legacy_hash(path)
    new_data = bytearray(data)
    new_data[0x100000 + 5] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(new_data))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    opened = counting_opens(monkeypatch)
    assert cache.sha256(path) == hashlib.sha256(bytes(new_data)).hexdigest() != old
    assert cache.legacy_hash(path) != old_legacy
    assert len(opened) == 2


def test_size_change_alone_invalidates(model):
    path, data = model
    cache = HashCache()
    cache.sha256(path)
    st = path.stat()
    with open(path, "ab") as f:
        f.write(b"x")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, bigger file
    assert cache.sha256(path) == hashlib.sha256(data + b"x").hexdigest()


def _after_a_clock_tick(path: Path) -> None:
    """Wait until the clock is 50 ms past `path`'s ctime: the kernel stamps ctimes from a coarse clock (a few ms), so a
    write at once could get the same ctime. A wait on the clock's progress, not on how fast this machine is."""
    while time.time_ns() < path.stat().st_ctime_ns + 50_000_000:
        time.sleep(0.01)


@pytest.mark.parametrize("persisted", [False, True])
def test_a_file_rewritten_in_place_with_its_mtime_put_back_is_rehashed(model, tmp_path, persisted):
    """`cp -p`, `touch -r` or `rsync -t` put the old mtime back on new bytes of the same size: the WebUI's own cache
    (mtime only) keeps the old hash then; the ctime, which no tool can set back, tells."""
    path, data = model
    store = tmp_path / "hashes.json" if persisted else None
    cache = HashCache(store)
    old = cache.sha256(path)
    st = path.stat()
    _after_a_clock_tick(path)
    new_data = bytearray(data)
    new_data[7] ^= 0xFF
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(new_data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino) == (st.st_size, st.st_mtime_ns,
                                                                                  st.st_ino)
    reader = HashCache(store) if persisted else cache
    assert reader.sha256(path) == hashlib.sha256(bytes(new_data)).hexdigest() != old


def test_a_file_replaced_by_another_of_the_same_size_and_mtime_is_rehashed(model, tmp_path):
    path, data = model
    cache = HashCache()
    old = cache.sha256(path)
    st = path.stat()
    other = tmp_path / "other.bin"
    new_data = bytes(reversed(data))
    other.write_bytes(new_data)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)  # a new inode under the old name
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert cache.sha256(path) == hashlib.sha256(new_data).hexdigest() != old


def test_persisted_cache_survives_new_instance(model, tmp_path, monkeypatch):
    path, data = model
    store = tmp_path / "cache" / "hashes.json"
    HashCache(store).sha256(path)
    doc = json.loads(store.read_text())
    assert doc["version"] == 1
    (entry,) = doc["entries"].values()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["size"] == len(data)
    opened = counting_opens(monkeypatch)
    assert HashCache(store).sha256(path) == hashlib.sha256(data).hexdigest()
    assert opened == []
    assert [p.name for p in store.parent.iterdir()] == ["hashes.json"]  # no temp files left behind


def test_persisted_cache_is_invalidated_by_change(model, tmp_path):
    path, _ = model
    store = tmp_path / "hashes.json"
    HashCache(store).sha256(path)
    new = make_file(path, 3000, seed=9)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert HashCache(store).sha256(path) == hashlib.sha256(new).hexdigest()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 99, "entries": {}}', ""])
def test_corrupt_cache_file_is_ignored_with_warning(model, tmp_path, content):
    path, data = model
    store = tmp_path / "hashes.json"
    store.write_text(content)
    with pytest.warns(UserWarning, match="hashes.json"):
        cache = HashCache(store)
    assert cache.sha256(path) == hashlib.sha256(data).hexdigest()
    assert json.loads(store.read_text())["version"] == 1


def test_unwritable_cache_only_warns(model, tmp_path):
    path, data = model
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = HashCache(blocker / "hashes.json")  # parent is a file: cannot be created
    with pytest.warns(UserWarning, match="Could not save"):
        assert cache.sha256(path) == hashlib.sha256(data).hexdigest()


def test_file_changing_during_hash_is_not_cached(model, monkeypatch):
    path, data = model
    cache = HashCache()
    from lib_merge.io import hashes

    real = hashes._sha256_file

    def racing(p):
        value = real(p)
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 7_000_000_000))
        return value

    monkeypatch.setattr(hashes, "_sha256_file", racing)
    cache.sha256(path)
    monkeypatch.setattr(hashes, "_sha256_file", real)
    opened = counting_opens(monkeypatch)
    cache.sha256(path)
    assert len(opened) == 1  # recomputed, the racy value was not trusted
