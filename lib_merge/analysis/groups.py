"""Which group of an analysis a key falls in: the merge block of the U-Net, or the text encoder or VAE as groups of
their own (the seed puts the text encoder in BASE and, through a bug, VAE keys in whatever block came before)."""

from __future__ import annotations

from ..core.arch import Arch

TEXT_ENCODER_PREFIXES = ("cond_stage_model.", "conditioner.embedders.")
VAE_PREFIX = "first_stage_model."
#: SDXL's two text encoders, by the fine label core.arch gives them.
_XL_ENCODERS = {"CLIPL": "TE-L", "CLIPG": "TE-G"}


def group_of(arch: Arch, key: str) -> str | None:
    """The analysis group of a key, or None for keys the merge never touches (EMA, buffers, non-model keys)."""
    if "model" not in key or "model_ema" in key:
        return None
    labels = arch.block_of(key)
    if labels is None:
        return None
    if key.startswith(TEXT_ENCODER_PREFIXES):
        return _XL_ENCODERS.get(labels[0], "TE")
    if key.startswith(VAE_PREFIX):
        return "VAE"
    return labels[1]


def group_order(arch: Arch) -> tuple[str, ...]:
    """Groups in display order: text encoder(s), the merge blocks in weight-string order, VAE."""
    encoders = ("TE-L", "TE-G") if arch.is_sdxl else ("TE",)
    return (*encoders, *arch.blocks, "VAE")
