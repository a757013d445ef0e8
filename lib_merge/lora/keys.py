"""Which checkpoint tensor a LoRA module changes: one canonical module id for every naming scheme.

LoRA files name their modules in several ways (kohya `lora_unet_down_blocks_0_...` with diffusers names for
SD1/SD2, kohya SDXL `lora_unet_input_blocks_4_1_...` with LDM names, `lora_te1_`/`lora_te2_`, PEFT/diffusers
`unet.down_blocks.0....lora_A.weight`, ComfyUI `diffusion_model.input_blocks...`). All are turned into one id,
`<component>:<LDM or HF path with "_">`, e.g. `unet:input_blocks_4_1_transformer_blocks_0_attn1_to_q` or
`te2:text_model_encoder_layers_3_self_attn_q_proj`. The checkpoint side is built from the checkpoint's own keys
(the `_`-for-`.` inversion is ambiguous, so it is never attempted), including OpenCLIP's fused `in_proj_weight`,
which becomes three row slices q, k, v as the WebUI splits it (seed-lora-analysis.md §1.5).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}

UNET = "model.diffusion_model."
#: checkpoint prefix -> (component, "hf" for HF CLIP naming or "openclip")
TEXT_PREFIXES = {
    "sd1": (("cond_stage_model.transformer.", "te1", "hf"),),
    "sd2": (("cond_stage_model.model.", "te1", "openclip"),),
    "sdxl": (("conditioner.embedders.0.transformer.", "te1", "hf"),
             ("conditioner.embedders.1.model.", "te2", "openclip")),
}
#: LoRA module-name prefix -> component
NAME_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te_", "te1"),
    ("unet.", "unet"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te1"),
    ("diffusion_model.", "unet"),
)
LDM_ROOTS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")
DIFFUSERS_ROOTS = ("down_blocks_", "mid_block_", "up_blocks_", "conv_in", "conv_out", "conv_norm_out",
                   "time_embedding_", "add_embedding_")

_RESNET = (("conv1", "in_layers_2"), ("conv2", "out_layers_3"), ("norm1", "in_layers_0"), ("norm2", "out_layers_0"),
           ("time_emb_proj", "emb_layers_1"), ("conv_shortcut", "skip_connection"))
_OPENCLIP = (("attn_out_proj", "self_attn_out_proj"), ("mlp_c_fc", "mlp_fc1"), ("mlp_c_proj", "mlp_fc2"),
             ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"))


@dataclass(frozen=True)
class Target:
    """The checkpoint tensor a module changes: its weight key, the rows it owns (OpenCLIP q/k/v), its bias key."""

    key: str
    rows: tuple[int, int] | None = None
    bias: str | None = None


def _swap_prefix(text: str, table) -> str | None:
    for old, new in table:
        if text == old or text.startswith(old + "_"):
            return new + text[len(old):]
    return None


def _has_attention_up(i: int, family: str) -> bool:
    """Whether diffusers `up_blocks.i` has attentions (decides where its upsampler conv sits in LDM)."""
    return i in (0, 1) if family == "sdxl" else i >= 1


def diffusers_to_ldm(rest: str, family: str) -> str | None:
    """A diffusers U-Net module path (with `_`) -> the LDM one, or None when no rule applies."""
    simple = (("conv_in", "input_blocks_0_0"), ("conv_out", "out_2"), ("conv_norm_out", "out_0"),
              ("time_embedding_linear_1", "time_embed_0"), ("time_embedding_linear_2", "time_embed_2"),
              ("add_embedding_linear_1", "label_emb_0_0"), ("add_embedding_linear_2", "label_emb_0_2"))
    if (out := _swap_prefix(rest, simple)) is not None:
        return out
    if m := re.fullmatch(r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", rest):
        n = 1 + 3 * int(m[1]) + int(m[3])
        if m[2] == "attentions":
            return f"input_blocks_{n}_1_{m[4]}"
        inner = _swap_prefix(m[4], _RESNET)
        return f"input_blocks_{n}_0_{inner}" if inner else None
    if m := re.fullmatch(r"down_blocks_(\d+)_downsamplers_0_conv(_.*)?", rest):
        return f"input_blocks_{3 + 3 * int(m[1])}_0_op"
    if m := re.fullmatch(r"mid_block_attentions_0_(.+)", rest):
        return f"middle_block_1_{m[1]}"
    if m := re.fullmatch(r"mid_block_resnets_(\d+)_(.+)", rest):
        inner = _swap_prefix(m[2], _RESNET)
        return f"middle_block_{2 * int(m[1])}_{inner}" if inner else None
    if m := re.fullmatch(r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", rest):
        n = 3 * int(m[1]) + int(m[3])
        if m[2] == "attentions":
            return f"output_blocks_{n}_1_{m[4]}"
        inner = _swap_prefix(m[4], _RESNET)
        return f"output_blocks_{n}_0_{inner}" if inner else None
    if m := re.fullmatch(r"up_blocks_(\d+)_upsamplers_0_conv(_.*)?", rest):
        i = int(m[1])
        return f"output_blocks_{3 * i + 2}_{2 if _has_attention_up(i, family) else 1}_conv"
    return None


def ldm_to_diffusers(rest: str, family: str) -> str | None:
    """The inverse of `diffusers_to_ldm` (kohya names SD1/SD2 U-Net modules the diffusers way)."""
    inverse_resnet = tuple((new, old) for old, new in _RESNET)
    simple = (("input_blocks_0_0", "conv_in"), ("out_2", "conv_out"), ("out_0", "conv_norm_out"),
              ("time_embed_0", "time_embedding_linear_1"), ("time_embed_2", "time_embedding_linear_2"),
              ("label_emb_0_0", "add_embedding_linear_1"), ("label_emb_0_2", "add_embedding_linear_2"))
    if (out := _swap_prefix(rest, simple)) is not None:
        return out
    if m := re.fullmatch(r"input_blocks_(\d+)_([01])_(.+)", rest):
        i, j = divmod(int(m[1]) - 1, 3)
        if j == 2:
            return f"down_blocks_{i}_downsamplers_0_conv" if m[3] == "op" else None
        if m[2] == "1":
            return f"down_blocks_{i}_attentions_{j}_{m[3]}"
        inner = _swap_prefix(m[3], inverse_resnet)
        return f"down_blocks_{i}_resnets_{j}_{inner}" if inner else None
    if m := re.fullmatch(r"middle_block_(\d)_(.+)", rest):
        if m[1] == "1":
            return f"mid_block_attentions_0_{m[2]}"
        inner = _swap_prefix(m[2], inverse_resnet)
        return f"mid_block_resnets_{int(m[1]) // 2}_{inner}" if inner else None
    if m := re.fullmatch(r"output_blocks_(\d+)_([012])_(.+)", rest):
        i, j = divmod(int(m[1]), 3)
        upsampler = m[3] == "conv" and j == 2 and (m[2] == "2" or not _has_attention_up(i, family))
        if upsampler:
            return f"up_blocks_{i}_upsamplers_0_conv"
        if m[2] == "1":
            return f"up_blocks_{i}_attentions_{j}_{m[3]}"
        inner = _swap_prefix(m[3], inverse_resnet) if m[2] == "0" else None
        return f"up_blocks_{i}_resnets_{j}_{inner}" if inner else None
    return None


def split_name(name: str) -> tuple[str, str] | None:
    """A LoRA module name -> (component, rest with `_`), or None when no known prefix starts it."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
        if name.replace(".", "_").startswith(DIFFUSERS_ROOTS):
            name = "unet." + name
    for prefix, component in NAME_PREFIXES:
        if name.startswith(prefix):
            return component, name[len(prefix):].replace(".", "_")
    return None


def module_id(name: str, family: str) -> str | None:
    """The canonical id of a LoRA module name for a model of `family`, or None for a name of no known form."""
    split = split_name(name)
    if split is None:
        return None
    component, rest = split
    if component == "unet" and not rest.startswith(LDM_ROOTS):
        rest = diffusers_to_ldm(rest, family)
        if rest is None:
            return None
    elif component != "unet":
        openclip = _swap_prefix(rest, (("model_transformer_resblocks", "text_model_encoder_layers"),))
        if openclip is not None:  # OpenCLIP-named text encoder modules (the seed's "SD2 flag" files)
            m = re.fullmatch(r"(text_model_encoder_layers_\d+)_(.+)", openclip)
            inner = _swap_prefix(m[2], _OPENCLIP) if m else None
            if inner is None and m and re.fullmatch(r"attn_[qkv]_proj", m[2]):
                inner = "self_" + m[2]
            rest = f"{m[1]}_{inner}" if inner else openclip
    return f"{component}:{rest}"


def _openclip_ids(path: str) -> list[tuple[str, int | None]]:
    """An OpenCLIP checkpoint path (after `model.`, with `.weight`) -> [(HF-style rest, q/k/v index or None)]."""
    if m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight", path):
        return [(f"text_model_encoder_layers_{m[1]}_self_attn_{x}_proj", i) for i, x in enumerate("qkv")]
    if m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.weight", path):
        inner = _swap_prefix(m[2].replace(".", "_"), _OPENCLIP)
        return [(f"text_model_encoder_layers_{m[1]}_{inner}", None)] if inner else []
    named = {"ln_final.weight": "text_model_final_layer_norm",
             "token_embedding.weight": "text_model_embeddings_token_embedding"}
    return [(named[path], None)] if path in named else []


def checkpoint_targets(keys: Iterable[str], shape_of: Callable[[str], tuple[int, ...]], family: str
                       ) -> dict[str, Target]:
    """module id -> Target for every weight of a checkpoint of `family` that a LoRA can change."""
    keys = list(keys)
    present = set(keys)
    targets: dict[str, Target] = {}

    def add(mid: str, key: str, rows=None, bias=None) -> None:
        if mid in targets:
            raise ValueError(f"two checkpoint keys map to LoRA module {mid}: {targets[mid].key} and {key}")
        targets[mid] = Target(key, rows, bias if bias in present else None)

    for key in keys:
        if key.startswith(UNET) and key.endswith(".weight"):
            path = key[len(UNET):-len(".weight")]
            add("unet:" + path.replace(".", "_"), key, bias=key[:-len("weight")] + "bias")
            continue
        for prefix, component, naming in TEXT_PREFIXES[family]:
            if not key.startswith(prefix):
                continue
            path = key[len(prefix):]
            if naming == "hf":
                if path.endswith(".weight"):
                    add(f"{component}:{path[:-len('.weight')].replace('.', '_')}", key,
                        bias=key[:-len("weight")] + "bias")
                continue
            for rest, index in _openclip_ids(path):
                if index is None:
                    add(f"{component}:{rest}", key, bias=key[:-len("weight")] + "bias")
                else:
                    width = shape_of(key)[0] // 3
                    add(f"{component}:{rest}", key, (index * width, (index + 1) * width),
                        key[:-len("weight")] + "bias")
    return targets


def kohya_name(mid: str, family: str) -> str:
    """The kohya module name a LoRA file uses for a module id (diffusers U-Net names for SD1/SD2, LDM for SDXL)."""
    component, rest = mid.split(":", 1)
    if component == "unet":
        if family != "sdxl":
            rest = ldm_to_diffusers(rest, family) or rest
        return "lora_unet_" + rest
    if component == "te2":
        return "lora_te2_" + rest
    return ("lora_te1_" if family == "sdxl" else "lora_te_") + rest


def block_slot(mid: str, family: str) -> str:
    """The LoRA Block Weight slot (BASE, IN00-IN11, M00, OUT00-OUT11) of a module id.

    Modules outside the numbered blocks take the block merges give them (time/label embedding IN00, the output
    conv and norm OUT11, SDXL OUT08), never an implicit ratio 1.
    """
    component, rest = mid.split(":", 1)
    if component != "unet":
        return "BASE"
    if m := re.match(r"input_blocks_(\d+)_", rest):
        return f"IN{int(m[1]):02d}"
    if rest.startswith("middle_block_"):
        return "M00"
    if m := re.match(r"output_blocks_(\d+)_", rest):
        return f"OUT{int(m[1]):02d}"
    if rest.startswith(("time_embed", "label_emb")):
        return "IN00"
    return "OUT08" if family == "sdxl" else "OUT11"
