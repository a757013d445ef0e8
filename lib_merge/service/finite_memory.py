"""Files a merge found finite are not checked again, in this process or the next.

The engine checks every merged key for inf/NaN (core.finite). Where the result is finite exactly when the inputs are
(a fp16 Weight sum at 0 < alpha < 1), a key found finite is marked on the open checkpoint and later merges skip its
check (core.engine). Once every key of a file is marked, the hash cache remembers it, keyed by the file's identity
(size, mtime, inode, ctime; io.hashes), so the next CLI run or reopening of the file starts with every key known:
only the first merge of a file pays for the check. A file changed on disk is a new identity and is checked again.
"""

from __future__ import annotations

from ..core.engine import Models
from ..io.hashes import HashCache


def _files(models: Models):
    for source in (models.a, models.b, models.c, *models.others):
        if source is not None and getattr(source, "path", None) is not None and hasattr(source, "finite_keys"):
            yield source


def recall(models: Models, hashes: HashCache) -> None:
    """Mark every key of the files the cache knows to be finite."""
    for source in _files(models):
        if len(source.finite_keys) < len(source) and hashes.all_finite(source.path):
            source.finite_keys.update(source.keys())


def remember(models: Models, hashes: HashCache) -> None:
    """Tell the cache about the files whose every floating-point key a merge has now found finite."""
    for source in _files(models):
        if source.opened_as is None or hashes.all_finite(source.path):
            continue
        if all(key in source.finite_keys or not source.dtype(key).is_floating_point for key in source.keys()):
            hashes.mark_finite(source.path, source.opened_as)
