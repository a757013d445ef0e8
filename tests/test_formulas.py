"""The merge engine's math against expectations written by hand from the spec (seed-behaviour.md §2.3, §2.4).

Every expectation is computed here in float64 from the formula in the spec, never by calling lib_merge.core.kernels;
outputs are compared within one ulp of A's dtype (a few for fp32, where several fp32 operations are chained).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
from conftest import (
    CONV_IN,
    SD1_POS,
    SD1_SHAPES,
    SD1_TOKEN,
    UNET,
    assert_rounded,
    assert_same,
    assert_unchanged,
    clone_all,
    merge,
    randn,
    sd1_model,
    selected,
    xl_model,
)

from lib_merge.cli import synth
from lib_merge.core.errors import MergeError

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DT_IDS = ["fp16", "bf16", "fp32"]
MODES = ["Weight sum", "Add difference", "Triple sum", "sum Twice"]


def three(dtype_a, dtype_b=None, dtype_c=None, seed=1):
    a = sd1_model(seed, dtype_a)
    b = sd1_model(seed + 1, dtype_b or dtype_a, base=a)
    c = sd1_model(seed + 2, dtype_c or dtype_a, base=a)
    return a, b, c


def normal_expected(mode, a, b, c, alpha, beta):
    """§2.3, in float64."""
    a, b = a.double(), b.double()
    c = c.double() if c is not None else None
    if mode == "Weight sum":
        return (1 - alpha) * a + alpha * b
    if mode == "Add difference":
        return a + alpha * (b - c)
    if mode == "Triple sum":
        return (1 - alpha - beta) * a + alpha * b + beta * c
    return (1 - beta) * ((1 - alpha) * a + alpha * b) + beta * c


def check_normal(mode, a, b, c, state, alpha, beta):
    uses_c = mode != "Weight sum"
    assert list(state)[: len(a)] == list(a)
    for key in a:
        if selected(key, b, c if uses_c else None):
            exp = normal_expected(mode, a[key], b[key], c[key] if uses_c else None, alpha, beta)
            assert_rounded(state[key], exp, a[key].dtype, what=f"{mode} {key}")
        else:
            assert_same(state[key], a[key], key)


# ---------------------------------------------------------------------------------------------------------------
# 1. merge modes with calc "normal"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alpha,beta", [(0.3, 0.25), (-0.5, 0.4), (1.5, -0.2), (0.7, 0.6)])
def test_normal_modes(dtype, mode, alpha, beta):
    a, b, c = three(dtype)
    uses_c = mode != "Weight sum"
    plan, state = merge(a, b, c if uses_c else None, mode=mode, alpha=alpha, beta=beta)
    assert plan.recipe.mode == mode
    check_normal(mode, a, b, c, state, alpha, beta)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "dts", [(torch.float16, torch.float32, torch.bfloat16), (torch.float32, torch.float16, torch.float16),
            (torch.bfloat16, torch.float16, torch.float32)],
    ids=["a16-b32-cbf", "a32-b16-c16", "abf-b16-c32"])
def test_normal_modes_mixed_dtypes_give_a_dtype(mode, dts):
    a, b, c = three(*dts)
    uses_c = mode != "Weight sum"
    _, state = merge(a, b, c if uses_c else None, mode=mode, alpha=0.35, beta=0.3)
    check_normal(mode, a, b, c, state, 0.35, 0.3)
    for key in a:
        assert state[key].dtype == a[key].dtype


@pytest.mark.parametrize("dtype_a,dtype_b", [(torch.float16, torch.float16), (torch.float16, torch.float32),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_weight_sum_alpha_0_is_a_and_alpha_1_is_b(dtype_a, dtype_b):
    a, b, _ = three(dtype_a, dtype_b)
    _, state = merge(a, b, alpha=0.0)
    for key in a:
        assert_same(state[key], a[key], key)
    _, state = merge(a, b, alpha=1.0)
    for key in a:
        if selected(key, b):
            assert_same(state[key], b[key].to(a[key].dtype), key)
        else:
            assert_same(state[key], a[key], key)


def test_triple_sum_with_alpha_plus_beta_zero():
    # §2.3: the lerp form would divide by alpha+beta; the plain formula applies.
    a, b, c = three(torch.float32)
    _, state = merge(a, b, c, mode="Triple sum", alpha=0.4, beta=-0.4)
    check_normal("Triple sum", a, b, c, state, 0.4, -0.4)


def test_add_difference_with_b_equal_c_is_a():
    a, b, _ = three(torch.float16)
    _, state = merge(a, b, clone_all(b), mode="Add difference", alpha=0.8)
    for key in a:
        assert_same(state[key], a[key], key)


# ---------------------------------------------------------------------------------------------------------------
# 2. calc modes

# cosineA / cosineB (§2.4), written with numpy in float64, following torch's conventions for zero vectors


def _normalize(x):
    """F.normalize(x, p=2, dim=0): x / max(||x||, 1e-12) per column (a 0-dim tensor is its own column)."""
    if x.ndim == 0:
        return x / max(abs(float(x)), 1e-12)
    n = np.sqrt((x * x).sum(axis=0, keepdims=True))
    return x / np.maximum(n, 1e-12)


def _colcos(x, y):
    """CosineSimilarity(dim=0): one value per column; 0 for a zero column (torch clamps the norms by eps)."""
    if x.ndim == 0:
        x, y = x.reshape(1), y.reshape(1)
    nx = np.maximum(np.sqrt((x * x).sum(axis=0)), 1e-8)
    ny = np.maximum(np.sqrt((y * y).sum(axis=0)), 1e-8)
    return ((x / nx) * (y / ny)).sum(axis=0)


def _similarities(a, b, normalize):
    a, b = a.double().numpy(), b.double().numpy()
    if normalize:
        a, b = _normalize(a), _normalize(b)
    simab = _colcos(a, b)
    mag = (a.reshape(-1) @ b.reshape(-1)) / (np.linalg.norm(a.reshape(-1)) * np.linalg.norm(b.reshape(-1)))
    return simab, (simab + mag) / 2


def _range(values):
    v = values[~np.isnan(values)]
    v = np.delete(v, np.where(v < np.percentile(v, 1, method="midpoint")))
    v = np.delete(v, np.where(v > np.percentile(v, 99, method="midpoint")))
    return v.min(), v.max()


def cosine_expected(calc, a, b, alpha):
    """{key: float64 result} for the keys cosine merges; the others must stay A's."""
    normalize = calc == "cosineA"
    pool = [k for k in a if "model" in k and k in b and "first_stage_model" not in k]
    collected = []
    for key in pool:
        simab, comb = _similarities(a[key], b[key], normalize)
        collected.append(np.asarray(simab if normalize else comb, dtype=np.float64).reshape(-1))
    smin, smax = _range(np.concatenate(collected))
    out = {}
    for key in a:
        if not selected(key, b) or "first_stage_model" in key:
            continue
        _, comb = _similarities(a[key], b[key], normalize)
        k = (comb - smin) / (smax - smin) - (abs(alpha) if normalize else alpha)
        k = np.clip(k, 0, 1)
        ta, tb = a[key].double().numpy(), b[key].double().numpy()
        out[key] = torch.from_numpy(np.asarray((1 - k) * tb + k * ta, dtype=np.float64).reshape(ta.shape))
    return out


def _without_pos():
    return {k: v for k, v in SD1_SHAPES.items() if k != SD1_POS}


@pytest.mark.parametrize("calc", ["cosineA", "cosineB"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, -0.3, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("with_pos", [True, False], ids=["pos_ids", "no_pos_ids"])
def test_cosine(calc, alpha, dtype, with_pos):
    shapes = SD1_SHAPES if with_pos else _without_pos()
    a = sd1_model(11, dtype, shapes=shapes)
    b = sd1_model(12, dtype, base=a, noise=0.4, shapes=shapes)
    _, state = merge(a, b, calc=calc, alpha=alpha)
    expected = cosine_expected(calc, a, b, alpha)
    assert expected, "no key was expected to merge"
    for key in a:
        if key in expected:
            ulps, atol = (1, 1e-5) if dtype == torch.float16 else (8, 2e-5)
            assert_rounded(state[key], expected[key], dtype, ulps=ulps, atol=atol, what=f"{calc} {key}")
        else:
            assert_same(state[key], a[key], key)


def test_cosine_leaves_vae_alone_and_alpha_sign():
    a = sd1_model(21, torch.float32)
    b = sd1_model(22, torch.float32, base=a, noise=0.4)
    _, pos = merge(a, b, calc="cosineA", alpha=0.3)
    _, neg = merge(a, b, calc="cosineA", alpha=-0.3)
    for key in a:
        assert_same(neg[key], pos[key], key)  # cosineA uses |alpha|
        if "first_stage_model" in key:
            assert_same(pos[key], a[key], key)
    _, pos_b = merge(a, b, calc="cosineB", alpha=0.3)
    _, neg_b = merge(a, b, calc="cosineB", alpha=-0.3)
    assert any(not torch.equal(pos_b[k], neg_b[k]) for k in a)  # cosineB uses alpha as given


@pytest.mark.parametrize("calc", ["cosineA", "cosineB"])
def test_cosine_range_pass_includes_0dim_model_keys(calc):
    shapes = {k: v for k, v in _without_pos().items() if k != "alphas_cumprod"}
    shapes["model_ema.decay"] = ()
    a = sd1_model(31, torch.float32, shapes=shapes)
    b = sd1_model(32, torch.float32, base=a, noise=0.4, shapes=shapes)
    a["model_ema.decay"] = torch.tensor(0.9999)
    b["model_ema.decay"] = torch.tensor(0.9999)
    _, state = merge(a, b, calc=calc, alpha=0.1)
    expected = cosine_expected(calc, a, b, 0.1)
    for key, exp in expected.items():
        assert_rounded(state[key], exp, torch.float32, ulps=8, atol=2e-5, what=key)


# trainDifference


def train_difference_expected(a, b, c, alpha):
    a, b, c = a.double(), b.double(), c.double()
    d_bc, d_ba = (b - c).abs(), (b - a).abs()
    total = d_bc + d_ba
    scale = torch.where(total != 0, d_ba / torch.where(total != 0, total, 1), 0)
    return a + (b - c) * scale * (alpha * 1.8)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("alpha", [0.5, 1.0, -0.4])
def test_train_difference(dtype, alpha):
    a, b, c = three(dtype)
    same = UNET + "input_blocks.4.1.proj_in.weight"
    c[same] = b[same].clone()  # B equals C exactly: the key is skipped and keeps A
    partial = UNET + "output_blocks.2.1.conv.weight"
    b[partial][0] = a[partial][0]  # |B-A| = 0 on row 0 (and B != C): no change there
    c[partial][1] = b[partial][1]  # |B-C| = 0 on row 1
    b[partial][2] = a[partial][2]
    c[partial][2] = a[partial][2]  # |B-C| + |B-A| = 0 on row 2
    plan, state = merge(a, b, c, mode="Add difference", calc="trainDifference", alpha=alpha)
    assert plan.recipe.mode == "Add difference"
    for key in a:
        if key == same or not selected(key, b, c):
            assert_same(state[key], a[key], key)
            continue
        assert_rounded(state[key], train_difference_expected(a[key], b[key], c[key], alpha), dtype, what=key)
    for row in range(3):
        assert_same(state[partial][row], a[partial][row], f"{partial} row {row}")


def test_train_difference_fp16_result_is_cast_to_a_dtype():
    a, b, c = three(torch.float16, torch.float32, torch.float32)
    _, state = merge(a, b, c, mode="Add difference", calc="trainDifference", alpha=0.5)
    assert all(state[k].dtype == a[k].dtype for k in a)


# smoothAdd / smoothAdd MT


def smooth_expected(a, b, c, alpha):
    diff = (b.double() - c.double()).float().numpy()  # the fp32 B-C
    if diff.ndim == 0:
        f = diff.astype(np.float64)
    else:
        f = scipy.ndimage.gaussian_filter(scipy.ndimage.median_filter(diff, size=3), sigma=1)
    return a.double() + alpha * torch.from_numpy(np.asarray(f, dtype=np.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("calc", ["smoothAdd", "smoothAdd MT"])
def test_smooth_add(dtype, calc):
    a, b, c = three(dtype)
    _, state = merge(a, b, c, mode="Add difference", calc=calc, alpha=0.7)
    for key in a:
        if selected(key, b, c):
            assert_rounded(state[key], smooth_expected(a[key], b[key], c[key], 0.7), dtype, what=f"{calc} {key}")
        else:
            assert_same(state[key], a[key], key)


def test_smooth_add_is_n_dimensional():
    # A 4-D conv filtered as a whole differs from filtering its 2-D slices; the spec filters over every axis.
    a, b, c = three(torch.float32)
    key = UNET + "output_blocks.2.1.conv.weight"
    _, state = merge(a, b, c, mode="Add difference", calc="smoothAdd", alpha=1.0)
    diff = (b[key] - c[key]).numpy()
    per_slice = np.stack([np.stack([scipy.ndimage.gaussian_filter(scipy.ndimage.median_filter(diff[i, j], size=3),
                                                                  sigma=1) for j in range(diff.shape[1])])
                          for i in range(diff.shape[0])])
    assert not np.allclose(state[key].double().numpy(), a[key].double().numpy() + per_slice, atol=1e-4)


def test_smooth_add_mt_equals_smooth_add_bit_for_bit():
    a = synth.make_state_dict("sd1", factor=32, seed=5)
    b = synth.make_state_dict("sd1", factor=32, seed=6, base=a, noise=0.2)
    c = synth.make_state_dict("sd1", factor=32, seed=7, base=a, noise=0.2)
    kw = dict(mode="Add difference", alpha=0.6, adjust="1,2,-1,3,1,-2,0.5,4")
    _, single = merge(a, b, c, calc="smoothAdd", **kw)
    _, multi = merge(a, b, c, calc="smoothAdd MT", **kw)
    assert list(single) == list(multi)
    for key in single:
        assert_same(multi[key], single[key], key)


# extract


def extract_expected(a, b, c, alpha, beta, gamma):
    base = a.double()
    da, db = b.double() - base, c.double() - base
    if base.dim() == 0:
        return base + da + alpha * (db - da)
    num = (da * db).sum(-1)
    den = torch.clamp(da.norm(dim=-1), min=1e-8) * torch.clamp(db.norm(dim=-1), min=1e-8)
    cos = (num / den).clamp(-1, 1).unsqueeze(-1)
    d = ((cos + 1) / 2) ** gamma
    return base + (da + alpha * (db - da)) * (d + beta * ((1 - d) - d))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("alpha,beta,gamma", [(0.0, 0.0, 0.3), (1.0, 1.0, 2.0), (0.3, 0.7, 1.5), (0.5, 0.25, 0.0)])
def test_extract(dtype, alpha, beta, gamma):
    a, b, c = three(dtype)
    plan, state = merge(a, b, c, mode="Add difference", calc="extract", alpha=alpha, beta=beta, gamma=gamma)
    assert plan.recipe.mode == "Add difference"
    for key in a:
        if selected(key, b, c):
            exp = extract_expected(a[key], b[key], c[key], alpha, beta, gamma)
            assert_rounded(state[key], exp, dtype, what=f"extract {key}")
        else:
            assert_same(state[key], a[key], key)


@pytest.mark.parametrize("kw", [dict(alpha=1.5), dict(alpha=-0.1), dict(beta=1.2), dict(beta=-0.5),
                                dict(gamma=-1.0)])
def test_extract_refuses_out_of_range(kw):
    a, b, c = three(torch.float16)
    with pytest.raises(MergeError, match="extract"):
        merge(a, b, c, mode="Add difference", calc="extract", **kw)


def test_extract_refuses_out_of_range_block_weight():
    a, b, c = three(torch.float16)
    weights = ",".join(["0.5"] * 5 + ["1.5"] + ["0.5"] * 20)
    with pytest.raises(MergeError, match="extract"):
        merge(a, b, c, mode="Add difference", calc="extract", weights_alpha=weights)


# tensor / tensor2


def tensor_model(seed, dtype):
    shapes = {
        SD1_TOKEN: (16, 8),
        UNET + "input_blocks.4.1.proj_in.weight": (8, 8),
        UNET + "input_blocks.4.1.proj_in.bias": (8,),
        CONV_IN: (8, 4, 3, 3),
        UNET + "output_blocks.2.1.conv.weight": (10, 6, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (4, 120),
        UNET + "middle_block.0.skip.weight": (),
        SD1_POS: (1, 77),
    }
    return sd1_model(seed, dtype, shapes=shapes)


def tensor_expected(calc, a, b, alpha, beta):
    if a.dim() == 0:
        return a
    if calc == "tensor" or a.dim() == 1:
        dim, n = 0, a.shape[0]
    else:
        dim, n = 1, (a.shape[1] if a.shape[1] > 100 else a.shape[0])
    b = b.to(a.dtype)
    if alpha + beta <= 1:
        s, e = int(n * beta), int(n * (alpha + beta))
        out, src = a.clone(), b
    else:
        s, e = int(n * (alpha + beta - 1)), int(n * beta)
        out, src = b.clone(), a
    if dim == 0:
        out[s:e] = src[s:e]
    else:
        out[:, s:e] = src[:, s:e]
    return out


@pytest.mark.parametrize("calc", ["tensor", "tensor2"])
@pytest.mark.parametrize("alpha,beta", [(0.3, 0.25), (0.5, 0.75), (1.0, 0.0), (0.25, 0.0), (0.6, 0.4), (0.9, 0.9),
                                        (0.0, 0.5)])
@pytest.mark.parametrize("dts", [(torch.float16, torch.float16), (torch.float16, torch.float32),
                                 (torch.float32, torch.bfloat16)], ids=["16-16", "16-32", "32-bf"])
def test_tensor_swap(calc, alpha, beta, dts):
    a = tensor_model(41, dts[0])
    b = tensor_model(42, dts[1])
    b[SD1_POS] = torch.arange(77).flip(0).reshape(1, 77)
    _, state = merge(a, b, calc=calc, alpha=alpha, beta=beta)
    for key in a:
        if selected(key, b):
            assert_same(state[key], tensor_expected(calc, a[key], b[key], alpha, beta), f"{calc} {key}")
        else:
            assert_same(state[key], a[key], key)


def test_tensor2_shape1_rule_on_hand_computed_slices():
    a = tensor_model(43, torch.float32)
    b = tensor_model(44, torch.float32)
    wide = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    _, state = merge(a, b, calc="tensor2", alpha=0.5, beta=0.25)
    # [4, 120]: shape[1] > 100, so columns int(120*0.25)=30 .. int(120*0.75)=90 come from B
    assert torch.equal(state[wide][:, 30:90], b[wide][:, 30:90])
    assert torch.equal(state[wide][:, :30], a[wide][:, :30]) and torch.equal(state[wide][:, 90:], a[wide][:, 90:])
    # [8, 4, 3, 3]: shape[1] <= 100, so the window int(8*0.25)=2 .. int(8*0.75)=6 is taken from shape[0] and
    # applied to dim 1 (which has 4 channels): channels 2..3 from B
    assert torch.equal(state[CONV_IN][:, 2:], b[CONV_IN][:, 2:])
    assert torch.equal(state[CONV_IN][:, :2], a[CONV_IN][:, :2])
    # 0-dim keys are untouched
    zero = UNET + "middle_block.0.skip.weight"
    assert_same(state[zero], a[zero], zero)
    # wrap-around with alpha+beta > 1: B everywhere except [int(8*0.25), int(8*0.75)) = 2..6 (channels 2..3) of A
    _, state = merge(a, b, calc="tensor2", alpha=0.5, beta=0.75)
    assert torch.equal(state[CONV_IN][:, :2], b[CONV_IN][:, :2])
    assert torch.equal(state[CONV_IN][:, 2:], a[CONV_IN][:, 2:])


# self / plus random

SELF_SKIP = ("to_out", "proj_out", "norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("alpha", [0.5, 1.3, -0.7])
def test_self(dtype, alpha):
    a, b, _ = three(dtype)
    _, state = merge(a, b, calc="self", alpha=alpha)
    touched = 0
    for key in a:
        if selected(key, b) and not any(s in key for s in SELF_SKIP):
            assert_rounded(state[key], a[key].double() * alpha, dtype, what=key)
            touched += 1
        else:
            assert_same(state[key], a[key], key)
    assert touched > 5


def test_self_alpha_zero_leaves_everything():
    a, b, _ = three(torch.float16)
    _, state = merge(a, b, calc="self", alpha=0.0)
    for key in a:
        assert_same(state[key], a[key], key)


def _big_model(dtype=torch.float32):
    shapes = dict(SD1_SHAPES)
    shapes[UNET + "input_blocks.1.0.in_layers.2.weight"] = (64, 64)
    return sd1_model(51, dtype, shapes=shapes)


def test_plus_random_seeded_and_plausible():
    a = _big_model()
    b = sd1_model(52, torch.float32, base=a, shapes={k: tuple(v.shape) for k, v in a.items()})
    _, s1 = merge(a, b, calc="plus random", alpha=0.2, seed=123)
    _, s2 = merge(a, b, calc="plus random", alpha=0.2, seed=123)
    _, s3 = merge(a, b, calc="plus random", alpha=0.2, seed=124)
    big = UNET + "input_blocks.1.0.in_layers.2.weight"
    for key in a:
        assert_same(s2[key], s1[key], key)
        if selected(key, b) and not any(s in key for s in SELF_SKIP):
            assert not torch.equal(s1[key], a[key]), key
            assert not torch.equal(s3[key], s1[key]), key
        else:
            assert_same(s1[key], a[key], key)
    noise = (s1[big].double() - a[big].double()) / 0.2
    assert abs(noise.mean().item()) < 0.05
    assert 0.93 < noise.std().item() < 1.07


def test_plus_random_draws_a_seed_and_records_it():
    a = _big_model(torch.float16)
    b = clone_all(a)
    plan, s1 = merge(a, b, calc="plus random", alpha=0.1, seed=-1)
    assert plan.recipe.seed != -1
    _, s2 = merge(a, b, calc="plus random", alpha=0.1, seed=plan.recipe.seed)
    for key in a:
        assert_same(s2[key], s1[key], key)
        assert s1[key].dtype == a[key].dtype


def test_plus_random_alpha_zero_leaves_everything():
    a = _big_model()
    _, state = merge(a, clone_all(a), calc="plus random", alpha=0.0, seed=3)
    for key in a:
        assert_same(state[key], a[key], key)


# ---------------------------------------------------------------------------------------------------------------
# 7. bad input: mode / calc / models


@pytest.mark.parametrize("mode,calc", [("Add difference", "cosineA"), ("Triple sum", "cosineB"),
                                       ("Weight sum", "smoothAdd"), ("Weight sum", "smoothAdd MT"),
                                       ("Triple sum", "tensor"), ("sum Twice", "tensor2"),
                                       ("Add difference", "self"), ("sum Twice", "plus random")])
def test_invalid_mode_calc_pairs(mode, calc):
    a, b, c = three(torch.float16)
    with pytest.raises(MergeError, match="cannot be used with"):
        merge(a, b, c, mode=mode, calc=calc)


def test_unknown_calc_and_mode():
    a, b, c = three(torch.float16)
    with pytest.raises(MergeError, match="Unknown calc mode"):
        merge(a, b, calc="cosineC")
    with pytest.raises(MergeError, match="Unknown merge mode"):
        merge(a, b, mode="Weighted sum")


@pytest.mark.parametrize("calc", ["trainDifference", "extract"])
@pytest.mark.parametrize("mode", ["Weight sum", "Triple sum", "sum Twice"])
def test_train_difference_and_extract_force_add_difference(calc, mode):
    # §2.1 step 4: calcmode trainDifference or extract forces mode "Add"
    a, b, c = three(torch.float16)
    plan, state = merge(a, b, c, mode=mode, calc=calc, alpha=0.5, beta=0.2)
    assert plan.recipe.mode == "Add difference"
    assert plan.recipe.model_c == "C"
    key = UNET + "input_blocks.4.1.proj_in.weight"
    if calc == "trainDifference":
        exp = train_difference_expected(a[key], b[key], c[key], 0.5)
    else:
        exp = extract_expected(a[key], b[key], c[key], 0.5, 0.2, 0.3)
    assert_rounded(state[key], exp, torch.float16, what=key)


@pytest.mark.parametrize("mode", ["Add difference", "Triple sum", "sum Twice"])
def test_missing_model_c(mode):
    a, b, c = three(torch.float16)
    with pytest.raises(MergeError, match="Model C is required"):
        merge(a, b, None, mode=mode)  # no model C named in the recipe
    with pytest.raises(MergeError, match="Model C"):
        merge(a, b, None, mode=mode, model_c="C")  # named, but not supplied


def test_missing_model_b():
    a, _, _ = three(torch.float16)
    with pytest.raises(MergeError, match="Model B"):
        merge(a, None)


def test_sd1_with_sdxl_refused():
    a = sd1_model(1, torch.float16)
    x = xl_model(1, torch.float16)
    with pytest.raises(MergeError, match="SDXL"):
        merge(a, x)
    with pytest.raises(MergeError, match="cannot be merged"):
        merge(x, a)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_alpha_refused(value):
    a, b, _ = three(torch.float16)
    with pytest.raises(MergeError, match="finite"):
        merge(a, b, alpha=float(value))


IMMUTABILITY_CASES = [
    dict(mode="Weight sum", alpha=0.4),
    dict(mode="Add difference", alpha=0.4),
    dict(mode="Triple sum", alpha=0.4, beta=0.3),
    dict(mode="sum Twice", alpha=0.4, beta=0.3),
    dict(calc="cosineA", alpha=0.2),
    dict(calc="tensor", alpha=0.5, beta=0.25),
    dict(calc="tensor2", alpha=0.5, beta=0.75),
    dict(calc="self", alpha=0.5),
    dict(calc="plus random", alpha=0.5, seed=1),
    dict(mode="Add difference", calc="trainDifference", alpha=0.5),
    dict(mode="Add difference", calc="smoothAdd", alpha=0.5),
    dict(mode="Add difference", calc="extract", alpha=0.5, beta=0.5),
    dict(mode="Weight sum", alpha=1.0, adjust="1,1,1,1,1,1,1,1"),
]
def _immutability_params():
    for dtype, name in ((torch.float16, "fp16"), (torch.float32, "fp32")):
        for inpainting in (False, True):
            for kw in IMMUTABILITY_CASES:
                case = "-".join(str(v) for v in kw.values())
                yield pytest.param(kw, dtype, inpainting,
                                   id=f"{name}-{'inpaint' if inpainting else 'plain'}-{case}")


@pytest.mark.parametrize("kw,dtype,inpainting", list(_immutability_params()))
def test_inputs_never_modified(kw, dtype, inpainting):
    a, b, c = three(dtype)
    if inpainting:
        a[CONV_IN] = randn((8, 9, 3, 3), 99, dtype)
    before = [clone_all(m) for m in (a, b, c)]
    uses_c = kw.get("mode", "Weight sum") != "Weight sum"
    _, state = merge(a, b, c if uses_c else None, clone=False, **kw)
    for model, snapshot in zip((a, b, c), before, strict=True):
        assert_unchanged(snapshot, model)
    if inpainting and kw.get("calc", "normal") == "normal":
        assert_same(state[CONV_IN][:, 4:], a[CONV_IN][:, 4:], CONV_IN)


# ---------------------------------------------------------------------------------------------------------------
# rounding: each key is computed in fp32 and rounded once into A's dtype (the project's stated design)

def _rounding_params():
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        for mode in MODES:
            for adjust in ("", "3,-4,5,2,1,1,1,1"):
                yield pytest.param(dtype, mode, adjust,
                                   id=f"{name}-{mode}-{'adjust' if adjust else 'plain'}")


@pytest.mark.parametrize("dtype,mode,adjust", list(_rounding_params()))
def test_rounded_once(dtype, mode, adjust):
    """Within half an ulp (plus a sliver for fp32 working precision) of the exact result: a second rounding
    would show as errors up to a whole ulp."""
    a, b, c = three(dtype)
    uses_c = mode != "Weight sum"
    alpha, beta = 0.37, 0.21
    _, state = merge(a, b, c if uses_c else None, mode=mode, alpha=alpha, beta=beta, adjust=adjust)
    values = [3, -4, 5, 2, 1, 1, 1, 1]
    scale = {UNET + "input_blocks.0.0.weight": 1 - 0.01 * values[0],
             UNET + "input_blocks.0.0.bias": 1 + 0.02 * values[0],
             UNET + "out.0.weight": 1 - 0.01 * values[1],
             UNET + "out.0.bias": 1 + 0.02 * values[1],
             UNET + "out.2.weight": 1 - 0.01 * values[2]}
    for key in a:
        if not selected(key, b, c if uses_c else None) or key == UNET + "out.2.bias":
            continue
        exp = normal_expected(mode, a[key], b[key], c[key] if uses_c else None, alpha, beta)
        if adjust:
            exp = exp * scale.get(key, 1.0)
        assert_rounded(state[key], exp, dtype, ulps=0.52, atol=5e-7, what=f"{mode} {key}")
