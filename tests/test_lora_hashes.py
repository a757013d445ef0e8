"""`sshs_model_hash` / `sshs_legacy_hash` in every LoRA we write (issue 14), checked against the definitions the
WebUI and kohya use, recomputed here from the written file: the SHA-256 of the bytes after the safetensors header
(the WebUI's `hashes.addnet_hash_safetensors`, which its Lora extension falls back to), and the first 8 hex digits
of the SHA-256 of the 64 KiB at 1 MiB of the file re-serialized by the safetensors library with only its `ss_*`
metadata (kohya's `addnet_hash_legacy` over `precalculate_safetensors_hashes`).
"""

from __future__ import annotations

import hashlib

import pytest
import safetensors.torch
from lora_helpers import rand, save_lora, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file

from lib_merge.lora.blocks import parse_spec
from lib_merge.lora.combine import combine_to_file
from lib_merge.lora.extract import extract_to_file
from lib_merge.lora.lowrank import RankChoice

FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"
FC2 = "lora_te_text_model_encoder_layers_0_mlp_fc2"


def webui_hash(path) -> str:
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header:]).hexdigest()


def kohya_legacy(path) -> str:
    with safe_open(str(path), "pt") as f:
        metadata = {k: v for k, v in (f.metadata() or {}).items() if k.startswith("ss_")}
    blob = safetensors.torch.save(load_file(path), metadata)
    return hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def metadata_of(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def big_lora(tmp_path_factory):
    """Over 1 MiB (so the legacy hash reads real bytes): SD1's first text-encoder MLP at rank 64, fp32."""
    folder = tmp_path_factory.mktemp("hashes")
    tensors = {f"{FC1}.lora_down.weight": rand((64, 768), 1), f"{FC1}.lora_up.weight": rand((3072, 64), 2),
               f"{FC2}.lora_down.weight": rand((64, 3072), 3), f"{FC2}.lora_up.weight": rand((768, 64), 4)}
    return save_lora(folder / "big.safetensors", tensors, {"ss_network_dim": "64"})


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_merged_lora_carries_the_webui_and_kohya_hashes(big_lora, tmp_path, dtype):
    out = tmp_path / "merged.safetensors"
    combine_to_file([parse_spec(f"{big_lora}:0.5")], out, None, dtype=dtype, metadata="merge")
    assert out.stat().st_size > 0x110000 or dtype != "fp32"
    meta = metadata_of(out)
    assert meta["sshs_model_hash"] == webui_hash(out)
    assert meta["sshs_legacy_hash"] == kohya_legacy(out)
    assert len(meta["sshs_legacy_hash"]) == 8


def test_extracted_and_rerank_merged_loras_carry_them_too(tmp_path):
    a = tiny_model(tmp_path / "a.safetensors", "sd1", seed=1)
    b = tiny_model(tmp_path / "b.safetensors", "sd1", seed=2)
    out = tmp_path / "extracted.safetensors"
    extract_to_file(a, b, out, rank=RankChoice(4))
    meta = metadata_of(out)
    assert meta["sshs_model_hash"] == webui_hash(out) and meta["sshs_legacy_hash"] == kohya_legacy(out)
    again = tmp_path / "rerank.safetensors"
    combine_to_file([parse_spec(f"{out}:1")], again, RankChoice(2))
    meta = metadata_of(again)
    assert meta["sshs_model_hash"] == webui_hash(again) and meta["sshs_legacy_hash"] == kohya_legacy(again)
    assert meta["sshs_model_hash"] != metadata_of(out)["sshs_model_hash"]
