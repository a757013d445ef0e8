"""LoRA module names -> checkpoint keys, for every LoRA-targetable Linear/Conv of the real SD1, SD2 and SDXL layouts,
in kohya and PEFT naming. Expected keys come from lora_helpers' own naming tables, not from lib_merge.lora.keys."""

from __future__ import annotations

import pytest
from lora_helpers import kohya_name, layout, peft_name, targetable

from lib_merge.lora import keys


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def mapped(family):
    shapes = layout(family)
    return keys.checkpoint_targets(shapes, lambda k: shapes[k], family)


@pytest.mark.parametrize("naming", [kohya_name, peft_name])
def test_every_targetable_module_maps_to_exactly_its_key(family, mapped, naming):
    cases = targetable(family)
    assert len(cases) > 150  # the U-Net alone has hundreds of Linear/Conv layers
    seen = {}
    for component, path, key, rows in cases:
        name = naming(family, component, path)
        mid = keys.module_id(name, family)
        assert mid is not None, name
        target = mapped.get(mid)
        assert target is not None, (name, mid)
        assert (target.key, target.rows) == (key, rows), name
        assert seen.setdefault(mid, name) == name, f"{name} and {seen[mid]} collide"
    # and every module the trainer can target was reached by a distinct name
    assert len(seen) == len(cases)


def test_kohya_counts_match_the_spec(family, mapped):
    """Attention-only kohya module counts of §1.2: U-Net SD1 192, SDXL 722; TE 72, SD2 24x6, SDXL 72+192."""
    cases = targetable(family)
    attn = [c for c in cases if c[0] == "unet" and ".transformer_blocks." in c[1]
            or c[0] == "unet" and c[1].endswith(("proj_in", "proj_out"))]
    te = [c for c in cases if c[0] != "unet"]
    assert len(attn) == {"sd1": 192, "sd2": 192, "sdxl": 722}[family]
    assert len(te) == {"sd1": 72, "sd2": 144, "sdxl": 72 + 192}[family]


def test_bias_keys_and_openclip_rows(mapped, family):
    shapes = layout(family)
    for target in mapped.values():
        if target.bias is not None:
            assert target.bias in shapes
        if target.rows is not None:
            assert target.key.endswith("in_proj_weight")
            assert target.bias.endswith("in_proj_bias")
            assert target.rows[1] - target.rows[0] == shapes[target.key][0] // 3


@pytest.mark.parametrize("name,family,expected", [
    # the worked examples of §1.5
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", "sd1",
     "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"),
    ("lora_unet_up_blocks_1_resnets_2_conv1", "sd1", "model.diffusion_model.output_blocks.5.0.in_layers.2.weight"),
    ("lora_unet_down_blocks_2_downsamplers_0_conv", "sd1", "model.diffusion_model.input_blocks.9.0.op.weight"),
    ("lora_te_text_model_encoder_layers_11_mlp_fc2", "sd1",
     "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"),
    # the converter gaps the seed has: SDXL's upsampler sits at .2.2, conv_norm_out, add_embedding
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "sdxl", "model.diffusion_model.output_blocks.2.2.conv.weight"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "sd1", "model.diffusion_model.output_blocks.2.1.conv.weight"),
    ("lora_unet_add_embedding_linear_2", "sdxl", "model.diffusion_model.label_emb.0.2.weight"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_k", "sdxl",
     "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_k.weight"),
    ("diffusion_model.output_blocks.0.1.transformer_blocks.9.ff.net.2", "sdxl",
     "model.diffusion_model.output_blocks.0.1.transformer_blocks.9.ff.net.2.weight"),
    ("base_model.model.down_blocks.1.attentions.0.proj_in", "sd1",
     "model.diffusion_model.input_blocks.4.1.proj_in.weight"),
])
def test_named_examples(name, family, expected):
    shapes = layout(family)
    mapped = keys.checkpoint_targets(shapes, lambda k: shapes[k], family)
    assert mapped[keys.module_id(name, family)].key == expected


def test_names_of_no_known_form_give_none():
    assert keys.module_id("bundle_emb.x", "sd1") is None
    assert keys.module_id("lora_unet_down_blocks_0_nonsense_0_x", "sd1") is None


def test_kohya_output_names_are_kohyas(family, mapped):
    """Names we write (extract, merge) are the ones kohya's trainer writes, and read back to the same module."""
    for component, path, _key, _rows in targetable(family):
        expected = kohya_name(family, component, path)
        mid = keys.module_id(expected, family)
        assert keys.kohya_name(mid, family) == expected
    for mid in mapped:
        assert keys.module_id(keys.kohya_name(mid, family), family) == mid


def _lora(parts: dict):
    import torch

    from lib_merge.lora.formats import LoraFile, group_modules

    modules, unknown = group_modules({k: torch.zeros(s) for k, s in parts.items()})
    return LoraFile(None, "x", modules, {}, unknown)


@pytest.mark.parametrize("context,expected", [(768, {"sd1"}), (1024, {"sd2"}), (2048, {"sdxl"})])
def test_family_from_the_cross_attention_context(context, expected):
    from lib_merge.lora.detect import lora_families

    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    lora = _lora({f"{name}.lora_down.weight": (4, context), f"{name}.lora_up.weight": (640, 4)})
    assert lora_families(lora)[0] == expected


def test_sdxl_lora_refused_on_sd1_with_the_reason():
    from lib_merge.lora.detect import check_family
    from lib_merge.lora.formats import LoraError

    lora = _lora({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 1280),
                  "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (5120, 4)})
    with pytest.raises(LoraError, match=r"is for SDXL \(it has modules for SDXL's second text encoder\), but m is SD1"):
        check_family(lora, "sd1", "m")
    check_family(lora, "sdxl", "m")
