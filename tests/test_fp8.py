"""fp8 checkpoints (float8_e4m3fn, float8_e5m2): every merge computes them in fp32 and rounds once into the output
dtype; fp8 output is allowed and comes with a warning about its precision.

Expectations are the formulas in float64 from the fp8 inputs' exact values; "rounded once" is checked as "within
half a unit in the last place of the output dtype" (plus the fp32 working precision), which a result rounded to fp8
first and then widened would miss by far.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MemorySource, assert_rounded, merge, sd1_model, selected
from safetensors.torch import load_file

from lib_merge.cli import synth
from lib_merge.cli.main import main
from lib_merge.core.engine import Models, merge_to_dict
from lib_merge.core.recipe import Recipe
from lib_merge.io.checkpoint import SaveOptions, open_checkpoint
from lib_merge.service.pipeline import merge_to_file

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_IDS = ("e4m3fn", "e5m2")
MODES = ("Weight sum", "Add difference", "Triple sum", "sum Twice")
HALF_ULP = 0.5
FP32_SLACK = 1e-6


def expected(mode, a, b, c, alpha, beta):
    a, b = a.double(), b.double()
    if mode == "Weight sum":
        return (1 - alpha) * a + alpha * b
    c = c.double()
    if mode == "Add difference":
        return a + alpha * (b - c)
    if mode == "Triple sum":
        return (1 - alpha - beta) * a + alpha * b + beta * c
    return (1 - beta) * ((1 - alpha) * a + alpha * b) + beta * c


def same_bits(x, y):
    """Equal dtype and bytes (torch has no fp8 comparison kernels)."""
    return x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)) if x.dtype in FP8 else (
        x.dtype == y.dtype and torch.equal(x, y))


def three(dtype, seed=1):
    a = sd1_model(seed, dtype)
    return a, sd1_model(seed + 1, dtype, base=a), sd1_model(seed + 2, dtype, base=a)


@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alpha,beta", [(0.3, 0.25), (0.7, 0.2), (1.4, -0.3)])
def test_fp8_models_merge_in_every_mode(dtype, mode, alpha, beta):
    a, b, c = three(dtype)
    uses_c = mode != "Weight sum"
    _, state = merge(a, b, c if uses_c else None, mode=mode, alpha=alpha, beta=beta)
    merged = 0
    for key in a:
        if selected(key, b, c if uses_c else None):
            exp = expected(mode, a[key], b[key], c[key] if uses_c else None, alpha, beta)
            assert_rounded(state[key], exp, dtype, ulps=HALF_ULP, atol=FP32_SLACK, what=f"{mode} {key}")
            merged += 1
        else:
            assert same_bits(state[key], a[key]), key
    assert merged > 20


@pytest.mark.parametrize("dts", [(torch.float8_e4m3fn, torch.bfloat16), (torch.bfloat16, torch.float8_e5m2),
                                 (torch.float8_e5m2, torch.float8_e4m3fn), (torch.float16, torch.float8_e4m3fn)],
                         ids=["a8-bbf", "abf-b8", "a52-b43", "a16-b8"])
def test_mixed_fp8_and_wider_inputs_give_model_a_dtype(dts):
    a = sd1_model(3, dts[0])
    b = sd1_model(4, dts[1], base=a)
    _, state = merge(a, b, alpha=0.4)
    for key in a:
        if selected(key, b):
            assert_rounded(state[key], expected("Weight sum", a[key], b[key], None, 0.4, 0),
                           dts[0], ulps=HALF_ULP, atol=FP32_SLACK, what=key)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux-dev"])
@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
def test_weight_sum_of_two_fp8_models_in_every_family(family, dtype):
    """The reported crash: a Weight sum of two fp8 models raised from torch.lerp."""
    a = synth.make_state_dict(family, factor=64, dtype=dtype, seed=1)
    b = synth.make_state_dict(family, factor=64, dtype=dtype, seed=2, base=a, noise=0.5)
    models = Models(MemorySource(a, "A"), MemorySource(b, "B"))
    plan, state = merge_to_dict(Recipe("A", "B", alpha=0.3), models)
    assert plan.merged > 10
    for job in plan.jobs:
        if job.kind == "merge":
            assert_rounded(state[job.key], expected("Weight sum", a[job.key], b[job.key], None, 0.3, 0),
                           a[job.key].dtype, ulps=HALF_ULP, atol=FP32_SLACK, what=job.key)


@pytest.mark.parametrize("calc,mode", [("cosineA", "Weight sum"), ("cosineB", "Weight sum"),
                                       ("trainDifference", "Add difference"), ("smoothAdd", "Add difference"),
                                       ("extract", "Add difference"), ("tensor", "Weight sum"),
                                       ("tensor2", "Weight sum"), ("self", "Weight sum"),
                                       ("plus random", "Weight sum")])
def test_other_calc_modes_accept_fp8(calc, mode):
    a, b, c = three(torch.float8_e4m3fn)
    plan, state = merge(a, b, c, mode=mode, calc=calc, alpha=0.4, beta=0.3, seed=5)
    assert plan.merged > 0
    for job in plan.jobs:
        out = state[job.key]
        assert out.dtype == a[job.key].dtype
        if job.kind == "merge":
            assert torch.isfinite(out.float()).all(), job.key


# -- saving ------------------------------------------------------------------------------------------------------


@pytest.fixture
def fp8_files(tmp_path):
    a = synth.make_checkpoint(tmp_path / "a.safetensors", "sd1", factor=16, dtype=torch.float8_e4m3fn, seed=1)
    b = synth.make_checkpoint(tmp_path / "b.safetensors", "sd1", factor=16, dtype=torch.float8_e4m3fn, seed=2,
                              base=a, noise=0.5)
    return a, b


def test_fp8_saved_as_bf16_is_rounded_once_into_bf16(fp8_files, tmp_path):
    a, b = fp8_files
    result = merge_to_file(Recipe(str(a), str(b), alpha=0.3), tmp_path / "out.safetensors",
                           SaveOptions(dtype="bf16"), metadata=False)
    assert result.warnings == ()
    out, ta, tb = (load_file(p) for p in (result.path, a, b))
    checked = 0
    for job in result.plan.jobs:
        if job.kind == "merge":
            exp = expected("Weight sum", ta[job.key], tb[job.key], None, 0.3, 0)
            assert_rounded(out[job.key], exp, torch.bfloat16, ulps=HALF_ULP, atol=FP32_SLACK, what=job.key)
            checked += 1
    assert checked > 100


def test_fp8_output_is_allowed_with_a_precision_warning(fp8_files, tmp_path):
    a, b = fp8_files
    result = merge_to_file(Recipe(str(a), str(b), alpha=0.3), tmp_path / "keep.safetensors", metadata=False)
    assert len(result.warnings) == 1 and "fp8" in result.warnings[0] and "float8_e4m3fn" in result.warnings[0]
    with open_checkpoint(result.path) as out:
        assert {out.dtype(k) for k in out.keys() if "model" in k and out.dtype(k).is_floating_point} == {
            torch.float8_e4m3fn}


def test_save_dtype_fp8_from_wider_models_warns(tmp_path):
    a = synth.make_checkpoint(tmp_path / "a.safetensors", "sd1", factor=16, dtype=torch.bfloat16, seed=1)
    b = synth.make_checkpoint(tmp_path / "b.safetensors", "sd1", factor=16, dtype=torch.bfloat16, seed=2,
                              base=a, noise=0.5)
    result = merge_to_file(Recipe(str(a), str(b), alpha=0.6), tmp_path / "o.safetensors",
                           SaveOptions(dtype="fp8_e5m2"), metadata=False)
    assert "float8_e5m2" in result.warnings[0]
    out, ta, tb = (load_file(p) for p in (result.path, a, b))
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert_rounded(out[key], expected("Weight sum", ta[key], tb[key], None, 0.6, 0), torch.float8_e5m2,
                   ulps=HALF_ULP, atol=FP32_SLACK, what=key)
    ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert out[ids].dtype == torch.int64 and torch.equal(out[ids], ta[ids])  # integer keys keep their dtype


def test_cli_prints_the_fp8_warning(fp8_files, tmp_path, capsys):
    a, b = fp8_files
    code = main(["merge", "--model-a", str(a), "--model-b", str(b), "--output", str(tmp_path / "o.safetensors"),
                 "--no-history", "--no-metadata", "--quiet"])
    assert code == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "fp8" in err and "bf16" in err
