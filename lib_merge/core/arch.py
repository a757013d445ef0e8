"""Which model family a checkpoint is, and which merge block each of its keys belongs to.

The block rules reproduce the seed system's mapping (SD1/SD2: 26 blocks; SDXL: 20 blocks plus finer labels used by
include/exclude), so that a shared block-weight recipe lands on the same tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import MergeError

BLOCKS_26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
BLOCKS_XL = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))

UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"

#: The six keys that "Adjust" changes, in the order of its multipliers.
ADJUST_KEYS = (
    UNET + "input_blocks.0.0.weight",
    UNET + "input_blocks.0.0.bias",
    UNET + "out.0.weight",
    UNET + "out.0.bias",
    UNET + "out.2.weight",
    UNET + "out.2.bias",
)

_SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
_SD2_TEXT = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
_SDXL_TEXT = "conditioner.embedders.1.model.ln_final.weight"
_SDXL_LABEL = UNET + "label_emb.0.0.weight"

#: The number of dimensions of every key whose shape the detection or "Adjust" reads: a file where one of them has
#: another rank is refused up front instead of failing (or indexing the wrong axis) later.
EXPECTED_RANKS = {
    _SD1_TEXT: 2, _SD2_TEXT: 2, _SDXL_TEXT: 1, _SDXL_LABEL: 2,
    **dict(zip(ADJUST_KEYS, (4, 1, 1, 1, 4, 1), strict=True)),
}


@dataclass(frozen=True)
class Arch:
    """A checkpoint's family ("sd1", "sd2" or "sdxl") and the input channels of its U-Net (4, 8 or 9)."""

    family: str
    in_channels: int = 4

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def blocks(self) -> tuple[str, ...]:
        """Block labels in weight-string order."""
        return BLOCKS_XL if self.is_sdxl else BLOCKS_26

    @property
    def variant(self) -> str:
        return {9: "inpainting", 8: "instruct-pix2pix"}.get(self.in_channels, "")

    def describe(self) -> str:
        name = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[self.family]
        return f"{name} {self.variant}".strip()

    def block_of(self, key: str) -> tuple[str, str] | None:
        """(fine label, block label) of a key, or None when the seed never merges it."""
        return _block_xl(key) if self.is_sdxl else _block_sd(key)


def detect_arch(keys: set[str] | dict, shape_of: Callable[[str], tuple[int, ...]], name: str = "model") -> Arch:
    """Tell the family from marker keys, as the WebUI does, and the U-Net's input channels from conv_in's shape."""
    if _SDXL_TEXT in keys or _SDXL_LABEL in keys:
        family = "sdxl"
    elif _SD2_TEXT in keys:
        family = "sd2"
    elif _SD1_TEXT in keys or CONV_IN in keys:
        family = "sd1"
    else:
        raise MergeError(
            f"{name} is not a Stable Diffusion 1.x, 2.x or SDXL checkpoint (no text encoder or U-Net keys found)."
        )
    for key, rank in EXPECTED_RANKS.items():
        if key in keys and len(shape := tuple(shape_of(key))) != rank:
            raise MergeError(
                f"{name} is damaged or not a Stable Diffusion checkpoint: {key} has shape {list(shape)}, but it has "
                f"{rank} dimension{'s' if rank > 1 else ''} in every SD1, SD2 and SDXL model."
            )
    channels = shape_of(CONV_IN)[1] if CONV_IN in keys else 4
    return Arch(family, channels)


_RE_IN = re.compile(r"\.input_blocks\.(\d+)\.")
_RE_MID = re.compile(r"\.middle_block\.(\d+)\.")
_RE_OUT = re.compile(r"\.output_blocks\.(\d+)\.")


def _block_sd(key: str) -> tuple[str, str]:
    if "time_embed" in key:
        label = "IN00"
    elif ".out." in key:
        label = "OUT11"
    elif m := _RE_IN.search(key):
        label = f"IN{int(m.group(1)):02d}"
    elif _RE_MID.search(key):
        label = "M00"
    elif m := _RE_OUT.search(key):
        label = f"OUT{int(m.group(1)):02d}"
    else:
        label = "BASE"
    return label, label


_RE_XL_PART = re.compile(r"input|mid|output")
_RE_XL_TB = re.compile(r"transformer_blocks\.(\d+)\.")


def _block_xl(key: str) -> tuple[str, str] | None:
    if "weight" not in key and "bias" not in key:
        return None
    if "label_emb" in key:
        return "LABEL", "IN00"
    if "time_embed" in key:
        return "TIME", "IN00"
    if "conditioner.embedders.0." in key:
        return "CLIPL", "BASE"
    if "conditioner.embedders.1." in key:
        return "CLIPG", "BASE"
    if "first_stage_model" in key:
        return "VAE", "BASE"
    if UNET not in key:
        return None
    if UNET + "out." in key:
        return "OUT9", "OUT08"
    part = _RE_XL_PART.search(key)
    prefix = part.group(0).upper().replace("PUT", "") if part else ""
    digits = re.sub(r"\D", "", key)
    nums = digits[:1] + "0" if prefix == "MID" else digits[:2]
    if not nums or not prefix:
        return "M00", "M00"
    tb = _RE_XL_TB.search(key)
    fine = prefix + nums + (tb.group(1) if tb else "")
    return fine, ("M00" if prefix == "MID" else f"{prefix}0{nums[0]}")
