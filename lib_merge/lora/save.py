"""Writing LoRA files: kohya-style `ss_*` metadata and an atomic safetensors save in the chosen dtype.

The metadata is what kohya's trainer writes and the WebUI's Lora extension reads (network module, dim, alpha,
base model version). Unlike the seed's Make LoRA it does not claim v-prediction for every model.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path

import safetensors.torch
import torch

from ..io.checkpoint import check_output_path, save_state_dict
from .formats import LoraError

BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURES = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                 "sdxl": "stable-diffusion-xl-v1-base/lora"}
RESOLUTIONS = {"sd1": "512x512", "sd2": "512x512", "sdxl": "1024x1024"}
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def kohya_metadata(family: str, output: Path, dim: str, alpha: str, conv: str | None = None,
                   recipe: dict | None = None) -> dict[str, str]:
    args = {"conv_dim": conv, "conv_alpha": conv} if conv else {}
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": alpha,
        "ss_network_args": json.dumps(args),
        "ss_v2": str(family == "sd2"),
        "ss_base_model_version": BASE_VERSIONS[family],
        "ss_output_name": output.stem,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURES[family],
        "modelspec.title": output.stem,
        "modelspec.resolution": RESOLUTIONS[family],
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if recipe is not None:
        meta["block_merger_recipe"] = json.dumps(recipe)
    return meta


def add_factors(tensors: dict[str, torch.Tensor], name: str, up: torch.Tensor, down: torch.Tensor) -> int:
    """Store one module as kohya does (up, down, alpha = rank, so scale 1); returns the rank."""
    rank = int(down.shape[0])
    tensors[f"{name}.lora_up.weight"] = up
    tensors[f"{name}.lora_down.weight"] = down
    tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return rank


def check_lora_output(output: str | Path, inputs: Iterable[str | Path], overwrite: bool) -> Path:
    output = Path(output)
    if output.suffix.lower() != ".safetensors":
        raise LoraError(f"LoRA output {output} must end in .safetensors.")
    return check_output_path(output, list(inputs), overwrite)


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) as kohya's trainer stamps them and the WebUI's Lora extension reads
    the first as the LoRA's hash: SHA-256 of the tensor bytes after the header (what `modules.hashes.
    addnet_hash_safetensors` computes from the file), and the first 8 hex digits of the SHA-256 of the 64 KiB at
    offset 1 MiB of the file serialized with only the `ss_*` metadata (kohya's `addnet_hash_legacy`)."""
    data = hashlib.sha256()
    for tensor in tensors.values():  # the file's data section: the tensors back to back in this order
        data.update(tensor.reshape(-1).view(torch.uint8).numpy())
    blob = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    legacy = hashlib.sha256(memoryview(blob)[0x100000:0x110000]).hexdigest()[:8]
    return data.hexdigest(), legacy


def write_lora(output: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], dtype: str,
               overwrite: bool) -> Path:
    """Save factors in `dtype` (fp16/bf16/fp32); alphas are saved in that dtype too, as kohya does. Tensors are laid
    out by name, as the safetensors library lays out tensors of one dtype, so the stamped hashes are the file's."""
    if dtype not in SAVE_DTYPES:
        raise LoraError(f"Unknown LoRA save dtype {dtype!r}; choose fp16, bf16 or fp32.")
    target = SAVE_DTYPES[dtype]
    cast = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in sorted(tensors.items())}
    model_hash, legacy_hash = addnet_hashes(cast, metadata)
    metadata = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    return save_state_dict(cast, output, metadata, overwrite)
