"""Block weights, presets, elemental, adjust and include/exclude (seed-behaviour.md §3.1, §3.2, §3.6, §4.1-§4.3),
checked against block labels and formulas written out by hand in the tests (see conftest.sd1_block/sdxl_labels)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    ADJUST_KEYS,
    SD1_LABELS,
    SD1_TOKEN,
    UNET,
    XL_LABELS,
    assert_rounded,
    assert_same,
    merge,
    sd1_block,
    sd1_model,
    sdxl_labels,
    selected,
    xl_model,
)

from lib_merge.cli import synth
from lib_merge.core.arch import Arch
from lib_merge.core.errors import MergeError

REFERENCE_PRESETS = Path("/work/shared/reference/mbw-presets.tsv")


def lerp64(a, b, alpha):
    return (1 - alpha) * a.double() + alpha * b.double()


def check_weight_sum(a, b, state, alpha_of, what=""):
    """Every key of A: merged keys (alpha_of returns a ratio) follow A(1-α)+Bα, the rest are A's exactly."""
    for key in a:
        alpha = alpha_of(key) if selected(key, b) else None
        if alpha is None:
            assert_same(state[key], a[key], f"{what} {key}")
        else:
            assert_rounded(state[key], lerp64(a[key], b[key], alpha), a[key].dtype, what=f"{what} {key} α={alpha}")


def pair(dtype=torch.float32, xl=False, seed=1):
    make = xl_model if xl else sd1_model
    a = make(seed, dtype)
    return a, make(seed + 1, dtype, base=a)


@pytest.fixture(scope="module")
def synth_sd1():
    a = synth.make_state_dict("sd1", factor=16, seed=7)
    return a, synth.make_state_dict("sd1", factor=16, seed=8, base=a, noise=0.3)


@pytest.fixture(scope="module")
def synth_xl():
    a = synth.make_state_dict("sdxl", factor=32, seed=7)
    return a, synth.make_state_dict("sdxl", factor=32, seed=8, base=a, noise=0.3)


def distinct_weights(n):
    return [round(0.03 + 0.037 * i, 4) for i in range(n)]


def csv(values):
    return ",".join(str(v) for v in values)


# ---------------------------------------------------------------------------------------------------------------
# §3.1 SD1 block mapping and 26-value MBW


@pytest.mark.parametrize("key,label", [
    (UNET + "time_embed.0.weight", "IN00"),
    (UNET + "time_embed.2.bias", "IN00"),
    (UNET + "out.0.weight", "OUT11"),
    (UNET + "out.2.bias", "OUT11"),
    (UNET + "input_blocks.0.0.weight", "IN00"),
    (UNET + "input_blocks.4.1.proj_in.weight", "IN04"),
    (UNET + "input_blocks.11.0.out_layers.3.bias", "IN11"),
    (UNET + "middle_block.0.in_layers.0.weight", "M00"),
    (UNET + "middle_block.1.proj_out.bias", "M00"),
    (UNET + "output_blocks.0.0.skip_connection.bias", "OUT00"),
    (UNET + "output_blocks.2.1.conv.weight", "OUT02"),
    (UNET + "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight", "OUT11"),
    (SD1_TOKEN, "BASE"),
    ("cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.out_proj.weight", "BASE"),
    ("first_stage_model.decoder.conv_in.weight", "BASE"),
    ("first_stage_model.decoder.up.1.block.0.conv1.bias", "BASE"),
])
def test_sd1_block_labels(key, label):
    assert sd1_block(key) == label  # the hand-written rule of §3.1 ...
    assert Arch("sd1").block_of(key) == (label, label)  # ... and the engine's


def test_sd1_mbw_26_on_every_key(synth_sd1):
    a, b = synth_sd1
    w = distinct_weights(26)
    plan, state = merge(a, b, alpha=0.77, weights_alpha=csv(w))
    check_weight_sum(a, b, state, lambda k: w[SD1_LABELS.index(sd1_block(k))], "mbw26")
    # BASE keys (text encoder, VAE) use the first value, never the alpha slider
    vae = "first_stage_model.decoder.conv_in.weight"
    assert_rounded(state[vae], lerp64(a[vae], b[vae], w[0]), a[vae].dtype)
    assert {job.block for job in plan.jobs if job.kind == "merge"} == set(SD1_LABELS)


def test_sd1_mbw_trailing_comma_and_spaces():
    a, b = pair()
    w = distinct_weights(26)
    _, state = merge(a, b, weights_alpha=" , ".join(str(v) for v in w) + ",")
    check_weight_sum(a, b, state, lambda k: w[SD1_LABELS.index(sd1_block(k))])


def test_mbw_beta_with_triple_sum():
    a = sd1_model(1, torch.float32)
    b = sd1_model(2, torch.float32, base=a)
    c = sd1_model(3, torch.float32, base=a)
    wa, wb = distinct_weights(26), [round(0.5 - 0.017 * i, 4) for i in range(26)]
    _, state = merge(a, b, c, mode="Triple sum", alpha=0.9, beta=0.9, weights_alpha=csv(wa), weights_beta=csv(wb))
    for key in a:
        if not selected(key, b, c):
            assert_same(state[key], a[key], key)
            continue
        i = SD1_LABELS.index(sd1_block(key))
        al, be = wa[i], wb[i]
        exp = (1 - al - be) * a[key].double() + al * b[key].double() + be * c[key].double()
        assert_rounded(state[key], exp, torch.float32, what=key)


# §3.2 SDXL


@pytest.mark.parametrize("key,labels", [
    (UNET + "label_emb.0.0.weight", ("LABEL", "IN00")),
    (UNET + "time_embed.0.bias", ("TIME", "IN00")),
    ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight", ("CLIPL", "BASE")),
    ("conditioner.embedders.1.model.ln_final.weight", ("CLIPG", "BASE")),
    ("first_stage_model.encoder.down.0.block.0.conv1.weight", ("VAE", "BASE")),
    (UNET + "input_blocks.0.0.weight", ("IN00", "IN00")),
    (UNET + "input_blocks.4.1.transformer_blocks.3.attn1.to_q.weight", ("IN413", "IN04")),
    (UNET + "input_blocks.4.1.proj_in.weight", ("IN41", "IN04")),
    (UNET + "input_blocks.8.0.in_layers.2.bias", ("IN80", "IN08")),
    (UNET + "middle_block.1.transformer_blocks.5.ff.net.2.weight", ("MID105", "M00")),
    (UNET + "middle_block.2.out_layers.3.weight", ("MID20", "M00")),
    (UNET + "output_blocks.2.2.conv.weight", ("OUT22", "OUT02")),
    (UNET + "output_blocks.0.1.proj_out.bias", ("OUT01", "OUT00")),
    (UNET + "output_blocks.8.0.skip_connection.weight", ("OUT80", "OUT08")),
    (UNET + "out.0.weight", ("OUT9", "OUT08")),
    (UNET + "out.2.bias", ("OUT9", "OUT08")),
    ("conditioner.embedders.1.model.text_projection", None),
    ("conditioner.embedders.1.model.logit_scale", None),
    ("conditioner.embedders.0.transformer.text_model.embeddings.position_ids", None),
])
def test_sdxl_block_labels(key, labels):
    assert sdxl_labels(key) == labels
    assert Arch("sdxl").block_of(key) == labels


def test_sdxl_mbw_20_on_every_key(synth_xl):
    a, b = synth_xl
    w = distinct_weights(20)
    _, state = merge(a, b, alpha=0.77, weights_alpha=csv(w))
    check_weight_sum(a, b, state, lambda k: w[XL_LABELS.index(sdxl_labels(k)[1])] if sdxl_labels(k) else None)


def test_sdxl_mbw_26_converted(synth_xl):
    # §3.2: keep IN00-IN08 and M00, OUT00-OUT08; IN09-IN11 and OUT09-OUT11 are dropped. The XL labels are a subset
    # of the 26 labels, so each XL block takes the value at its 26-label position.
    a, b = synth_xl
    w = distinct_weights(26)
    _, state = merge(a, b, alpha=0.77, weights_alpha=csv(w))
    check_weight_sum(a, b, state, lambda k: w[SD1_LABELS.index(sdxl_labels(k)[1])] if sdxl_labels(k) else None)
    for dropped in ("IN09", "IN10", "IN11", "OUT09", "OUT10", "OUT11"):
        value = w[SD1_LABELS.index(dropped)]
        assert value not in [w[SD1_LABELS.index(x)] for x in XL_LABELS]


# §3.6 presets


def reference_presets():
    if not REFERENCE_PRESETS.exists():
        return {}
    lines = REFERENCE_PRESETS.read_text(encoding="utf-8").splitlines()[1:]
    return dict(line.split("\t", 1) for line in lines if "\t" in line)


PRESETS = reference_presets()


@pytest.mark.skipif(not PRESETS, reason="reference preset table not available")
@pytest.mark.parametrize("name", sorted(PRESETS) or ["none"])
def test_presets_by_name(name):
    values = [float(v) for v in PRESETS[name].split(",")]
    assert len(values) == 26
    a, b = pair(torch.float32)
    plan, state = merge(a, b, alpha=0.77, weights_alpha=name)
    assert [float(v) for v in plan.recipe.weights_alpha.split(",")] == values
    check_weight_sum(a, b, state, lambda k: values[SD1_LABELS.index(sd1_block(k))], name)


@pytest.mark.skipif("GRAD_V" not in PRESETS, reason="reference preset table not available")
def test_preset_on_sdxl_is_converted(synth_xl):
    a, b = synth_xl
    values = [float(v) for v in PRESETS["GRAD_V"].split(",")]
    _, state = merge(a, b, weights_alpha="GRAD_V")
    check_weight_sum(a, b, state, lambda k: values[SD1_LABELS.index(sdxl_labels(k)[1])] if sdxl_labels(k) else None)


# ---------------------------------------------------------------------------------------------------------------
# §4.1 elemental

ATTN2_K6 = UNET + "output_blocks.6.1.transformer_blocks.0.attn2.to_k.weight"
ATTN1_Q6 = UNET + "output_blocks.6.1.transformer_blocks.0.attn1.to_q.weight"
FF6 = UNET + "output_blocks.6.1.transformer_blocks.0.ff.net.2.bias"
PROJ_IN4 = UNET + "input_blocks.4.1.proj_in.weight"


def in_blocks(*labels):
    return lambda k: sd1_block(k) in labels


ELEMENTAL_CASES = [
    # (text, base alpha, {predicate -> alpha}; the first matching predicate wins, else base alpha)
    ("OUT06:attn:0.5,OUT06:attn2.to_k:0.2", 0.9,
     [(lambda k: k == ATTN2_K6, 0.2), (lambda k: sd1_block(k) == "OUT06" and "attn" in k, 0.5)]),
    ("IN04::0.1,IN04::0.7", 0.9, [(in_blocks("IN04"), 0.7)]),
    ("IN04::0.7,IN04:proj_in:0.1", 0.9, [(lambda k: k == PROJ_IN4, 0.1), (in_blocks("IN04"), 0.7)]),
    ("IN04:proj_in:0.1,IN04::0.7", 0.9, [(in_blocks("IN04"), 0.7)]),
    ("NOT IN04::0.1", 0.9, [(lambda k: sd1_block(k) != "IN04", 0.1)]),
    ("IN04:NOT attn:0.1", 0.9, [(lambda k: sd1_block(k) == "IN04" and "attn" not in k, 0.1)]),
    ("NOT IN04 OUT06:NOT attn norm:0.15", 0.9,
     [(lambda k: sd1_block(k) not in ("IN04", "OUT06") and "attn" not in k and "norm" not in k, 0.15)]),
    ("IN03-IN05::0.1", 0.9, [(in_blocks("IN03", "IN04", "IN05"), 0.1)]),
    ("IN05-IN03::0.1", 0.9, [(in_blocks("IN03", "IN04", "IN05"), 0.1)]),
    ("IN10-OUT01::0.1", 0.9, [(in_blocks("IN10", "IN11", "M00", "OUT00", "OUT01"), 0.1)]),
    ("::0.2", 0.9, [(lambda k: True, 0.2)]),
    (":attn:0.2", 0.9, [(lambda k: "attn" in k, 0.2)]),
    (":attn2.to_k attn1:0.2", 0.9, [(lambda k: "attn2.to_k" in k or "attn1" in k, 0.2)]),
    ("IN04 OUT06::0.2", 0.9, [(in_blocks("IN04", "OUT06"), 0.2)]),
    ("IN04::0.2\nOUT06::0.3", 0.9, [(in_blocks("IN04"), 0.2), (in_blocks("OUT06"), 0.3)]),
    ("BASE::0.05", 0.9, [(in_blocks("BASE"), 0.05)]),
    ("BASE:first_stage_model:-0.5", 0.9, [(lambda k: "first_stage_model" in k, -0.5)]),
    ("OUT11::1.5", 0.9, [(in_blocks("OUT11"), 1.5)]),
    ("M00:proj_out:0", 0.9, [(lambda k: sd1_block(k) == "M00" and "proj_out" in k, 0.0)]),
]


@pytest.mark.parametrize("text,alpha,rules", ELEMENTAL_CASES, ids=[c[0].replace("\n", "|") for c in ELEMENTAL_CASES])
def test_elemental_sd1(text, alpha, rules):
    a, b = pair(torch.float16)

    def alpha_of(key):
        for pred, value in rules:
            if pred(key):
                return value
        return alpha

    _, state = merge(a, b, alpha=alpha, elemental=text)
    check_weight_sum(a, b, state, alpha_of, text)


def test_elemental_overrides_mbw():
    a, b = pair(torch.float32)
    w = distinct_weights(26)
    _, state = merge(a, b, weights_alpha=csv(w), elemental="IN04:proj_in:0.2")
    check_weight_sum(a, b, state, lambda k: 0.2 if k == PROJ_IN4 else w[SD1_LABELS.index(sd1_block(k))])


@pytest.mark.parametrize("mbw", [False, True], ids=["sliders", "mbw"])
def test_elemental_sets_alpha_only(mbw):
    a = sd1_model(1, torch.float32)
    b = sd1_model(2, torch.float32, base=a)
    c = sd1_model(3, torch.float32, base=a)
    wa = distinct_weights(26) if mbw else None
    wb = [round(0.4 - 0.013 * i, 4) for i in range(26)] if mbw else None
    kw = dict(weights_alpha=csv(wa), weights_beta=csv(wb)) if mbw else {}
    _, state = merge(a, b, c, mode="Triple sum", alpha=0.3, beta=0.25, elemental="OUT06::0.6", **kw)
    for key in a:
        if not selected(key, b, c):
            assert_same(state[key], a[key], key)
            continue
        i = SD1_LABELS.index(sd1_block(key))
        be = wb[i] if mbw else 0.25
        al = 0.6 if sd1_block(key) == "OUT06" else (wa[i] if mbw else 0.3)
        exp = (1 - al - be) * a[key].double() + al * b[key].double() + be * c[key].double()
        assert_rounded(state[key], exp, torch.float32, what=key)


def test_elemental_sdxl_blocks(synth_xl):
    a, b = synth_xl

    def alpha_of(key):
        labels = sdxl_labels(key)
        if labels is None:
            return None
        return {"OUT05": 0.1, "M00": 0.8, "IN08": 0.65}.get(labels[1], 0.4)

    _, state = merge(a, b, alpha=0.4, elemental="OUT05::0.1,M00::0.8,IN08::0.65")
    check_weight_sum(a, b, state, alpha_of, "sdxl elemental")
    assert any("output_blocks.5." in k for k in a)


def test_elemental_sdxl_out01_addresses_output_blocks_1_only():
    a, b = pair(torch.float32, xl=True)
    _, state = merge(a, b, alpha=0.4, elemental="OUT01::0.1")
    check_weight_sum(a, b, state, lambda k: None if sdxl_labels(k) is None
                     else (0.1 if sdxl_labels(k)[1] == "OUT01" else 0.4))


@pytest.mark.parametrize("text", ["IN09::0.5", "IN11::0.5", "OUT09::0.5", "IN05-IN10::0.5", "IN09-IN11::0.5"])
def test_elemental_sd1_only_blocks_refused_for_sdxl(text):
    a, b = pair(torch.float16, xl=True)
    with pytest.raises(MergeError, match="unknown block|bad range"):
        merge(a, b, elemental=text)


# ---------------------------------------------------------------------------------------------------------------
# §4.2 adjust

SD1_COLOURS = lambda bri, c1, c2, c3: (0.02 * (-bri + c1 + c3), 0.02 * (bri / 3 + c1 - c2),  # noqa: E731
                                       0.02 * (2 * bri / 3 - c2 + c3))
XL_COLOURS = lambda bri, c1, c2, c3: (0.02 * (c1 - c2 - c3), 0.02 * (c3 - c2), 0.02 * bri)  # noqa: E731


def adjusted(key, merged, values, xl):
    """§4.2 applied to a float64 merge result."""
    inp, out, out2, cont, bri, c1, c2, c3 = values
    mult = {ADJUST_KEYS[0]: 1 - 0.01 * inp, ADJUST_KEYS[1]: 1 + 0.02 * inp, ADJUST_KEYS[2]: 1 - 0.01 * out,
            ADJUST_KEYS[3]: 1 + 0.02 * out, ADJUST_KEYS[4]: 1 - 0.01 * out2}
    if key in mult:
        return merged * mult[key]
    if key == ADJUST_KEYS[5]:
        colours = (XL_COLOURS if xl else SD1_COLOURS)(bri, c1, c2, c3)
        return merged + torch.tensor([0.02 * cont, *colours], dtype=torch.float64)
    return merged


ADJUST_VALUES = [(1, 2, 3, 4, 5, 6, 7, 8), (-3, 0.5, -2, 0, 4, -1, 2.5, -6), (0, 0, 0, 0, 1, 0, 0, 0)]


@pytest.mark.parametrize("xl", [False, True], ids=["sd1", "sdxl"])
@pytest.mark.parametrize("values", ADJUST_VALUES, ids=["v1", "v2", "bri"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_adjust(xl, values, dtype):
    a, b = pair(dtype, xl=xl)
    text = ",".join(str(v) for v in values)
    _, state = merge(a, b, alpha=0.3, adjust=text)
    for key in a:
        if not selected(key, b):
            assert_same(state[key], a[key], key)
            continue
        exp = adjusted(key, lerp64(a[key], b[key], 0.3), values, xl)
        # fp16: the merge result may be rounded before adjusting (see test_formulas), so allow a second rounding
        assert_rounded(state[key], exp, dtype, ulps=1.6 if dtype == torch.float16 else None, what=key)
    for key in ADJUST_KEYS:
        assert key in a


def test_adjust_after_formula():
    a = sd1_model(1, torch.float32)
    b = sd1_model(2, torch.float32, base=a)
    c = sd1_model(3, torch.float32, base=a)
    values = (2, -3, 4, 5, -1, 2, 3, -4)
    text = ",".join(map(str, values))
    _, state = merge(a, b, alpha=1.0, adjust=text)  # result is B, then adjusted
    _, diff = merge(a, b, c, mode="Add difference", alpha=0.6, adjust=text)
    for key in ADJUST_KEYS:
        assert_rounded(state[key], adjusted(key, b[key].double(), values, False), torch.float32, what=key)
        exp = adjusted(key, a[key].double() + 0.6 * (b[key].double() - c[key].double()), values, False)
        assert_rounded(diff[key], exp, torch.float32, what=key)


def test_adjust_all_zero_is_off():
    a, b = pair(torch.float16)
    _, plain = merge(a, b, alpha=0.3)
    _, zero = merge(a, b, alpha=0.3, adjust="0,0,0,0,0,0,0,0")
    for key in a:
        assert_same(zero[key], plain[key], key)


@pytest.mark.parametrize("inex,blocks,elements,skipped", [
    ("Exclude", ("Adjust",), (), set(ADJUST_KEYS)),
    ("Exclude", ("OUT11",), (), set(ADJUST_KEYS[2:])),
    ("Exclude", ("IN00",), (), set(ADJUST_KEYS[:2])),
    ("Exclude", (), ("out.2",), set(ADJUST_KEYS[4:])),
    ("Include", ("IN04",), (), set(ADJUST_KEYS)),
])
def test_adjust_not_applied_to_skipped_keys(inex, blocks, elements, skipped):
    a, b = pair(torch.float32)
    values = (1, 2, 3, 4, 5, 6, 7, 8)
    _, state = merge(a, b, alpha=0.3, adjust=csv(values), inex=inex, inex_blocks=blocks, inex_elements=elements)
    for key in ADJUST_KEYS:
        if key in skipped:
            assert_same(state[key], a[key], key)
        else:
            assert_rounded(state[key], adjusted(key, lerp64(a[key], b[key], 0.3), values, False), torch.float32)


def test_adjust_not_applied_to_keys_b_lacks():
    a, b = pair(torch.float32)
    del b[ADJUST_KEYS[5]], b[ADJUST_KEYS[0]]
    _, state = merge(a, b, alpha=0.3, adjust="1,2,3,4,5,6,7,8")
    assert_same(state[ADJUST_KEYS[5]], a[ADJUST_KEYS[5]])
    assert_same(state[ADJUST_KEYS[0]], a[ADJUST_KEYS[0]])


# ---------------------------------------------------------------------------------------------------------------
# §4.3 include / exclude


def sd1_hit(blocks, elements):
    """§4.3 rules 1-5 for SD1 (fine label == block label)."""
    def hit(key):
        block = sd1_block(key)
        return (block in blocks or block in elements or ("Adjust" in blocks and key in ADJUST_KEYS)
                or any(e and e in key for e in elements) or ("VAE" in blocks and "first_stage_model" in key))
    return hit


@pytest.mark.parametrize("mode", ["Include", "Exclude"])
@pytest.mark.parametrize("blocks,elements", [
    (("IN04",), ()),
    ((), ("attn",)),
    ((), ("proj", "time_embed")),
    (("VAE",), ()),
    (("BASE",), ()),
    (("Adjust",), ()),
    (("IN04", "M00"), ("first_stage",)),
    (("OUT11", "VAE"), ("attn2",)),
    ((), ("IN04",)),
    (("IN03 IN05",), ()),
])
def test_include_exclude_sd1(mode, blocks, elements):
    a, b = pair(torch.float16)
    hit = sd1_hit([t for b_ in blocks for t in b_.split()], elements)
    _, state = merge(a, b, alpha=0.35, inex=mode, inex_blocks=blocks, inex_elements=elements)

    def alpha_of(key):
        merged = hit(key) if mode == "Include" else not hit(key)
        return 0.35 if merged else None

    check_weight_sum(a, b, state, alpha_of, f"{mode} {blocks} {elements}")
    if blocks == ("BASE",) and mode == "Exclude":  # excluding BASE excludes the VAE too (SD1)
        key = "first_stage_model.decoder.conv_in.weight"
        assert_same(state[key], a[key], key)


def test_include_exclude_off_ignores_lists():
    a, b = pair(torch.float16)
    _, state = merge(a, b, alpha=0.35, inex="Off", inex_blocks=("IN04",), inex_elements=("attn",))
    check_weight_sum(a, b, state, lambda k: 0.35)


@pytest.mark.parametrize("mode", ["Include", "Exclude"])
@pytest.mark.parametrize("blocks,elements", [
    (("IN41",), ()),  # a fine label: only input_blocks.4.1's own keys, not its transformer blocks (IN410, ...)
    (("OUT02", "VAE"), ()),
    ((), ("CLIPG",)),
    (("BASE",), ("attn2",)),
])
def test_include_exclude_sdxl(mode, blocks, elements, synth_xl):
    a, b = synth_xl

    def alpha_of(key):
        labels = sdxl_labels(key)
        if labels is None:
            return None
        fine, block = labels
        hit = (block in blocks or fine in blocks or fine in elements or ("Adjust" in blocks and key in ADJUST_KEYS)
               or any(e in key for e in elements) or ("VAE" in blocks and "first_stage_model" in key))
        merged = hit if mode == "Include" else not hit
        return 0.35 if merged else None

    _, state = merge(a, b, alpha=0.35, inex=mode, inex_blocks=blocks, inex_elements=elements)
    check_weight_sum(a, b, state, alpha_of, f"{mode} {blocks} {elements}")


# ---------------------------------------------------------------------------------------------------------------
# bad block weights / elemental / adjust (each a MergeError with a helpful message)


@pytest.mark.parametrize("weights,match", [
    (csv([0.5] * 25), "25 values"),
    (csv([0.5] * 27), "27 values"),
    (csv([0.5] * 20), "20 values"),
    (csv([0.5] * 12 + ["abc"] + [0.5] * 13), "not a number"),
    (csv([0.5] * 12 + ["nan"] + [0.5] * 13), "not a finite number"),
    (csv([0.5] * 12 + ["inf"] + [0.5] * 13), "not a finite number"),
    (csv([0.5] * 12 + ["-inf"] + [0.5] * 13), "not a finite number"),
    ("NO_SUCH_PRESET", "Unknown preset"),
])
def test_bad_weights(weights, match):
    a, b = pair(torch.float16)
    with pytest.raises(MergeError, match=match):
        merge(a, b, weights_alpha=weights)


def test_bad_beta_weights():
    a = sd1_model(1, torch.float16)
    b = sd1_model(2, torch.float16, base=a)
    c = sd1_model(3, torch.float16, base=a)
    with pytest.raises(MergeError, match="beta"):
        merge(a, b, c, mode="Triple sum", weights_alpha=csv([0.5] * 26), weights_beta=csv([0.2] * 25))


@pytest.mark.parametrize("weights", [csv([0.5] * 25), csv([0.5] * 21), csv([0.5] * 27)])
def test_bad_weight_count_sdxl(weights):
    a, b = pair(torch.float16, xl=True)
    with pytest.raises(MergeError, match="values"):
        merge(a, b, weights_alpha=weights)


@pytest.mark.parametrize("text,match", [
    ("IN04:0.5", "Blocks:Elements:Ratio"),
    ("IN04:attn:x:0.5", "Blocks:Elements:Ratio"),
    ("OUT06:attn:0.5,IN04", "Blocks:Elements:Ratio"),
    ("IN99::0.5", "unknown block"),
    ("FOO:attn:0.5", "unknown block"),
    ("IN03-IN99::0.5", "range"),
    ("IN04::abc", "not a number"),
    ("IN04::nan", "finite"),
])
def test_bad_elemental(text, match):
    a, b = pair(torch.float16)
    with pytest.raises(MergeError, match=match):
        merge(a, b, elemental=text)


@pytest.mark.parametrize("text", ["1,2,3,4,5,6,7", "1,2,3,4,5,6,7,8,9", "1,2,3,x,5,6,7,8"])
def test_bad_adjust(text):
    a, b = pair(torch.float16)
    with pytest.raises(MergeError, match="Adjust"):
        merge(a, b, adjust=text)


def test_bad_include_exclude_block():
    a, b = pair(torch.float16)
    with pytest.raises(MergeError, match="unknown block"):
        merge(a, b, inex="Exclude", inex_blocks=("IN44",))
