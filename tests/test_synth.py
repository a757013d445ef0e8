import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_merge.cli import synth

DATA = Path(synth.__file__).resolve().parent.parent / "data"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def _raw_layout(name):
    data = json.loads((DATA / f"{name}.json").read_text())
    return {k: v for comp in data["components"].values() for k, v in comp.items()}, data["parameters"]


@pytest.mark.parametrize("family,name", [("sd1", "sd1-ldm"), ("sdxl", "sdxl-sgm")])
def test_layout_matches_file(family, name):
    raw, params = _raw_layout(name)
    layout = synth.load_layout(family)
    assert list(layout) == list(raw)
    for key, (shape, dtype) in layout.items():
        assert list(shape) == raw[key]["shape"]
        assert dtype == {"float32": torch.float32, "int64": torch.int64}[raw[key]["dtype"]]
    total = 0
    for shape, _ in layout.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    assert total == params


def test_scaled_shape_rule():
    assert synth.scaled_shape((320, 4, 3, 3), 8) == (40, 4, 3, 3)
    assert synth.scaled_shape((49408, 768), 16) == (3088, 48)
    assert synth.scaled_shape((77, 768), 8) == (77, 96)
    assert synth.scaled_shape((1, 77), 16) == (1, 77)
    assert synth.scaled_shape((8, 8, 1, 1), 16) == (8, 8, 1, 1)
    assert synth.scaled_shape((), 8) == ()
    assert synth.scaled_shape((1280, 2816), 1) == (1280, 2816)
    with pytest.raises(ValueError):
        synth.scaled_shape((320,), 0)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_state_dict_keys_and_dtypes(family):
    layout = synth.load_layout(family)
    sd = synth.make_state_dict(family, factor=16)
    assert list(sd) == list(layout)
    for key, t in sd.items():
        shape, stored = layout[key]
        assert tuple(t.shape) == synth.scaled_shape(shape, 16), key
        if not stored.is_floating_point:
            assert t.dtype == torch.int64
        elif "model" not in key:
            assert t.dtype == torch.float32, key  # schedule / EDM buffers stay fp32
        else:
            assert t.dtype == torch.float16, key
    # a few MB, as tiny test models should be
    assert sum(t.numel() * t.element_size() for t in sd.values()) < 40e6


def test_value_kinds():
    sd = synth.make_state_dict("sd1", factor=8, dtype=torch.float32)
    ids = sd["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert torch.equal(ids, torch.arange(77).reshape(1, 77))
    norm = sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    assert abs(norm.mean().item() - 1) < 0.01
    w = sd["model.diffusion_model.middle_block.1.proj_in.weight"]
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    b = sd["model.diffusion_model.middle_block.1.proj_in.bias"]
    assert b.abs().max().item() < 0.1
    xl = synth.make_state_dict("sdxl", factor=16, dtype=torch.float16)
    assert xl["conditioner.embedders.1.model.logit_scale"].item() == pytest.approx(4.6052, abs=1e-2)


def test_deterministic_and_seeded():
    a1 = synth.make_state_dict("sd1", factor=16, seed=3)
    a2 = synth.make_state_dict("sd1", factor=16, seed=3)
    other = synth.make_state_dict("sd1", factor=16, seed=4)
    assert all(torch.equal(a1[k], a2[k]) for k in a1)
    k = "model.diffusion_model.out.2.weight"
    assert not torch.equal(a1[k], other[k])


def test_base_plus_noise_is_close():
    a = synth.make_state_dict("sd1", factor=16, dtype=torch.float32)
    b = synth.make_state_dict("sd1", factor=16, dtype=torch.float32, seed=1, base=a, noise=0.1)
    k = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    d = b[k] - a[k]
    assert 0.0015 < d.std().item() < 0.0025  # 0.1 * 0.02
    assert not torch.equal(a[k], b[k])
    ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert torch.equal(a[ids], b[ids])
    same = synth.make_state_dict("sd1", factor=16, dtype=torch.float32, seed=1, base=a, noise=0.0)
    assert all(torch.equal(a[k], same[k]) for k in a)
    # fp16 output of a fp32 base: one rounding of (base + noise) per key
    h = synth.make_state_dict("sd1", factor=16, dtype=torch.float16, seed=1, base=a, noise=0.1)
    assert torch.equal(h[k], b[k].half())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("channels", [9, 8])
def test_in_channels(family, channels):
    sd = synth.make_state_dict(family, factor=16, in_channels=channels)
    assert sd[CONV_IN].shape == (20, channels, 3, 3)
    assert synth.layout_shapes(family, 16, in_channels=channels)[CONV_IN][0] == (20, channels, 3, 3)
    # a normal model derived from an inpainting base shares its first four channels
    normal = synth.make_state_dict(family, factor=16, seed=1, base=sd, noise=0.0, in_channels=4)
    assert torch.equal(normal[CONV_IN], sd[CONV_IN][:, :4])


def test_streamed_file_equals_in_memory(tmp_path):
    a = synth.make_state_dict("sdxl", factor=16)
    pa = tmp_path / "a.safetensors"
    synth.write_checkpoint(pa, a)
    pb = synth.make_checkpoint(
        tmp_path / "b.safetensors", "sdxl", factor=16, seed=1, base=pa, noise=0.2, metadata={"note": "synthetic"}
    )
    b = synth.make_state_dict("sdxl", factor=16, seed=1, base=a, noise=0.2)
    loaded = load_file(pb)
    assert set(loaded) == set(b)
    for k in b:
        assert loaded[k].dtype == b[k].dtype and torch.equal(loaded[k], b[k]), k
    with safe_open(str(pb), framework="pt") as f:
        assert f.metadata() == {"note": "synthetic"}
    pa2 = synth.make_checkpoint(tmp_path / "a2.safetensors", "sdxl", factor=16)
    assert pa2.read_bytes() and all(torch.equal(v, a[k]) for k, v in load_file(pa2).items())
    assert not list(tmp_path.glob("*.tmp"))
