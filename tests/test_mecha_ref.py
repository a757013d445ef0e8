"""bench/mecha_ref.py against hand-written formulas on tiny models (skipped when sd-mecha is not installed)."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lib_merge.cli import synth

pytest.importorskip("sd_mecha")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import mecha_ref  # noqa: E402
import seed_ref  # noqa: E402

W26 = [round(0.02 + i * 0.037, 3) for i in range(26)]
K_IN04 = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
K_TIME = "model.diffusion_model.time_embed.0.weight"
K_VAE = "first_stage_model.decoder.conv_in.weight"
IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """fp16 spacing at each element's magnitude (fixed 2^-24 in the subnormal range below 2^-14)."""
    mag = t.double().abs().clamp_min(2.0**-14)
    return torch.exp2(torch.floor(torch.log2(mag)) - 10)


def _ulps(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """Largest |x - y| in fp16 units in the last place, measured at ``scale`` (default: the larger of x and y)."""
    if scale is None:
        scale = torch.maximum(x.double().abs(), y.double().abs())
    return float(((x.double() - y.double()).abs() / _ulp(scale)).max())


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("mecha")
    a = synth.make_state_dict("sd1", factor=16, seed=0)
    b = synth.make_state_dict("sd1", factor=16, seed=1, base=a, noise=0.5)
    c = synth.make_state_dict("sd1", factor=16, seed=2, base=a, noise=0.5)
    paths = []
    for name, sd in (("A", a), ("B", b), ("C", c)):
        paths.append(d / f"{name}.safetensors")
        synth.write_checkpoint(paths[-1], sd)
    return paths, a, b, c


def test_weight_sum_seed_mapping_equals_lerp(sd1):
    (pa, pb, _), a, b, _ = sd1
    out = mecha_ref.weight_sum(pa, pb, weights=W26, mapping="seed")
    assert set(out) == set(a)
    for key in a:
        if not a[key].is_floating_point():
            continue
        w = W26[seed_ref.BLOCKS_26.index(seed_ref.block_sd1(key))]
        assert torch.equal(out[key], torch.lerp(a[key].float(), b[key].float(), w).half()), key
    # sd-mecha casts every output tensor to the output dtype, int64 position_ids included
    assert out[IDS].dtype == torch.float16 and torch.equal(out[IDS].long(), a[IDS])


def test_weight_sum_mecha_mapping_puts_time_embed_in_base(sd1):
    (pa, pb, _), a, b, _ = sd1
    out = mecha_ref.weight_sum(pa, pb, weights=W26, mapping="mecha")
    assert torch.equal(out[K_TIME], torch.lerp(a[K_TIME].float(), b[K_TIME].float(), W26[0]).half())  # BASE
    assert torch.equal(out[K_IN04], torch.lerp(a[K_IN04].float(), b[K_IN04].float(), W26[5]).half())


def test_add_difference_is_fp32_once_rounded(sd1, tmp_path):
    (pa, pb, pc), a, b, c = sd1
    out_path = tmp_path / "ad.safetensors"
    mecha_ref.add_difference(pa, pb, pc, alpha=0.7, output=out_path)
    out = load_file(out_path)
    for key in (K_IN04, K_VAE):
        exact = (a[key].double() + 0.7 * (b[key].double() - c[key].double())).half()
        assert _ulps(out[key], exact) <= 1, key
        seed_like = a[key] + 0.7 * (b[key].float() - c[key].float()).half()  # the seed: fp16 D, fp16 ops
        # the seed rounds D and alpha*D to fp16 first: the error scales with the operands, not the result
        operands = a[key].double().abs() + 0.7 * (b[key].double() - c[key].double()).abs()
        assert _ulps(out[key], seed_like, operands) <= 2, key


def test_train_difference_matches_seed(sd1):
    (pa, pb, pc), a, b, c = sd1
    out = mecha_ref.train_difference(pa, pb, pc, alpha=0.5, output_dtype=torch.float32)
    for key in (K_IN04, K_TIME, K_VAE):
        A, B, C = (x[key].double() for x in (a, b, c))
        den = (B - C).abs() + (B - A).abs()
        expected = A + torch.where(den != 0, (B - C) * (B - A).abs() / den, torch.zeros_like(den)) * 0.9
        assert torch.allclose(out[key].double(), expected, atol=1e-6), key


def test_cosine_runs_but_is_not_the_seeds(sd1):
    (pa, pb, _), a, b, _ = sd1
    out = mecha_ref.cosine(pa, pb, alpha=0.0, variant="a")
    assert not torch.equal(out[K_VAE], a[K_VAE])  # sd-mecha merges the VAE; the seed's cosine keeps A's


def test_sdxl_three_model_add_difference(tmp_path):
    a = synth.make_state_dict("sdxl", factor=16, seed=0)
    b = synth.make_state_dict("sdxl", factor=16, seed=1, base=a, noise=0.5)
    c = synth.make_state_dict("sdxl", factor=16, seed=2, base=a, noise=0.5)
    paths = []
    for name, sd in (("A", a), ("B", b), ("C", c)):
        paths.append(tmp_path / f"{name}.safetensors")
        synth.write_checkpoint(paths[-1], sd)
    out = mecha_ref.add_difference_sdxl(*paths, alpha=0.5)
    assert set(out) == set(a)
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    exact = (a[key].double() + 0.5 * (b[key].double() - c[key].double())).half()
    assert _ulps(out[key], exact) <= 1


def test_sum_twice_equals_seed_formula(sd1):
    (pa, pb, pc), a, b, c = sd1
    out = mecha_ref.sum_twice(pa, pb, pc, alpha=0.3, beta=0.6)
    for key in (K_IN04, K_VAE):
        expected = torch.lerp(torch.lerp(a[key].float(), b[key].float(), 0.3), c[key].float(), 0.6).half()
        assert torch.equal(out[key], expected), key


def test_triple_sum_within_fp16_rounding(sd1):
    (pa, pb, pc), a, b, c = sd1
    out = mecha_ref.triple_sum(pa, pb, pc, alpha=0.3, beta=0.2)
    for key in (K_IN04, K_VAE):
        A, B, C = (x[key].double() for x in (a, b, c))
        exact = (0.5 * A + 0.3 * B + 0.2 * C).half()
        assert _ulps(out[key], exact) <= 1, key
