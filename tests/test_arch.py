"""Architecture detection from keys and shapes, and the shipped key layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lib_merge.cli import synth
from lib_merge.core.arch import detect_arch
from lib_merge.core.errors import MergeError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "model_layouts"
PACKAGED = Path(__file__).resolve().parents[1] / "lib_merge" / "data"


def detect(state):
    return detect_arch(set(state), lambda k: tuple(state[k].shape))


@pytest.mark.parametrize(("family", "channels", "described"), [
    ("sd1", 4, "SD1"), ("sd1", 9, "SD1 inpainting"), ("sd1", 8, "SD1 instruct-pix2pix"), ("sdxl", 4, "SDXL"),
    ("sdxl", 9, "SDXL inpainting"),
])
def test_detects_family_and_variant(family, channels, described):
    arch = detect(synth.make_state_dict(family, factor=32, in_channels=channels))
    assert (arch.family, arch.in_channels, arch.describe()) == (family, channels, described)
    assert len(arch.blocks) == (20 if family == "sdxl" else 26)


def test_detects_sd2_from_its_open_clip_text_encoder():
    state = synth.make_state_dict("sd1", factor=32)
    state = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = state[
        "model.diffusion_model.input_blocks.1.1.proj_in.weight"].flatten(1)  # a matrix, as OpenCLIP stores it
    state["cond_stage_model.model.ln_final.weight"] = state["model.diffusion_model.out.0.weight"]
    arch = detect(state)
    assert arch.family == "sd2" and arch.describe() == "SD2" and len(arch.blocks) == 26
    assert arch.block_of("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight") == ("BASE", "BASE")


def test_not_a_stable_diffusion_model_is_refused_by_name():
    with pytest.raises(MergeError, match="my-lora is not a Stable Diffusion"):
        detect_arch({"lora_unet_down.weight"}, lambda k: (4, 4), "my-lora")


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared key layouts are not beside this checkout")
@pytest.mark.parametrize("name", ["sd1-ldm.json", "sdxl-sgm.json"])
def test_packaged_layouts_are_the_shared_ones(name):
    assert json.loads((PACKAGED / name).read_text()) == json.loads((SHARED / name).read_text())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_real_key_maps_to_a_block_or_is_never_merged(family):
    layout = synth.load_layout(family)
    arch = detect_arch(set(layout), lambda k: layout[k][0])
    labels = {arch.block_of(k) for k in layout if "model" in k and ("weight" in k or "bias" in k)}
    blocks = {lab[1] for lab in labels if lab is not None}
    assert blocks == set(arch.blocks)  # every block has keys, and no key maps outside the block list
