"""LoRA specs from a txt2img prompt: `<lora:name:mult>`, `<lora:name:te:unet>`, `<lora:name:mult:lbw=...>` and the
same with `<lyco:...>` (the WebUI's extra-network syntax, LoRA Block Weight's `lbw=`), as "get from prompt" does.

Unlike the seed (seed-lora-analysis.md §2.8): a missing multiplier means 1 (the WebUI's default) instead of an error,
a positional U-Net multiplier that differs from the text encoder's becomes BASE = te and every other block = unet
(26 values) instead of being read as a block preset, and the multiplier also scales literal `lbw=` values (#463).
"""

from __future__ import annotations

import re

from .blocks import LABELS

TAG = re.compile(r"<(?:lora|lyco):([^>]+)>", re.IGNORECASE)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def spec_of_tag(content: str) -> str:
    """`name:mult[:blocks]` for the inside of one tag."""
    items = [item.strip() for item in content.split(":")]
    name, rest = items[0], items[1:]
    named = dict(item.split("=", 1) for item in rest if "=" in item)
    named = {k.strip().lower(): v.strip() for k, v in named.items()}
    positional = [item for item in rest if "=" not in item]
    te = _number(named.get("te")) if "te" in named else _number(positional[0]) if positional else None
    unet = _number(named.get("unet")) if "unet" in named else _number(positional[1]) if len(positional) > 1 else None
    te = 1.0 if te is None else te
    unet = te if unet is None else unet
    blocks = named.get("lbw", "")
    if not blocks and len(positional) > 1 and _number(positional[1]) is None:
        blocks = positional[1]  # `<lora:name:1:PRESET>`: LoRA Block Weight's older positional preset
    if blocks or unet == te:
        return f"{name}:{unet:g}" + (f":{blocks}" if blocks else "")
    values = [te if label == "BASE" else unet for label in LABELS[26]]
    return f"{name}:1:" + ",".join(f"{v:g}" for v in values)


def specs_from_prompt(prompt: str) -> list[str]:
    """One spec per LoRA tag of the prompt, in prompt order."""
    return [spec_of_tag(m.group(1)) for m in TAG.finditer(prompt or "") if m.group(1).split(":")[0].strip()]
