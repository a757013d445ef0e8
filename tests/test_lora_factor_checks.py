"""The cheap paths a bake of plain LoRAs takes: the finiteness check per factor (one fp32 sum for fp16 factors,
min/max for wider dtypes), ΔW's shape read off the factors without the meta device, and the fp32 factors with
ratio·alpha/rank folded into `up` once. Expectations in float64 from the factors, never from the code under test."""

from __future__ import annotations

import math
import re

import pytest
import torch
from lora_helpers import rand, save_lora, tiny_model
from safetensors.torch import load_file

from lib_merge.lora.bake import bake_to_file
from lib_merge.lora.blocks import parse_spec
from lib_merge.lora.formats import LoraError, LoraModule

Q = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"  # [40, 40] at factor 16
Q_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def module(up: torch.Tensor, down: torch.Tensor, **extra: torch.Tensor) -> LoraModule:
    return LoraModule("m", {"up": up, "down": down, **extra})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("part", ["up", "down"])
def test_a_single_non_finite_value_is_refused(dtype, bad, part):
    up, down = rand((8, 2), 1).to(dtype), rand((2, 8), 2).to(dtype)
    (up if part == "up" else down)[1, 1] = bad
    with pytest.raises(LoraError, match=f"NaN or infinite values in {part}"):
        module(up, down).check()


@pytest.mark.parametrize("up_shape,down_shape,named", [
    ((8, 0), (0, 8), "up [8, 0], down [0, 8]"),  # rank 0: no change, and a crash in the fused add before
    ((0, 2), (2, 8), "up [0, 2]"),
    ((8, 2), (2, 0), "down [2, 0]"),
])
def test_empty_factors_are_refused(up_shape, down_shape, named):
    with pytest.raises(LoraError, match=re.escape(f"has empty factors ({named})")):
        module(torch.zeros(up_shape), torch.zeros(down_shape), alpha=torch.tensor(1.0)).check()


@pytest.mark.parametrize("alpha", [torch.zeros(0), torch.tensor([1.0, 2.0])])
def test_an_alpha_that_is_not_one_number_is_refused(alpha):
    with pytest.raises(LoraError, match=f"'s alpha holds {alpha.numel()} values, not one number"):
        module(rand((8, 2), 1), rand((2, 8), 2), alpha=alpha).check()


def test_largest_finite_values_pass():
    """Values whose sum exceeds the dtype's range are still finite: fp16 at 65504 (summed in fp32), fp32 and bf16
    near 3.4e38 (whose sum would overflow: min/max decide)."""
    module(torch.full((64, 4), 65504.0, dtype=torch.float16), torch.full((4, 64), -65504.0, dtype=torch.float16)
           ).check()
    for dtype in (torch.float32, torch.bfloat16):
        big = torch.finfo(dtype).max
        module(torch.full((8, 4), big, dtype=dtype), torch.full((4, 8), -big, dtype=dtype)).check()


@pytest.mark.parametrize("up_shape,down_shape", [
    ((40, 4), (4, 30)),  # Linear
    ((20, 3, 1, 1), (3, 20, 1, 1)),  # 1x1 conv
    ((20, 3, 1, 1), (3, 10, 3, 3)),  # 3x3 LoCon
    ((20, 3), (3, 10, 3, 3)),  # up stored without its 1x1 kernel dims
])
def test_shape_of_the_change_is_the_shape_of_the_product(up_shape, down_shape):
    up, down = rand(up_shape, 3).double(), rand(down_shape, 4).double()
    product = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(up.shape[0], *down.shape[1:])
    assert module(up.float(), down.float()).raw_shape == tuple(product.shape)


def test_shape_with_a_tucker_mid_is_its_einsum():
    up, down, mid = rand((20, 3, 1, 1), 5), rand((3, 10, 1, 1), 6), rand((3, 3, 3, 3), 7)
    expected = torch.einsum("nmkl,on,mi->oikl", mid.double(), up.double()[:, :, 0, 0], down.double()[:, :, 0, 0])
    assert module(up, down, mid=mid).raw_shape == tuple(expected.shape)


@pytest.mark.parametrize("up_shape,down_shape", [((40, 3), (4, 30)), ((20, 2, 1, 1), (3, 10, 3, 3))])
def test_factors_that_do_not_multiply_are_refused(up_shape, down_shape):
    with pytest.raises(LoraError, match="mismatched shapes"):
        _ = module(rand(up_shape, 8), rand(down_shape, 9)).raw_shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_rank_factors_fold_ratio_and_scale_and_leave_the_module_alone(dtype):
    up, down = rand((12, 4), 10).to(dtype), rand((4, 6, 3, 3), 11).to(dtype)
    m = module(up, down, alpha=torch.tensor(3.0))
    kept = {k: v.clone() for k, v in m.parts.items()}
    u, d = m.low_rank_factors(-0.7)
    assert u.dtype == d.dtype == torch.float32
    expected = -0.7 * (3.0 / 4) * (up.double() @ down.double().reshape(4, -1))
    torch.testing.assert_close((u.double() @ d.double()), expected, rtol=1e-6, atol=1e-9)
    m.low_rank_factors(2.0)
    assert all(torch.equal(m.parts[k], v) for k, v in kept.items())


def test_bake_of_fp16_factors_into_an_fp16_model(tmp_path):
    """fp16 model and factors (the usual case): W' = round16(W + Σ ratio·alpha/rank·up@down), sums in float64."""
    model = tiny_model(tmp_path / "m.safetensors", "sd1", dtype=torch.float16, seed=3)
    loras = [{f"{Q_K}.lora_down.weight": rand((4, 40), 20 + i).half(),
              f"{Q_K}.lora_up.weight": rand((40, 4), 30 + i).half(), f"{Q_K}.alpha": torch.tensor(2.0).half()}
             for i in range(2)]
    paths = [save_lora(tmp_path / f"l{i}.safetensors", t) for i, t in enumerate(loras)]
    out = tmp_path / "out.safetensors"
    bake_to_file(model, [parse_spec(f"{paths[0]}:0.8"), parse_spec(f"{paths[1]}:-1.5")], out, metadata=False)
    base, got = load_file(model), load_file(out)
    expected = base[Q].double()
    for lora, ratio in zip(loras, (0.8, -1.5), strict=True):
        expected += ratio * (2.0 / 4) * (lora[f"{Q_K}.lora_up.weight"].double() @
                                         lora[f"{Q_K}.lora_down.weight"].double())
    assert got[Q].dtype == torch.float16
    # one rounding of the fp32 result: within half an fp16 ulp of the float64 value (plus fp32 noise)
    assert ((got[Q].double() - expected).abs() <= expected.abs() * 2 ** -11 + 1e-6).all()
    assert all(torch.equal(got[k], v) for k, v in base.items() if k != Q)
