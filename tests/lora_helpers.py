"""Helpers for the LoRA tests: real key layouts (SD1, SD2 built from SD1's U-Net and OpenCLIP-H, SDXL) and the
kohya / PEFT names of their modules, written out independently of lib_merge.lora.keys from the naming tables of
seed-lora-analysis.md §1.2 and §1.5 (here in the LDM -> diffusers direction, by enumerating diffusers' blocks).
"""

from __future__ import annotations

import json
from pathlib import Path

LAYOUTS = Path(__file__).resolve().parent.parent.parent / "shared" / "model_layouts"
UNET = "model.diffusion_model."


def layout(family: str) -> dict[str, tuple[int, ...]]:
    """key -> shape of a real checkpoint; SD2 is SD1's U-Net (same key names) plus a 24-layer OpenCLIP-H encoder."""
    if family == "sd2":
        sd1, xl = layout("sd1"), layout("sdxl")
        out = {k: v for k, v in sd1.items() if not k.startswith("cond_stage_model.")}
        for key, shape in xl.items():
            if key.startswith("conditioner.embedders.1.model."):
                rest = key[len("conditioner.embedders.1.model."):]
                if rest.startswith("transformer.resblocks.") and int(rest.split(".")[2]) >= 24:
                    continue
                out["cond_stage_model.model." + rest] = tuple(d * 1024 // 1280 if d % 1280 == 0 else d
                                                              for d in shape)
        return out
    name = {"sd1": "sd1-ldm", "sdxl": "sdxl-sgm"}[family]
    data = json.loads((LAYOUTS / f"{name}.json").read_text())
    return {k: tuple(v["shape"]) for comp in data["components"].values() for k, v in comp.items()}


RESNET_PARTS = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                "skip_connection": "conv_shortcut"}


def ldm_to_diffusers_table(family: str) -> dict[str, str]:
    """LDM U-Net module prefix (dotted, up to the block's sub-module) -> diffusers prefix, by enumerating blocks."""
    xl = family == "sdxl"
    levels = 3 if xl else 4
    down_attn = (lambda i: i in (1, 2)) if xl else (lambda i: i < 3)
    up_attn = (lambda i: i in (0, 1)) if xl else (lambda i: i >= 1)
    table = {"input_blocks.0.0": "conv_in", "out.2": "conv_out", "out.0": "conv_norm_out",
             "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2"}
    if xl:
        table.update({"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"})
    n = 1
    for i in range(levels):
        for j in range(2):
            table[f"input_blocks.{n}.0"] = f"down_blocks.{i}.resnets.{j}"
            if down_attn(i):
                table[f"input_blocks.{n}.1"] = f"down_blocks.{i}.attentions.{j}"
            n += 1
        if i < levels - 1:
            table[f"input_blocks.{n}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
            n += 1
    table["middle_block.0"] = "mid_block.resnets.0"
    table["middle_block.1"] = "mid_block.attentions.0"
    table["middle_block.2"] = "mid_block.resnets.1"
    n = 0
    for i in range(levels):
        for j in range(3):
            table[f"output_blocks.{n}.0"] = f"up_blocks.{i}.resnets.{j}"
            if up_attn(i):
                table[f"output_blocks.{n}.1"] = f"up_blocks.{i}.attentions.{j}"
            n += 1
        if i < levels - 1:
            table[f"output_blocks.{n - 1}.{2 if up_attn(i) else 1}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    return table


def diffusers_module(ldm_module: str, table: dict[str, str]) -> str:
    """A dotted LDM U-Net module path -> the diffusers one (resnet sub-layers renamed)."""
    for prefix in sorted(table, key=len, reverse=True):
        if ldm_module == prefix or ldm_module.startswith(prefix + "."):
            rest = ldm_module[len(prefix):].lstrip(".")
            if ".resnets." in table[prefix]:
                rest = RESNET_PARTS.get(rest, rest)
            return table[prefix] + ("." + rest if rest else "")
    raise KeyError(ldm_module)


OPENCLIP_HF = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def targetable(family: str) -> list[tuple[str, str, str, tuple[int, int] | None]]:
    """(component, module path in HF/LDM dotted form, checkpoint key, rows) for every Linear/Conv a LoRA trainer
    targets: every U-Net weight of 2+ dimensions and every text-encoder attention/MLP Linear."""
    shapes = layout(family)
    out = []
    for key, shape in shapes.items():
        if key.startswith(UNET) and key.endswith(".weight") and len(shape) >= 2:
            out.append(("unet", key[len(UNET):-len(".weight")], key, None))
        for prefix, comp in (("cond_stage_model.transformer.", "te1"), ("conditioner.embedders.0.transformer.", "te1")):
            if key.startswith(prefix) and (".self_attn." in key or ".mlp." in key) and key.endswith(".weight"):
                out.append((comp, key[len(prefix):-len(".weight")], key, None))
        for prefix, comp in (("cond_stage_model.model.", "te1"), ("conditioner.embedders.1.model.", "te2")):
            if not key.startswith(prefix + "transformer.resblocks.") or not key.endswith("weight"):
                continue
            layer = key[len(prefix):].split(".")[2]
            hf = f"text_model.encoder.layers.{layer}."
            if key.endswith("attn.in_proj_weight"):
                width = shape[0] // 3
                for i, x in enumerate("qkv"):
                    out.append((comp, hf + f"self_attn.{x}_proj", key, (i * width, (i + 1) * width)))
            for ocl, name in OPENCLIP_HF.items():
                if key.endswith(f".{ocl}.weight"):
                    out.append((comp, hf + name, key, None))
    return out


def kohya_name(family: str, component: str, path: str) -> str:
    if component == "unet":
        if family != "sdxl":
            path = diffusers_module(path, ldm_to_diffusers_table(family))
        return "lora_unet_" + path.replace(".", "_")
    prefix = {"te2": "lora_te2_", "te1": "lora_te1_" if family == "sdxl" else "lora_te_"}[component]
    return prefix + path.replace(".", "_")


def peft_name(family: str, component: str, path: str) -> str:
    if component == "unet":
        return "unet." + diffusers_module(path, ldm_to_diffusers_table(family))
    return {"te1": "text_encoder.", "te2": "text_encoder_2."}[component] + path


def tiny_model(path: Path, family: str, factor: int = 16, dtype=None, seed: int = 0) -> Path:
    """A small checkpoint with every key of the real layout (dimensions >= 64 divided by `factor`), random values."""
    import torch
    from safetensors.torch import save_file

    from lib_merge.cli.synth import scaled_shape

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout(family).items():
        shape = scaled_shape(shape, factor)
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[-1]).reshape(shape)
        else:
            state[key] = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    save_file(state, str(path))
    return path


def save_lora(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def rand(shape, seed: int, scale: float = 0.1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).float()
