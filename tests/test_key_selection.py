"""Which keys the engine merges, keeps or copies (seed-behaviour.md §2.2, §2.1 step 15) and the inpainting rules
(§2.5), checked against expectations written by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    CONV_IN,
    SD1_POS,
    SD1_TOKEN,
    UNET,
    assert_rounded,
    assert_same,
    merge,
    randn,
    sd1_block,
    sd1_model,
    sdxl_labels,
    selected,
)

from lib_merge.cli import synth
from lib_merge.core.errors import MergeError

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DT_IDS = ["fp16", "bf16", "fp32"]

ONLY_A = UNET + "input_blocks.7.0.in_layers.2.weight"  # a U-Net key B lacks
ONLY_B = UNET + "input_blocks.8.0.in_layers.2.weight"  # a U-Net key A lacks
TEXT_PROJ = "cond_stage_model.transformer.text_projection"
LOGIT = "cond_stage_model.transformer.logit_scale"


def lerp64(a, b, alpha):
    return (1 - alpha) * a.double() + alpha * b.double()


def models_with_extras(dtype_a, dtype_b=None):
    a = sd1_model(1, dtype_a)
    b = sd1_model(2, dtype_b or dtype_a, base=a)
    b[SD1_POS] = torch.arange(77).flip(0).reshape(1, 77)  # a broken position_ids in B must not leak
    for m, seed, dt in ((a, 10, dtype_a), (b, 20, dtype_b or dtype_a)):
        m[TEXT_PROJ] = randn((8, 8), seed, dt)
        m[LOGIT] = randn((), seed + 1, dt)
        m["model_ema.decay"] = torch.tensor(0.9999 if m is a else 0.5)
        m["model_ema.num_updates"] = torch.tensor(1000 if m is a else 7, dtype=torch.int64)
    a[ONLY_A] = randn((8, 8, 3, 3), 30, dtype_a)
    b[ONLY_B] = randn((8, 8, 3, 3), 31, dtype_b or dtype_a)
    b["betas"] = randn((10,), 32, torch.float32)  # not a "model" key: never copied
    return a, b


@pytest.mark.parametrize("dtype_a,dtype_b", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float16)])
def test_weight_sum_key_selection(dtype_a, dtype_b):
    a, b = models_with_extras(dtype_a, dtype_b)
    _, state = merge(a, b, alpha=0.4)
    kept = {"alphas_cumprod", SD1_POS, TEXT_PROJ, LOGIT, "model_ema.decay", "model_ema.num_updates", ONLY_A}
    for key in a:
        if key in kept:
            assert_same(state[key], a[key], key)
        else:
            assert selected(key, b), key
            assert_rounded(state[key], lerp64(a[key], b[key], 0.4), dtype_a, what=key)
    # keys only B has: copied from B when they contain "model" (B's values and dtype); others dropped
    assert_same(state[ONLY_B], b[ONLY_B], ONLY_B)
    assert "betas" not in state
    assert list(state) == [*a, ONLY_B]


def test_position_ids_only_in_b_are_not_copied():
    a, b = models_with_extras(torch.float16)
    del a[SD1_POS]
    _, state = merge(a, b, alpha=0.4)
    assert SD1_POS not in state
    assert ONLY_B in state


@pytest.mark.parametrize("mode", ["Add difference", "Triple sum", "sum Twice"])
def test_keys_missing_from_c_keep_a(mode):
    a = sd1_model(1, torch.float16)
    b = sd1_model(2, torch.float16, base=a)
    c = sd1_model(3, torch.float16, base=a)
    gone = [UNET + "input_blocks.4.1.proj_in.weight", "first_stage_model.decoder.conv_in.weight", UNET + "out.2.bias"]
    for key in gone:
        del c[key]
    _, state = merge(a, b, c, mode=mode, alpha=0.4, beta=0.3, adjust="1,1,1,1,1,1,1,1")
    for key in gone:
        assert_same(state[key], a[key], key)  # neither merged nor adjusted
    key = UNET + "input_blocks.4.1.norm.weight"
    assert not torch.equal(state[key], a[key])


def test_keys_missing_from_b_keep_a_in_add_difference():
    a = sd1_model(1, torch.float32)
    b = sd1_model(2, torch.float32, base=a)
    c = sd1_model(3, torch.float32, base=a)
    key = UNET + "middle_block.1.proj_out.weight"
    del b[key]
    _, state = merge(a, b, c, mode="Add difference", alpha=0.4)
    assert_same(state[key], a[key], key)


@pytest.mark.parametrize("mbw", [False, True], ids=["alpha", "mbw"])
def test_vae_and_text_encoder_merged_at_base(mbw):
    a = sd1_model(1, torch.float16)
    b = sd1_model(2, torch.float16, base=a)
    weights = ",".join(["0.2"] + ["0.9"] * 25) if mbw else ""
    _, state = merge(a, b, alpha=0.6, weights_alpha=weights)
    base = 0.2 if mbw else 0.6
    for key in ("first_stage_model.decoder.conv_in.weight", "first_stage_model.encoder.norm_out.bias", SD1_TOKEN,
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert_rounded(state[key], lerp64(a[key], b[key], base), torch.float16, what=key)


@pytest.mark.parametrize("calc", ["cosineA", "cosineB"])
def test_cosine_leaves_vae(calc):
    a = sd1_model(1, torch.float32)
    b = sd1_model(2, torch.float32, base=a)
    _, state = merge(a, b, calc=calc, alpha=0.0)
    for key in a:
        if "first_stage_model" in key:
            assert_same(state[key], a[key], key)
    assert not torch.equal(state[SD1_TOKEN], a[SD1_TOKEN])


@pytest.fixture(scope="module")
def synth_pairs():
    out = {}
    for family in ("sd1", "sdxl"):
        a = synth.make_state_dict(family, factor=32, seed=3)
        b = synth.make_state_dict(family, factor=32, seed=4, base=a, noise=0.3)
        out[family] = (a, b)
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_key_of_a_synthetic_model(family, synth_pairs):
    a, b = synth_pairs[family]
    _, state = merge(a, b, alpha=0.3)
    assert list(state) == list(a)
    merged = 0
    for key in a:
        rule = selected(key, b) and (family == "sd1" or sdxl_labels(key) is not None)
        if rule:
            assert_rounded(state[key], lerp64(a[key], b[key], 0.3), a[key].dtype, what=key)
            merged += 1
        else:
            assert_same(state[key], a[key], key)
    assert merged > 0.9 * len(a)
    if family == "sdxl":
        for key in ("conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.logit_scale",
                    "conditioner.embedders.1.model.positional_embedding",
                    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                    "edm_vpred.sigma_max"):
            assert key in a
            assert_same(state[key], a[key], key)


def test_sdxl_non_weight_keys_differing_in_b_stay_a():
    a = synth.make_state_dict("sdxl", factor=32, seed=3)
    b = synth.make_state_dict("sdxl", factor=32, seed=4, base=a, noise=0.3)
    for key in ("conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.positional_embedding",
                "conditioner.embedders.1.model.logit_scale"):
        b[key] = b[key] + 1
    _, state = merge(a, b, alpha=1.0)
    for key in a:
        if sdxl_labels(key) is None or "model" not in key:
            assert_same(state[key], a[key], key)
        else:
            assert_same(state[key], b[key].to(a[key].dtype), key)


def test_sd1_block_labels_of_synthetic_keys_cover_all_blocks(synth_pairs):
    a, _ = synth_pairs["sd1"]
    labels = {sd1_block(k) for k in a}
    assert labels == {"BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))}


# ---------------------------------------------------------------------------------------------------------------
# inpainting / instruct-pix2pix (§2.5)


@pytest.mark.parametrize("channels", [9, 8], ids=["inpainting", "pix2pix"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_inpainting_a_merges_first_four_channels(channels, dtype):
    a = sd1_model(1, dtype)
    b = sd1_model(2, dtype, base=a)
    a[CONV_IN] = randn((8, channels, 3, 3), 77, dtype)
    _, state = merge(a, b, alpha=0.35)
    out = state[CONV_IN]
    assert out.dtype == dtype and tuple(out.shape) == (8, channels, 3, 3)
    assert_rounded(out[:, :4], lerp64(a[CONV_IN][:, :4], b[CONV_IN], 0.35), dtype, what="channels 0-3")
    assert_same(out[:, 4:], a[CONV_IN][:, 4:], "extra channels")
    key = UNET + "input_blocks.4.1.proj_in.weight"
    assert_rounded(state[key], lerp64(a[key], b[key], 0.35), dtype, what=key)


def test_inpainting_add_difference_and_adjust():
    a = sd1_model(1, torch.float32)
    b = sd1_model(2, torch.float32, base=a)
    c = sd1_model(3, torch.float32, base=a)
    a[CONV_IN] = randn((8, 9, 3, 3), 77, torch.float32)
    _, state = merge(a, b, c, mode="Add difference", alpha=0.5, adjust="3,0,0,0,0,0,0,0")
    exp = (a[CONV_IN][:, :4].double() + 0.5 * (b[CONV_IN].double() - c[CONV_IN].double())) * (1 - 0.01 * 3)
    assert_rounded(state[CONV_IN][:, :4], exp, torch.float32, what="merged channels")
    assert_same(state[CONV_IN][:, 4:], a[CONV_IN][:, 4:], "extra channels")


def test_synthetic_inpainting_model():
    a = synth.make_state_dict("sd1", factor=32, seed=1, in_channels=9)
    b = synth.make_state_dict("sd1", factor=32, seed=2)
    _, state = merge(a, b, alpha=0.5)
    assert_same(state[CONV_IN][:, 4:], a[CONV_IN][:, 4:], "extra channels")
    assert_rounded(state[CONV_IN][:, :4], lerp64(a[CONV_IN][:, :4], b[CONV_IN], 0.5), a[CONV_IN].dtype)


@pytest.mark.parametrize("channels,kind", [(9, "inpainting"), (8, "instruct-pix2pix")])
def test_inpainting_model_must_be_a(channels, kind):
    a = sd1_model(1, torch.float16)
    b = sd1_model(2, torch.float16, base=a)
    b[CONV_IN] = randn((8, channels, 3, 3), 5, torch.float16)
    with pytest.raises(MergeError, match=f"put the {kind} model in A"):
        merge(a, b, alpha=0.5)
    c = sd1_model(3, torch.float16, base=a)
    c[CONV_IN] = b[CONV_IN]
    with pytest.raises(MergeError, match="model in A"):
        merge(a, sd1_model(2, torch.float16, base=a), c, mode="Add difference")


def test_other_shape_mismatch_refused():
    a = sd1_model(1, torch.float16)
    b = sd1_model(2, torch.float16, base=a)
    key = UNET + "input_blocks.4.1.proj_in.weight"
    b[key] = randn((16, 8), 5, torch.float16)
    with pytest.raises(MergeError, match="do not match"):
        merge(a, b, alpha=0.5)


@pytest.mark.parametrize("shapes", [((8, 16), (8, 8)), ((8, 9, 3, 3), (8, 5, 3, 3))], ids=["linear", "conv"])
def test_dim1_mismatch_other_than_inpainting_refused(shapes):
    a = sd1_model(1, torch.float16)
    b = sd1_model(2, torch.float16, base=a)
    key = UNET + "input_blocks.4.1.proj_in.weight" if len(shapes[0]) == 2 else CONV_IN
    a[key] = randn(shapes[0], 5, torch.float16)
    b[key] = randn(shapes[1], 6, torch.float16)
    with pytest.raises(MergeError):
        merge(a, b, alpha=0.5)
