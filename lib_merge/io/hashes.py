"""Model hashes as the WebUI computes them, cached so a multi-GB file is read once.

The full sha256 identifies models in merge metadata and history; its first 10 hex digits are the WebUI's
"shorthash"; the legacy 8-hex hash (64 KiB at offset 1 MiB) is what old infotexts and `sd_merge_models` carry.
Entries are keyed by resolved path and invalidated by a change of size, mtime, inode or ctime: the WebUI's own cache
looks at mtime only, so a file rewritten in place with its old mtime put back (`cp -p`, `touch -r`, `rsync -t`) kept
its old hash there. The ctime cannot be set back (any write or utime moves it), and the inode changes when a file is
replaced by another.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import warnings
from pathlib import Path

from ..core import untrusted_json
from .format import CheckpointError
from .read import file_identity
from .write import atomic_output

BLOCK = 1024 * 1024
LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000
CACHE_VERSION = 1
MAX_CACHE_BYTES = 64_000_000  # about 200,000 models; a bigger file is not ours


class HashCache:
    """sha256 / short / legacy hashes of files, optionally persisted to a JSON file (written atomically)."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, object]] = self._load()

    def _load(self) -> dict[str, dict[str, object]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            with open(self.path, "rb") as f:  # never more than the limit in memory, whatever lies there
                doc = untrusted_json.loads(f.read(MAX_CACHE_BYTES + 1), MAX_CACHE_BYTES)
            if doc.get("version") == CACHE_VERSION and isinstance(doc.get("entries"), dict):
                return {k: v for k, v in doc["entries"].items() if isinstance(v, dict)}
        except (OSError, ValueError, AttributeError) as e:
            warnings.warn(f"Hash cache {self.path} is unreadable ({e}); hashes will be recomputed.", stacklevel=3)
            return {}
        warnings.warn(f"Hash cache {self.path} has an unknown format; hashes will be recomputed.", stacklevel=3)
        return {}

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"version": CACHE_VERSION, "entries": self._entries}, indent=1, sort_keys=True)
            with atomic_output(self.path, overwrite=True) as tmp:
                tmp.write_text(text, encoding="utf-8")
        except (OSError, CheckpointError) as e:  # a cache that cannot be saved only costs time later
            warnings.warn(f"Could not save hash cache {self.path}: {e}", stacklevel=3)

    @staticmethod
    def _stamp(st: os.stat_result) -> dict[str, int]:
        """`io.read.file_identity` without the device number, which may change across reboots (a persisted cache
        would then hash every model again)."""
        _, inode, size, mtime_ns, ctime_ns = file_identity(st)
        return {"size": size, "mtime_ns": mtime_ns, "inode": inode, "ctime_ns": ctime_ns}

    def _identity(self, path: Path) -> tuple[str, dict[str, int]]:
        resolved = path.resolve()
        return str(resolved), self._stamp(resolved.stat())

    @staticmethod
    def _matches(entry: dict[str, object] | None, stamp: dict[str, int]) -> bool:
        return bool(entry) and all(entry.get(field) == value for field, value in stamp.items())

    def _lookup(self, key: str, stamp: dict[str, int], field: str) -> object | None:
        with self._lock:
            entry = self._entries.get(key)
            return entry.get(field) if self._matches(entry, stamp) else None

    def _store(self, key: str, stamp: dict[str, int], field: str, value: object) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if not self._matches(entry, stamp):
                entry = dict(stamp)
                self._entries[key] = entry
            entry[field] = value
            self._save()

    def _cached(self, path: Path, field: str, compute) -> str:
        key, stamp = self._identity(path)
        value = self._lookup(key, stamp, field)
        if value is not None:
            return str(value)
        value = compute(Path(key))
        if self._identity(path)[1] == stamp:  # else it changed while we read it: do not keep this value
            self._store(key, stamp, field, value)
        return value

    def all_finite(self, path: str | os.PathLike[str]) -> bool:
        """Whether a merge found every value of the file, as it is now, finite (`mark_finite`)."""
        try:
            key, stamp = self._identity(Path(path))
        except OSError:
            return False
        return self._lookup(key, stamp, "finite") is True

    def mark_finite(self, path: str | os.PathLike[str], opened: tuple[int, ...]) -> None:
        """Remember that every value of the file is finite: `opened` is the `io.read.file_identity` of the file whose
        values were read; nothing is remembered when the file is no longer that one."""
        with contextlib.suppress(OSError):
            resolved = Path(path).resolve()
            st = resolved.stat()
            if file_identity(st) == opened:
                self._store(str(resolved), self._stamp(st), "finite", True)

    def sha256(self, path: str | os.PathLike[str]) -> str:
        """Full sha256 (hex) of the file, read in 1 MiB blocks."""
        path = Path(path)
        try:
            return self._cached(path, "sha256", _sha256_file)
        except OSError as e:
            raise CheckpointError(f"Cannot hash {path}: {e.strerror or e}; check that the file exists.") from e

    def short_hash(self, path: str | os.PathLike[str]) -> str:
        """The WebUI's shorthash: the first 10 hex digits of the sha256."""
        return self.sha256(path)[:10]

    def legacy_hash(self, path: str | os.PathLike[str]) -> str:
        """The WebUI's old model hash (sha256 of 64 KiB at offset 1 MiB, 8 hex), or "NOFILE" if unreadable."""
        try:
            return self._cached(Path(path), "legacy", _legacy_file)
        except OSError:
            return "NOFILE"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _legacy_file(path: Path) -> str:
    """A file shorter than 1 MiB hashes what is there (possibly nothing), exactly as the WebUI does."""
    with open(path, "rb") as f:
        f.seek(LEGACY_OFFSET)
        return hashlib.sha256(f.read(LEGACY_LENGTH)).hexdigest()[:8]
