"""Which model family a LoRA was trained for, from its names and its shapes.

Names alone cannot tell SD1 from SD2 (kohya names both the diffusers way), so the cross-attention context width
(768 SD1, 1024 SD2, 2048 SDXL) and the text encoder's width decide where the names do not.
"""

from __future__ import annotations

import re

from .formats import LoraError, LoraFile
from .keys import FAMILIES, FAMILY_NAMES, split_name

_CONTEXT = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def lora_families(lora: LoraFile) -> tuple[set[str], str]:
    """(families the LoRA fits, the evidence in words). All three when nothing tells them apart."""
    possible = set(FAMILIES)
    evidence = ""

    def narrow(allowed: set[str], why: str) -> None:
        nonlocal possible, evidence
        if possible & allowed:
            if not possible <= allowed:
                evidence = why
            possible &= allowed

    for name, module in lora.modules.items():
        split = split_name(name)
        if split is None or not module.supported:
            continue
        component, rest = split
        if component == "te2" or name.startswith("lora_te1_"):
            narrow({"sdxl"}, "it has modules for SDXL's second text encoder")
            continue
        if component == "unet":
            if re.match(r"up_blocks_0_attentions|down_blocks_\d+_attentions_\d+_transformer_blocks_[1-9]", rest):
                narrow({"sdxl"}, f"its module {name} exists only in SDXL's U-Net")
            elif re.match(r"input_blocks_[12]_1_|down_blocks_0_attentions", rest):
                narrow({"sd1", "sd2"}, f"its module {name} exists only in SD1/SD2's U-Net")
        shape = module.raw_shape
        if shape is None or len(shape) < 2:
            continue
        if component == "unet" and re.search(r"attn2_to_[kv]$", rest) and shape[1] in _CONTEXT:
            family = _CONTEXT[shape[1]]
            narrow({family}, f"its cross-attention context is {shape[1]} wide ({FAMILY_NAMES[family]})")
        elif component == "te1" and rest.endswith("self_attn_q_proj"):
            narrow({"sd2"} if shape[0] == 1024 else {"sd1", "sdxl"},
                   f"its text encoder is {shape[0]} wide")
    return possible, evidence


def check_family(lora: LoraFile, family: str, model_name: str) -> None:
    """Refuse a LoRA made for another architecture than the model's, saying which."""
    possible, evidence = lora_families(lora)
    if family not in possible:
        made_for = " or ".join(FAMILY_NAMES[f] for f in FAMILIES if f in possible)
        raise LoraError(f"LoRA {lora.name} is for {made_for} ({evidence}), but {model_name} is "
                        f"{FAMILY_NAMES[family]}; choose a LoRA made for {FAMILY_NAMES[family]}.")
