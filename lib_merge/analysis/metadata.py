"""A model's safetensors metadata, shown readably: the merge recipe (Block Merger's, the WebUI merger's or
SuperMerger's `sd_merge_recipe`), the models it was merged from (`sd_merge_models`), training metadata (kohya's
`ss_*`), and anything else. The seed dumps the raw dictionary as JSON; here each part gets a heading and JSON values
are decoded and indented, so a recipe reads as `mode: Weight sum` rather than one escaped line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ..core import untrusted_json
from ..io.checkpoint import open_checkpoint

RECIPE_KEY = "sd_merge_recipe"
MODELS_KEY = "sd_merge_models"
TRAINING_PREFIX = "ss_"
#: kohya's training values that are long JSON tables (tag counts, bucket sizes): summarised, not printed whole
LONG_TRAINING_KEYS = ("ss_tag_frequency", "ss_bucket_info", "ss_dataset_dirs", "ss_datasets")
LONG_LIMIT = 600


def _decoded(value: str) -> object:
    try:
        return untrusted_json.loads(value, len(value))  # from a header the reader has already size-checked
    except ValueError:
        return value


def _lines(value: object, indent: str = "  ") -> list[str]:
    """`name: value` lines for a decoded JSON object (nested objects indented), the text itself otherwise."""
    if isinstance(value, dict):
        out = []
        for name, item in value.items():
            if isinstance(item, dict) and item:
                out.append(f"{indent}{name}:")
                out += _lines(item, indent + "  ")
            else:
                out.append(f"{indent}{name}: {_short(item)}")
        return out
    return [f"{indent}{_short(value)}"]


def _short(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= LONG_LIMIT else f"{text[:LONG_LIMIT]}… ({len(text):,} characters)"


def _entry(name: str, value: object) -> list[str]:
    """One metadata entry: `name: value`, or the name (with the size of a long table) over its indented items."""
    if not isinstance(value, dict):
        return [f"  {name}: {_short(value)}"]
    size = f" {len(value)} entries" if name in LONG_TRAINING_KEYS else ""
    return [f"  {name}:{size}", *_lines(value, "    ")]


def describe_metadata(metadata: Mapping[str, str]) -> str:
    """The metadata as readable text in sections: merge recipe, merged from, training, other."""
    if not metadata:
        return "No metadata in this file."
    sections: list[str] = []
    if RECIPE_KEY in metadata:
        recipe = _decoded(metadata[RECIPE_KEY])
        kind = recipe.get("type", "the WebUI's merger") if isinstance(recipe, dict) else "text"
        sections.append("\n".join([f"Merge recipe ({kind}):", *_lines(recipe)]))
    if MODELS_KEY in metadata:
        models = _decoded(metadata[MODELS_KEY])
        lines = ["Merged from:"]
        if isinstance(models, dict):
            for sha, entry in models.items():
                name = entry.get("name", "?") if isinstance(entry, dict) else entry
                lines.append(f"  {name}  (sha256 {sha})")
                if isinstance(entry, dict) and isinstance(entry.get(RECIPE_KEY), dict):
                    lines.append("    itself a merge:")
                    lines += _lines(entry[RECIPE_KEY], "      ")
        else:
            lines += _lines(models)
        sections.append("\n".join(lines))
    training = sorted(k for k in metadata if k.startswith(TRAINING_PREFIX))
    if training:
        lines = [f"Training metadata ({len(training)} fields):"]
        for name in training:
            lines += _entry(name, _decoded(metadata[name]))
        sections.append("\n".join(lines))
    other = sorted(k for k in metadata if k not in (RECIPE_KEY, MODELS_KEY) and not k.startswith(TRAINING_PREFIX))
    if other:
        lines = ["Other:"]
        for name in other:
            lines += _entry(name, _decoded(metadata[name]))
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def model_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata of a model file (read from the header only); {} for a .ckpt (it has none)."""
    with open_checkpoint(path) as ckpt:
        return dict(ckpt.metadata)
