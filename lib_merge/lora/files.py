"""LoRA files in a folder: the names a host lists, and the file a name (as typed, or from a prompt) means.

A name is a path relative to the folder, with or without its extension, or a bare file stem as the WebUI's
`<lora:stem:1>` prompt syntax uses it (found anywhere below the folder when exactly one file has that stem).
"""

from __future__ import annotations

from pathlib import Path

from .formats import LoraError

LORA_EXTS = (".safetensors", ".pt", ".ckpt")


def list_lora_files(folder: Path) -> list[str]:
    """Names (relative paths, '/'-separated) of the LoRA files below `folder`, sorted; [] when it does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = (p for p in folder.rglob("*") if p.suffix.lower() in LORA_EXTS and p.is_file())
    return sorted((p.relative_to(folder).as_posix() for p in found), key=str.lower)


def find_lora(folder: Path, name: str) -> Path:
    """The file `name` means below `folder` (an absolute path is taken as it is); LoraError naming the folder."""
    name = (name or "").strip()
    if not name:
        raise LoraError("No LoRA named; choose one from the list.")
    given = Path(name)
    if given.is_absolute():
        if given.is_file():
            return given
        raise LoraError(f"LoRA file {name} does not exist.")
    folder = Path(folder)
    root = folder.resolve()
    for candidate in (folder / name, *(folder / (name + ext) for ext in LORA_EXTS)):
        path = candidate.resolve()
        if path.is_file() and root in path.parents:
            return path
    stem = given.name
    matches = [folder / n for n in list_lora_files(folder) if Path(n).stem == stem]
    if len(matches) == 1:
        return matches[0].resolve()
    if matches:
        raise LoraError(f"LoRA name {name!r} fits {len(matches)} files in {folder} "
                        f"({', '.join(str(m.relative_to(folder)) for m in matches[:4])}); give its folder too.")
    raise LoraError(f"Unknown LoRA {name!r}: no such file in {folder} (press Refresh after adding files).")
