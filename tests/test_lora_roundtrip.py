"""Round trips between the LoRA tools: extract then bake, rank-r extraction error vs the SVD truncation error
(computed here in float64), merge (concat and SVD) then bake vs baking the LoRAs one by one."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import rand, save_lora, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib_merge.lora.bake import bake_to_file
from lib_merge.lora.blocks import parse_spec
from lib_merge.lora.combine import combine_to_file
from lib_merge.lora.extract import extract_to_file
from lib_merge.lora.formats import LoraError
from lib_merge.lora.lowrank import RankChoice

U = "model.diffusion_model."
Q = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
FF = U + "output_blocks.6.1.transformer_blocks.0.ff.net.2.weight"
PROJ = U + "input_blocks.1.1.proj_in.weight"
TE = "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight"
CONV = U + "input_blocks.1.0.in_layers.2.weight"
Q_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
OUT6_K = "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_attn1_to_v"
OUT6 = U + "output_blocks.6.1.transformer_blocks.0.attn1.to_v.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """B (the base) and A = B + noise everywhere except the VAE."""
    folder = tmp_path_factory.mktemp("pair")
    b = tiny_model(folder / "b.safetensors", "sd1", seed=5)
    state = load_file(b)
    g = torch.Generator().manual_seed(6)
    tuned = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point()
             and not k.startswith("first_stage_model.") else v for k, v in state.items()}
    save_file(tuned, str(folder / "a.safetensors"))
    unet_only = {k: tuned[k] if k.startswith("model.") else v for k, v in state.items()}
    save_file(unet_only, str(folder / "a_unet.safetensors"))
    return folder / "a.safetensors", b, folder / "a_unet.safetensors"


def test_full_rank_extract_then_bake_gives_back_a(pair, tmp_path):
    a, b, _ = pair
    lora = tmp_path / "full.safetensors"
    result = extract_to_file(a, b, lora, rank=RankChoice(100_000), clamp=None, dtype="fp32")
    assert result.text_encoder
    out = tmp_path / "baked.safetensors"
    bake_to_file(b, [parse_spec(f"{lora}:1")], out, metadata=False)
    baked, want, base = load_file(out), load_file(a), load_file(b)
    for key in (Q, FF, PROJ, TE):
        torch.testing.assert_close(baked[key], want[key], rtol=0, atol=2e-6)
    assert torch.equal(baked[CONV], base[CONV])  # 3x3 convs are not extracted without a conv rank


def test_rank_r_error_is_the_truncation_error(pair, tmp_path):
    a, b, _ = pair
    lora = tmp_path / "r4.safetensors"
    extract_to_file(a, b, lora, rank=RankChoice(4), clamp=None, dtype="fp32")
    out = tmp_path / "baked.safetensors"
    bake_to_file(b, [parse_spec(f"{lora}:1")], out, metadata=False)
    baked, want, base = load_file(out), load_file(a), load_file(b)
    for key in (Q, FF, TE):
        diff = want[key].double() - base[key].double()
        s = torch.linalg.svdvals(diff.reshape(diff.shape[0], -1))
        expected = float((s[4:] ** 2).sum())
        got = float(((baked[key].double() - want[key].double()) ** 2).sum())
        assert got == pytest.approx(expected, rel=1e-3), key
    with safe_open(str(lora), "pt") as f:
        meta, names = f.metadata(), list(f.keys())
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_module"] == "networks.lora"
    assert f"{Q_K}.lora_up.weight" in names  # kohya's diffusers naming for SD1


def test_text_encoder_skipped_when_unchanged_and_conv_dims(pair, tmp_path):
    _, b, a_unet = pair
    lora = tmp_path / "unet.safetensors"
    result = extract_to_file(a_unet, b, lora, rank=RankChoice(8), conv_rank=RankChoice(2), dtype="fp32")
    assert not result.text_encoder
    tensors = load_file(lora)
    assert not [k for k in tensors if k.startswith("lora_te")]
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape == (2, 20, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (20, 2, 1, 1)
    assert tensors[f"{conv}.alpha"].item() == 2.0


def test_clamp_bounds_the_factors(pair, tmp_path):
    a, b, _ = pair
    lora = tmp_path / "c.safetensors"
    extract_to_file(a, b, lora, rank=RankChoice(8), clamp=0.9, dtype="fp32")
    t = load_file(lora)
    up, down = t[f"{Q_K}.lora_up.weight"], t[f"{Q_K}.lora_down.weight"]
    # the clamp is symmetric around 0 at the 0.9 quantile of the (unclamped) values: at least 10 % sit on it
    bound = torch.cat([up.flatten(), down.flatten()]).abs().max()
    on_bound = (torch.cat([up.flatten(), down.flatten()]).abs() == bound).float().mean()
    assert on_bound >= 0.09


def _two_loras(tmp_path):
    l1 = {f"{Q_K}.lora_down.weight": rand((4, 40), 1), f"{Q_K}.lora_up.weight": rand((40, 4), 2),
          f"{Q_K}.alpha": torch.tensor(2.0),
          f"{OUT6_K}.lora_down.weight": rand((4, 40), 3), f"{OUT6_K}.lora_up.weight": rand((40, 4), 4)}
    l2 = {f"{Q_K}.lora_down.weight": rand((8, 40), 5), f"{Q_K}.lora_up.weight": rand((40, 8), 6),
          f"{Q_K}.alpha": torch.tensor(1.0)}
    return save_lora(tmp_path / "l1.safetensors", l1), save_lora(tmp_path / "l2.safetensors", l2), l1, l2


@pytest.mark.parametrize("rank", [None, RankChoice(12), RankChoice(None, 1.0)])
def test_merge_then_bake_equals_baking_one_by_one(pair, tmp_path, rank):
    _, b, _ = pair
    p1, p2, l1, l2 = _two_loras(tmp_path)
    specs = [parse_spec(f"{p1}:0.7:OUTD"), parse_spec(f"{p2}:-0.4")]
    merged = tmp_path / "merged.safetensors"
    result = combine_to_file(specs, merged, rank, dtype="fp32")
    if rank is None:  # concat: ranks add up (Q: l1 is zeroed by OUTD, so only l2's 8; OUT06: l1's 4)
        assert result.ranks == [4, 8]
    elif rank.rank:
        assert result.ranks == [12]
    one = tmp_path / "one.safetensors"
    bake_to_file(b, [parse_spec(f"{merged}:1")], one, metadata=False)
    baked, base = load_file(one), load_file(b)
    # by hand: OUTD zeroes IN04 (Q) for l1 and keeps OUT06 (no alpha: scale 1); l2 applies -0.4 everywhere
    d = {k: v.double() for k, v in l1.items()} | {"2" + k: v.double() for k, v in l2.items()}
    q = base[Q].double() - 0.4 / 8 * (d[f"2{Q_K}.lora_up.weight"] @ d[f"2{Q_K}.lora_down.weight"])  # alpha 1, r 8
    out6 = base[OUT6].double() + 0.7 * (d[f"{OUT6_K}.lora_up.weight"] @ d[f"{OUT6_K}.lora_down.weight"])
    torch.testing.assert_close(baked[Q].double(), q, rtol=0, atol=1e-5)
    torch.testing.assert_close(baked[OUT6].double(), out6, rtol=0, atol=1e-5)
    # and the same as baking both LoRAs at once
    both = tmp_path / "both.safetensors"
    bake_to_file(b, specs, both, metadata=False)
    separately = load_file(both)
    for key in (Q, OUT6):
        torch.testing.assert_close(baked[key], separately[key], rtol=0, atol=1e-5)


def test_auto_rank_keeps_the_energy_fraction(tmp_path):
    p1, p2, l1, l2 = _two_loras(tmp_path)
    merged = tmp_path / "auto.safetensors"
    combine_to_file([parse_spec(f"{p1}:1"), parse_spec(f"{p2}:1")], merged, RankChoice(None, 0.9), dtype="fp32")
    t = load_file(merged)
    total = (0.5 * l1[f"{Q_K}.lora_up.weight"].double() @ l1[f"{Q_K}.lora_down.weight"].double()
             + 0.125 * l2[f"{Q_K}.lora_up.weight"].double() @ l2[f"{Q_K}.lora_down.weight"].double())
    s2 = torch.linalg.svdvals(total) ** 2
    kept = torch.cumsum(s2, 0) / s2.sum()
    expected_rank = int((kept < 0.9).sum()) + 1
    assert t[f"{Q_K}.lora_down.weight"].shape[0] == expected_rank
    assert float(t[f"{Q_K}.alpha"]) == expected_rank


def test_concat_refuses_loha_and_merge_refuses_dora(tmp_path):
    loha = {f"{Q_K}.hada_w1_a": rand((40, 2), 1), f"{Q_K}.hada_w1_b": rand((2, 40), 2),
            f"{Q_K}.hada_w2_a": rand((40, 2), 3), f"{Q_K}.hada_w2_b": rand((2, 40), 4)}
    p = save_lora(tmp_path / "loha.safetensors", loha)
    with pytest.raises(LoraError, match="concat merges LoRA/LoCon modules only"):
        combine_to_file([parse_spec(f"{p}:1")], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    combine_to_file([parse_spec(f"{p}:1")], tmp_path / "o.safetensors", RankChoice(4))  # by SVD it works
    dora = {f"{Q_K}.lora_down.weight": rand((2, 40), 5), f"{Q_K}.lora_up.weight": rand((40, 2), 6),
            f"{Q_K}.dora_scale": rand((1, 40), 7)}
    p = save_lora(tmp_path / "dora.safetensors", dora)
    with pytest.raises(LoraError, match="DoRA"):
        combine_to_file([parse_spec(f"{p}:1")], tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()


def test_extract_refuses_a_nan_layer_by_name_and_writes_nothing(pair, tmp_path):
    a, b, _ = pair
    state = load_file(a)
    state[FF] = state[FF].clone()
    state[FF][2, 3] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    out = tmp_path / "e.safetensors"
    with pytest.raises(LoraError, match=r"1·A − 1·B of " + FF.replace(".", r"\.") + " has NaN or infinite values"):
        extract_to_file(bad, b, out, rank=RankChoice(4))
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


@pytest.mark.parametrize("kwargs,message", [
    ({"alpha": float("nan")}, "alpha must be a finite number, not nan"),
    ({"beta": float("inf")}, "beta must be a finite number, not inf"),
    ({"clamp": 0.0}, "clamp quantile must be above 0.5 and at most 1"),  # bound <= 0: every factor crushed
    ({"clamp": 0.5}, "clamp quantile must be above 0.5 and at most 1"),
    ({"clamp": 1.5}, "clamp quantile must be above 0.5 and at most 1"),
    ({"clamp": float("nan")}, "clamp quantile must be above 0.5 and at most 1"),
])
def test_extract_refuses_bad_amounts_before_reading(pair, tmp_path, kwargs, message):
    a, b, _ = pair
    out = tmp_path / "e.safetensors"
    with pytest.raises(LoraError, match=message):
        extract_to_file(a, b, out, rank=RankChoice(4), **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_extract_of_no_change_is_refused_and_a_scaled_copy_is_not(pair, tmp_path):
    """α·A − β·B of the same model twice is zero everywhere: a LoRA of zeros is refused, not written. With β = 0.5
    the change is 0.5·A, exactly rank-limited per layer, and extracting it is fine."""
    _, b, _ = pair
    out = tmp_path / "e.safetensors"
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(b.read_bytes())
    for other in (b, copy):  # the same file (refused before reading), an identical one (after the layers)
        with pytest.raises(LoraError, match=r"1·A − 1·B is zero in every layer .* no change to extract"):
            extract_to_file(b, other, out, rank=RankChoice(4))
    assert not out.exists() and list(tmp_path.iterdir()) == [copy]
    extract_to_file(b, b, out, rank=RankChoice(100_000), beta=0.5, clamp=None, dtype="fp32")
    lora, base = load_file(out), load_file(b)
    up, down = lora[f"{Q_K}.lora_up.weight"].double(), lora[f"{Q_K}.lora_down.weight"].double()
    scale = float(lora[f"{Q_K}.alpha"]) / down.shape[0]
    torch.testing.assert_close(up @ down * scale, 0.5 * base[Q].double(), rtol=0, atol=1e-5)


def test_extract_clamp_of_one_keeps_the_factors_exact(pair, tmp_path):
    a, b, _ = pair
    exact, one = tmp_path / "exact.safetensors", tmp_path / "one.safetensors"
    extract_to_file(a, b, exact, rank=RankChoice(4), clamp=None, dtype="fp32")
    extract_to_file(a, b, one, rank=RankChoice(4), clamp=1.0, dtype="fp32")
    x, y = load_file(exact), load_file(one)
    assert all(torch.equal(x[k], y[k]) for k in x)
