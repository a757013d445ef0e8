"""modules.hashes: sha256 of whole files, cached by title ("checkpoint/<name>") and file mtime, as the WebUI does."""

import hashlib
import os

cache = {}  # title -> {"mtime": ..., "sha256": ...}
computed = []  # titles whose file was actually hashed


def sha256_from_cache(filename, title, use_addnet_hash=False):
    entry = cache.get(title)
    if entry is None or entry["mtime"] < os.path.getmtime(filename):
        return None
    return entry["sha256"]


def sha256(filename, title, use_addnet_hash=False):
    found = sha256_from_cache(filename, title)
    if found is not None:
        return found
    if not os.path.isfile(filename):
        return None
    with open(filename, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    computed.append(title)
    cache[title] = {"mtime": os.path.getmtime(filename), "sha256": digest}
    return digest
