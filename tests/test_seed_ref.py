"""Smoke tests of bench/seed_ref.py (the seed's algorithm, re-implemented for benchmarks) on tiny models."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lib_merge.cli import synth

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import seed_ref  # noqa: E402

IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
K_IN04 = "model.diffusion_model.input_blocks.4.1.proj_in.weight"  # block IN04 -> weight index 5
K_OUT11 = "model.diffusion_model.out.2.weight"  # OUT11 -> index 25
K_TIME = "model.diffusion_model.time_embed.0.weight"  # IN00 -> index 1
K_VAE = "first_stage_model.decoder.conv_in.weight"  # BASE
K_TEXT = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"  # BASE
K_MID = "model.diffusion_model.middle_block.1.proj_out.bias"  # M00 -> index 13
W26 = [round(0.02 + i * 0.037, 3) for i in range(26)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("seedref")
    a = synth.make_state_dict("sd1", factor=16, seed=0)
    b = synth.make_state_dict("sd1", factor=16, seed=1, base=a, noise=0.5)
    c = synth.make_state_dict("sd1", factor=16, seed=2, base=a, noise=0.5)
    b["model.extra_only_in_b.weight"] = torch.ones(3, dtype=torch.float16)
    paths = {}
    for name, sd in (("A", a), ("B", b), ("C", c)):
        paths[name] = d / f"{name}.safetensors"
        synth.write_checkpoint(paths[name], sd)
    return paths, a, b, c


def test_block_mapping_sd1():
    assert seed_ref.block_sd1(K_TIME) == "IN00"
    assert seed_ref.block_sd1(K_OUT11) == "OUT11"
    assert seed_ref.block_sd1(K_IN04) == "IN04"
    assert seed_ref.block_sd1(K_MID) == "M00"
    assert seed_ref.block_sd1("model.diffusion_model.output_blocks.7.1.norm.weight") == "OUT07"
    assert seed_ref.block_sd1("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight") == (
        "IN01"
    )
    assert seed_ref.block_sd1(K_VAE) == "BASE" and seed_ref.block_sd1(K_TEXT) == "BASE"


def test_block_mapping_xl_and_conversion():
    assert seed_ref.block_xl("model.diffusion_model.input_blocks.4.1.transformer_blocks.3.attn1.to_q.weight") == "IN04"
    assert seed_ref.block_xl("model.diffusion_model.middle_block.1.transformer_blocks.5.ff.net.2.bias") == "M00"
    assert seed_ref.block_xl("model.diffusion_model.output_blocks.2.2.conv.weight") == "OUT02"
    assert seed_ref.block_xl("model.diffusion_model.label_emb.0.0.weight") == "IN00"
    assert seed_ref.block_xl("conditioner.embedders.1.model.text_projection") is None
    w = seed_ref.parse_weights(list(range(26)), xl=True)
    assert w == [0, *range(1, 10), *range(13, 23), 0]


def test_weight_sum_with_block_weights(models):
    paths, a, b, _ = models
    out = seed_ref.seed_merge(paths["A"], paths["B"], weights=W26)
    for key, idx in ((K_IN04, 5), (K_OUT11, 25), (K_TIME, 1), (K_VAE, 0), (K_TEXT, 0), (K_MID, 13)):
        w = W26[idx]
        expected = ((1 - w) * a[key].double() + w * b[key].double()).half()
        got = out[key]
        assert got.dtype == torch.float16
        # lerp in fp32 then one rounding: within one fp16 ulp of the exact value
        assert torch.allclose(got.double(), expected.double(), rtol=1e-3, atol=1e-6), key
    assert torch.equal(out[IDS], a[IDS])
    assert torch.equal(out["model.extra_only_in_b.weight"], b["model.extra_only_in_b.weight"])  # Stage 2


def test_weight_sum_alpha_one_is_b_and_zero_is_a(models):
    paths, a, b, _ = models
    w = [0.0] * 26
    w[5] = 1.0
    out = seed_ref.seed_merge(paths["A"], paths["B"], weights=w)
    assert torch.equal(out[K_IN04], b[K_IN04])
    assert torch.equal(out[K_OUT11], a[K_OUT11]) and torch.equal(out[K_VAE], a[K_VAE])


def test_add_difference_native_fp16(models):
    paths, a, b, c = models
    alpha = 0.7
    out = seed_ref.seed_merge(paths["A"], paths["B"], paths["C"], mode="Add difference", alpha=alpha)
    for key in (K_IN04, K_VAE, K_MID):
        d = (b[key].float() - c[key].float()).half()  # Stage 0 result, B's dtype
        expected = a[key] + (alpha * d)  # fp16 ops, as the seed does (two roundings)
        assert out[key].dtype == torch.float16
        assert torch.equal(out[key], expected), key
        exact = a[key].double() + alpha * (b[key].double() - c[key].double())
        assert torch.allclose(out[key].double(), exact, rtol=5e-3, atol=1e-4)  # a few fp16 ulps
    # Stage 2 copies B - C for keys A lacks (C lacks it too: zeros)
    assert torch.equal(out["model.extra_only_in_b.weight"], torch.zeros(3, dtype=torch.float16))


def test_train_difference(models):
    paths, a, b, c = models
    alpha = 0.5
    out = seed_ref.seed_merge(paths["A"], paths["B"], paths["C"], calc="trainDifference", alpha=alpha)
    for key in (K_IN04, K_TEXT):
        A, B, C = (x[key].double() for x in (a, b, c))
        den = (B - C).abs() + (B - A).abs()
        new = torch.where(den != 0, (B - C) * (B - A).abs() / den, torch.zeros_like(den))
        expected = A + new * alpha * 1.8
        assert out[key].dtype == torch.float32  # not cast back
        assert torch.allclose(out[key].double(), expected, atol=1e-6), key
    assert torch.equal(out[IDS], a[IDS])


def test_cosine_a(models):
    paths, a, b, _ = models
    out = seed_ref.seed_merge(paths["A"], paths["B"], calc="cosineA", alpha=0.0)
    assert torch.equal(out[K_VAE], a[K_VAE])  # VAE not merged by cosine
    smin, smax = seed_ref.cosine_range(a, b, "cosineA")
    assert smin < smax
    key = K_IN04
    A, B = a[key].double(), b[key].double()
    an = A / A.norm(dim=0, keepdim=True)
    bn = B / B.norm(dim=0, keepdim=True)
    simab = (an * bn).sum(0) / (an.norm(dim=0) * bn.norm(dim=0))
    mag = (an.flatten() @ bn.flatten()) / (an.norm() * bn.norm())
    k = (((simab + mag) / 2 - smin) / (smax - smin)).clamp(0, 1)
    expected = (1 - k) * B + k * A
    assert torch.allclose(out[key].double(), expected, rtol=2e-3, atol=2e-5)
    assert out[key].dtype == torch.float16


def test_smooth_add_on_subset(models):
    from scipy.ndimage import gaussian_filter, median_filter

    paths, a, b, c = models
    alpha = 0.5
    out = seed_ref.seed_merge(
        paths["A"], paths["B"], paths["C"], mode="Add difference", calc="smoothAdd", alpha=alpha, keys=[K_IN04]
    )
    d = (b[K_IN04].float() - c[K_IN04].float()).half().float().numpy()
    f = gaussian_filter(median_filter(d, size=3), sigma=1)
    expected = a[K_IN04].double() + alpha * torch.from_numpy(f.astype(np.float64))
    assert out[K_IN04].dtype == torch.float32
    assert torch.allclose(out[K_IN04].double(), expected, atol=1e-6)
    assert torch.equal(out[K_OUT11], a[K_OUT11])  # outside the subset: A's


def test_inpainting_a_keeps_extra_channels(tmp_path):
    a = synth.make_state_dict("sd1", factor=16, in_channels=9)
    b = synth.make_state_dict("sd1", factor=16, seed=1, base=a, noise=0.5, in_channels=4)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    synth.write_checkpoint(pa, a)
    synth.write_checkpoint(pb, b)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    out = seed_ref.seed_merge(pa, pb, alpha=0.5)
    assert out[key].shape[1] == 9
    assert torch.equal(out[key][:, 4:], a[key][:, 4:])
    expected = ((a[key][:, :4].double() + b[key].double()) / 2).half()
    assert torch.allclose(out[key][:, :4].double(), expected.double(), rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="A must be the inpainting"):
        seed_ref.seed_merge(pb, pa, alpha=0.5)


def test_save_round_trip(models, tmp_path):
    paths, a, _, _ = models
    out = seed_ref.seed_merge(paths["A"], paths["B"], alpha=0.3)
    seed_ref.seed_save(out, tmp_path / "m.safetensors")
    back = load_file(tmp_path / "m.safetensors")
    assert set(back) == set(out) and torch.equal(back[K_IN04], out[K_IN04])
