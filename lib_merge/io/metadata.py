"""Output metadata and file names, compatible with the WebUI's own merger and the seed's naming.

The WebUI shows `sd_merge_recipe` / `sd_merge_models` in its metadata viewer and follows the parent tree through
`sd_merge_models`, so we write exactly its shape. Names are derived from the merge name the way users know from
the seed, but a name can never escape the output folder or exceed file-system limits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from ..core import untrusted_json
from ..core.errors import MergeError

MAX_STEM = 240  # characters (and UTF-8 bytes) before the extension, as the seed cuts long paths
_UNSAFE = '/\\:*?"<>|\0'


def _decode_json(value: str) -> object:
    """An input's metadata value decoded; text that is not (reasonable) JSON is kept as the text it is."""
    try:
        return untrusted_json.loads(value, len(value))  # the header it came from was already size-checked
    except ValueError:
        return value


def merge_metadata(
    recipe_json: str,
    models: Sequence[tuple[str, str, str] | tuple[str, str, str, Mapping[str, str] | None]],
) -> dict[str, str]:
    """safetensors metadata for a merge of `models`: (name, sha256, legacy_hash[, that file's own metadata]).

    When an input was itself a merge, its recipe is kept in its entry and its own `sd_merge_models` entries are
    merged in, as the WebUI's merger does, so the whole family tree survives.
    """
    tree: dict[str, object] = {}
    parents: dict[str, object] = {}
    for item in models:
        name, sha256, legacy = item[0], item[1], item[2]
        own = item[3] if len(item) > 3 else None
        entry: dict[str, object] = {"name": name, "legacy_hash": legacy}
        if own and "sd_merge_recipe" in own:
            entry["sd_merge_recipe"] = _decode_json(own["sd_merge_recipe"])
        tree[sha256] = entry
        if own and own.get("sd_merge_models"):
            inherited = _decode_json(own["sd_merge_models"])
            if isinstance(inherited, dict):
                parents.update(inherited)
    for sha, entry in parents.items():
        tree.setdefault(sha, entry)  # a direct input's own entry wins
    return {"format": "pt", "sd_merge_recipe": recipe_json, "sd_merge_models": json.dumps(tree)}


def check_name_encoding(path: str | os.PathLike[str], what: str) -> None:
    """Refuse a path that is not valid UTF-8 (Python holds its stray bytes as lone surrogates): it could not be
    printed, logged in the history or written into a model's metadata, so it is refused before anything is read or
    written, naming the offending bytes."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")
        raise MergeError(f"The {what} path {shown} is not valid UTF-8; rename the file (or folder) with valid "
                         "characters.") from None


def _cut_utf8(text: str, limit: int) -> str:
    text = text[:limit]
    while len(text.encode("utf-8")) > limit:
        text = text[:-1]
    return text


def default_output_name(merge_name: str, save_dtype: str, in_channels: int, ext: str) -> str:
    """The seed's default file name: spaces removed, `,()` -> `_`, `.fp16`, `-inpainting`/`-instruct-pix2pix`."""
    name = merge_name.replace(" ", "")
    for ch in ",()":
        name = name.replace(ch, "_")
    if name.startswith("_"):
        name = name[1:]
    # Fixed from the seed: characters no file system accepts (and path separators) never reach the file name.
    name = "".join("_" if ch in _UNSAFE or ord(ch) < 32 else ch for ch in name).lstrip(".")
    name = name or "merged"
    suffix = ".fp16" if save_dtype == "fp16" else ""
    if in_channels == 9:
        suffix += "-inpainting"
    elif in_channels == 8:
        suffix += "-instruct-pix2pix"
    ext = ext if ext.startswith(".") else "." + ext
    stem = _cut_utf8(name, MAX_STEM - len(suffix)) + suffix
    return stem + ext


#: Names Windows reserves for devices, with or without an extension (`CON`, `con.safetensors`, `COM1 .x`).
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in (*"123456789", "¹", "²", "³"))}


def validate_custom_name(name: str) -> str:
    """Check a user-typed output name (without folder); returns it stripped of surrounding spaces.

    A name any common file system would refuse or reinterpret is refused on every platform, so a name that works
    here works everywhere (on Windows `a:b` would write an NTFS alternate stream, `CON` a device).
    """
    if not isinstance(name, str):
        raise MergeError(f"The output name must be text, not {name!r:.60}.")
    stripped = name.strip()
    if not stripped:
        raise MergeError("The output name is empty; type a file name.")
    size = len(stripped.encode("utf-8", errors="surrogatepass"))
    if size > MAX_STEM:
        raise MergeError(f"The output name is {size} bytes long; at most {MAX_STEM} are allowed. Shorten it.")
    if "\0" in stripped:
        raise MergeError("The output name contains a NUL character; remove it.")
    if "/" in stripped or "\\" in stripped:
        raise MergeError(f"The output name {stripped!r} contains a path separator; give a plain file name.")
    bad = sorted({ch for ch in stripped if ch in _UNSAFE or ord(ch) < 32 or ord(ch) == 127})
    if bad:
        raise MergeError(f"The output name {stripped!r} contains {' '.join(repr(ch) for ch in bad)}, which Windows "
                         f"does not allow in file names; remove {'it' if len(bad) == 1 else 'them'}.")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in stripped):
        raise MergeError(f"The output name {stripped!r} is not valid Unicode text; retype it.")
    if stripped.endswith("."):
        raise MergeError(f"The output name {stripped!r} ends with '.', which Windows drops; remove the dot.")
    if stripped.split(".")[0].rstrip(" ").upper() in _RESERVED:
        raise MergeError(f"The output name {stripped!r} is a device name on Windows; choose another name.")
    if ".." in stripped:
        raise MergeError(f"The output name {stripped!r} contains '..'; give a plain file name.")
    if stripped.startswith("."):
        raise MergeError(f"The output name {stripped!r} starts with '.', which hides the file; remove the dot.")
    return stripped
