"""Which model family a checkpoint is, and which merge block each of its keys belongs to.

The block rules reproduce the seed system's mapping (SD1/SD2: 26 blocks; SDXL: 20 blocks plus finer labels used by
include/exclude; Flux: 61 blocks), so that a shared block-weight recipe lands on the same tensors.

Flux comes in several key layouts, all recognised: the all-in-one file Forge and ComfyUI write
(`model.diffusion_model.*`, `text_encoders.clip_l.*`, `text_encoders.t5xxl.*`, `vae.*`), Black Forest Labs' bare
diffusion model (`double_blocks.*`, ...), and the separate text encoder files (bare CLIP-L `text_model.*`, bare T5-XXL
`encoder.block.*`/`shared.weight`) and autoencoder (`decoder.*`/`encoder.*`). Dev and schnell differ only by dev's
`guidance_in`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import MergeError

BLOCKS_26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
BLOCKS_XL = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))

def _fine(prefix: str, block: str, depth: int) -> tuple[str, ...]:
    """A transformer block's fine labels: its own (e.g. IN41: norm and projections) and one per transformer block."""
    return (f"{prefix}{block}", *(f"{prefix}{block}{i}" for i in range(depth)))


#: SDXL's 110 fine block labels (the seed's extended XL weights, §3.3), in weight-string order. IN0 is never produced
#: by a key (input_blocks.0 is IN00); CLIPL and VAE take the first value, the base value.
BLOCKS_XL_FINE = (
    "CLIPL", "CLIPG", "IN0", "IN00", "IN10", "IN20", "IN30", "IN40", *_fine("IN", "41", 2), "IN50",
    *_fine("IN", "51", 2), "IN60", "IN70", *_fine("IN", "71", 10), "IN80", *_fine("IN", "81", 10),
    "MID00", *_fine("MID", "10", 10), "MID20",
    "OUT00", *_fine("OUT", "01", 10), "OUT10", *_fine("OUT", "11", 10), "OUT20", *_fine("OUT", "21", 10), "OUT22",
    "OUT30", *_fine("OUT", "31", 2), "OUT40", *_fine("OUT", "41", 2), "OUT50", *_fine("OUT", "51", 2), "OUT52",
    "OUT60", "OUT70", "OUT80", "OUT9", "TIME", "LABEL", "VAE",
)


def xl_group(fine: str) -> str:
    """The 20-block label an SDXL fine label belongs to (IN413 -> IN04, MID105 -> M00, OUT9 -> OUT08)."""
    if fine in ("CLIPL", "CLIPG", "VAE"):
        return "BASE"
    if fine in ("TIME", "LABEL", "IN0"):
        return "IN00"
    if fine.startswith("MID"):
        return "M00"
    if fine == "OUT9":
        return "OUT08"
    prefix = "OUT" if fine.startswith("OUT") else "IN"
    return f"{prefix}0{fine[len(prefix)]}"


#: the seed's 61 Flux blocks: CLIP (takes the first, "base" value), T5, IN, 19 double blocks, 38 single blocks, OUT
BLOCKS_FLUX = ("CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)), "OUT")

#: first names of Flux keys that hold model weights but do not contain "model" (the SD families' test for weights)
FLUX_PARTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
              "final_layer.", "text_encoders.", "vae.", "encoder.", "decoder.", "shared.", "text_model.")

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


def is_model_key(key: str) -> bool:
    """Whether a key holds model weights (as opposed to SD's schedule buffers such as `alphas_cumprod`)."""
    return "model" in key or key.startswith(FLUX_PARTS)


def mergeable(key: str, arch: Arch) -> bool:
    """The seed's selection: model weights and biases. Flux also merges its RMSNorm `scale` tensors (every Flux
    tensor with a block is a weight)."""
    return is_model_key(key) and (arch.is_flux or "weight" in key or "bias" in key)


@dataclass(frozen=True)
class Arch:
    """A checkpoint's family ("sd1", "sd2", "sdxl" or "flux") and the input channels of its U-Net (4, 8 or 9);
    for Flux, `flavour` says "dev" or "schnell" ("" for a file without the diffusion model)."""

    family: str
    in_channels: int = 4
    flavour: str = ""

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def is_flux(self) -> bool:
        return self.family == "flux"

    @property
    def blocks(self) -> tuple[str, ...]:
        """Block labels in weight-string order."""
        return BLOCKS_FLUX if self.is_flux else BLOCKS_XL if self.is_sdxl else BLOCKS_26

    @property
    def variant(self) -> str:
        if self.is_flux:
            return self.flavour
        return {9: "inpainting", 8: "instruct-pix2pix"}.get(self.in_channels, "")

    def describe(self) -> str:
        name = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "flux": "Flux"}[self.family]
        return f"{name} {self.variant}".strip()

    def block_of(self, key: str) -> tuple[str, str] | None:
        """(fine label, block label) of a key, or None when the seed never merges it."""
        if self.is_flux:
            label = _block_flux(key)
            return None if label is None else (label, label)
        return _block_xl(key) if self.is_sdxl else _block_sd(key)


def detect_arch(keys: set[str] | dict, shape_of: Callable[[str], tuple[int, ...]], name: str = "model") -> Arch:
    """Tell the family from marker keys, as the WebUI does, and the U-Net's input channels from conv_in's shape."""
    flux = _flux_flavour(keys, shape_of)
    if flux is not None:
        return Arch("flux", flavour=flux)
    if _SDXL_TEXT in keys or _SDXL_LABEL in keys:
        family = "sdxl"
    elif _SD2_TEXT in keys:
        family = "sd2"
    elif _SD1_TEXT in keys or CONV_IN in keys:
        family = "sd1"
    else:
        raise MergeError(
            f"{name} is not a Stable Diffusion 1.x, 2.x, SDXL or Flux checkpoint (no text encoder, U-Net or Flux "
            f"transformer keys found)."
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


_RE_FLUX_BLOCK = re.compile(r"(?:^|\.)(double|single)_blocks\.(\d+)\.")
_FLUX_T5_BARE = ("encoder.block.", "encoder.final_layer_norm.", "shared.")
_FLUX_AE_BARE = ("encoder.", "decoder.")
_FLUX_LATENTS = 16


def _flux_flavour(keys, shape_of: Callable[[str], tuple[int, ...]]) -> str | None:
    """"dev" or "schnell" for a Flux diffusion model (all-in-one or bare), "" for Flux's separate text encoder or
    autoencoder files (the latter told from SD's VAE by its 16 latent channels), None when the keys are not Flux's."""
    if "decoder.conv_in.weight" in keys and len(shape_of("decoder.conv_in.weight")) > 1:
        if shape_of("decoder.conv_in.weight")[1] != _FLUX_LATENTS:
            return None  # an SD VAE file
    has_blocks = has_te = has_guidance = has_sd = False
    for key in keys:
        if _RE_FLUX_BLOCK.search(key):
            has_blocks = True
            has_guidance = has_guidance or "guidance_in." in key
        elif "guidance_in." in key:
            has_guidance = True
        elif key.startswith(("text_encoders.clip_l.", "text_encoders.t5xxl.")) or key.startswith(_FLUX_T5_BARE):
            has_te = True
        elif key.startswith(("text_model.", "decoder.", "encoder.")):
            has_te = True
        elif "model." in key:
            has_sd = True
    if has_blocks:
        return "dev" if has_guidance else "schnell"
    return "" if has_te and not has_sd else None


def _block_flux(key: str) -> str | None:
    """§3.4: t5xxl -> T5, text_encoders.clip -> CLIP, double/single_blocks.N -> DNN/SNN, any `_in` -> IN,
    final_layer -> OUT, the VAE is not merged. Separate (bare) files: T5-XXL's encoder.block/shared keys -> T5,
    CLIP-L's text_model keys -> CLIP, the autoencoder's encoder/decoder keys -> not merged."""
    if "vae." in key or (key.startswith(_FLUX_AE_BARE) and not key.startswith(_FLUX_T5_BARE)):
        return None
    if "t5xxl" in key or key.startswith(_FLUX_T5_BARE):
        return "T5"
    if "text_encoders.clip" in key or key.startswith("text_model."):
        return "CLIP"
    if m := _RE_FLUX_BLOCK.search(key):
        return f"{m.group(1)[0].upper()}{int(m.group(2)):02d}"
    if "_in" in key:
        return "IN"
    if "final_layer" in key:
        return "OUT"
    return None
