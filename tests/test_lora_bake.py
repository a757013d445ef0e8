"""Baking LoRAs into a checkpoint: every module type's ΔW computed here in float64 from hand-made factors
(seed-lora-analysis.md §1.3/§1.4), block weights expanded by hand (§2.1), against the baked file."""

from __future__ import annotations

import threading

import pytest
import torch
from lora_helpers import rand, save_lora, tiny_model
from safetensors.torch import load_file

from lib_merge.core.errors import MergeError
from lib_merge.lora.bake import bake_to_file
from lib_merge.lora.blocks import LoraSpec, load_presets, parse_spec

U = "model.diffusion_model."
Q = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"  # Linear [40, 40]
CONV = U + "input_blocks.1.0.in_layers.2.weight"  # 3x3 [20, 20, 3, 3]
PROJ = U + "input_blocks.1.1.proj_in.weight"  # 1x1 conv [20, 20, 1, 1]
OUT6 = U + "output_blocks.6.1.transformer_blocks.0.attn1.to_v.weight"  # Linear [40, 40]
Q_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
CONV_K = "lora_unet_down_blocks_0_resnets_0_conv1"
PROJ_K = "lora_unet_down_blocks_0_attentions_0_proj_in"
OUT6_K = "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_attn1_to_v"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bake")
    return tiny_model(folder / "sd1.safetensors", "sd1", seed=1)


@pytest.fixture(scope="module")
def base(sd1):
    return {k: v.double() if v.is_floating_point() else v for k, v in load_file(sd1).items()}


def bake(model, tmp_path, loras, **kw):
    """loras: list of (tensors, spec suffix) -> the baked state dict."""
    specs = []
    for i, (tensors, suffix) in enumerate(loras):
        path = save_lora(tmp_path / f"l{i}.safetensors", tensors)
        specs.append(parse_spec(f"{path}{suffix}"))
    out = tmp_path / "out.safetensors"
    bake_to_file(model, specs, out, metadata=False, **kw)
    return load_file(out)


def close(got, expected):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def unchanged_except(out, base, changed):
    for k, v in out.items():
        if k not in changed:
            assert torch.equal(v, base[k].to(v.dtype)), k


def test_linear_lora_with_alpha_and_ratio(sd1, base, tmp_path):
    down, up = rand((4, 40), 1), rand((40, 4), 2)
    out = bake(sd1, tmp_path, [({f"{Q_K}.lora_down.weight": down, f"{Q_K}.lora_up.weight": up,
                                 f"{Q_K}.alpha": torch.tensor(2.0)}, ":0.7")])
    close(out[Q], base[Q] + 0.7 * (2.0 / 4) * (up.double() @ down.double()))
    unchanged_except(out, base, {Q})


def test_locon_3x3_and_1x1_conv(sd1, base, tmp_path):
    down, up = rand((3, 20, 3, 3), 3), rand((20, 3, 1, 1), 4)
    pd, pu = rand((2, 20, 1, 1), 5), rand((20, 2, 1, 1), 6)
    out = bake(sd1, tmp_path, [({f"{CONV_K}.lora_down.weight": down, f"{CONV_K}.lora_up.weight": up,
                                 f"{PROJ_K}.lora_down.weight": pd, f"{PROJ_K}.lora_up.weight": pu}, ":1")])
    expected = torch.einsum("or,rikl->oikl", up.double()[:, :, 0, 0], down.double())
    close(out[CONV], base[CONV] + expected)  # no alpha: scale 1
    close(out[PROJ], base[PROJ] + (pu.double()[:, :, 0, 0] @ pd.double()[:, :, 0, 0])[:, :, None, None])
    unchanged_except(out, base, {CONV, PROJ})


def test_linear_factors_on_a_1x1_conv_weight(sd1, base, tmp_path):
    pd, pu = rand((2, 20), 7), rand((20, 2), 8)
    out = bake(sd1, tmp_path, [({f"{PROJ_K}.lora_down.weight": pd, f"{PROJ_K}.lora_up.weight": pu}, ":-0.5")])
    close(out[PROJ], base[PROJ] - 0.5 * (pu.double() @ pd.double())[:, :, None, None])


def test_tucker_locon(sd1, base, tmp_path):
    down, mid, up = rand((3, 20, 1, 1), 9), rand((3, 3, 3, 3), 10), rand((20, 3, 1, 1), 11)
    out = bake(sd1, tmp_path, [({f"{CONV_K}.lora_down.weight": down, f"{CONV_K}.lora_mid.weight": mid,
                                 f"{CONV_K}.lora_up.weight": up, f"{CONV_K}.alpha": torch.tensor(1.5)}, ":0.8")])
    d, m, u = down.double()[:, :, 0, 0], mid.double(), up.double()[:, :, 0, 0]
    expected = torch.zeros(20, 20, 3, 3, dtype=torch.float64)
    for n in range(3):
        for k in range(3):
            expected += m[n, k][None, None] * (u[:, n][:, None] * d[k][None, :])[:, :, None, None]
    close(out[CONV], base[CONV] + 0.8 * (1.5 / 3) * expected)


def test_loha_linear_and_tucker_conv(sd1, base, tmp_path):
    linear = (("hada_w1_a", (40, 4)), ("hada_w1_b", (4, 40)), ("hada_w2_a", (40, 4)), ("hada_w2_b", (4, 40)))
    conv = (("hada_t1", (2, 2, 3, 3)), ("hada_w1_a", (2, 20)), ("hada_w1_b", (2, 20)),
            ("hada_t2", (2, 2, 3, 3)), ("hada_w2_a", (2, 20)), ("hada_w2_b", (2, 20)))
    w = {n: rand(s, 20 + i) for i, (n, s) in enumerate(linear)}
    t = {n: rand(s, 30 + i) for i, (n, s) in enumerate(conv)}
    tensors = {f"{Q_K}.{n}": v for n, v in w.items()} | {f"{Q_K}.alpha": torch.tensor(8.0)}
    tensors |= {f"{CONV_K}.{n}": v for n, v in t.items()}
    out = bake(sd1, tmp_path, [(tensors, ":0.5")])
    d = {n: v.double() for n, v in w.items()}
    close(out[Q], base[Q] + 0.5 * 2.0 * (d["hada_w1_a"] @ d["hada_w1_b"]) * (d["hada_w2_a"] @ d["hada_w2_b"]))

    def cp(tt, wa, wb):  # out[p, r, k, l] = Σ_ij t[i, j, k, l] wa[i, p] wb[j, r]
        tt, wa, wb = tt.double(), wa.double(), wb.double()
        res = torch.zeros(wa.shape[1], wb.shape[1], *tt.shape[2:], dtype=torch.float64)
        for i in range(tt.shape[0]):
            for j in range(tt.shape[1]):
                res += tt[i, j][None, None] * (wa[i][:, None] * wb[j][None, :])[:, :, None, None]
        return res

    expected = cp(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * cp(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    close(out[CONV], base[CONV] + 0.5 * expected)  # no alpha: scale 1


def test_lokr_full_and_factorized(sd1, base, tmp_path):
    w1, w2a, w2b = rand((4, 5), 40), rand((10, 2), 41), rand((2, 8), 42)
    w1_conv, w2_conv = rand((4, 4), 43), rand((5, 5, 3, 3), 44)
    tensors = {f"{Q_K}.lokr_w1": w1, f"{Q_K}.lokr_w2_a": w2a, f"{Q_K}.lokr_w2_b": w2b,
               f"{Q_K}.alpha": torch.tensor(1.0),
               f"{CONV_K}.lokr_w1": w1_conv, f"{CONV_K}.lokr_w2": w2_conv, f"{CONV_K}.alpha": torch.tensor(7.0)}
    out = bake(sd1, tmp_path, [(tensors, ":1")])
    w2 = w2a.double() @ w2b.double()  # [10, 8]; kron([4,5],[10,8]) = [40, 40]
    kron = torch.zeros(40, 40, dtype=torch.float64)
    for i in range(4):
        for j in range(5):
            kron[i * 10:(i + 1) * 10, j * 8:(j + 1) * 8] = w1.double()[i, j] * w2
    close(out[Q], base[Q] + (1.0 / 2) * kron)  # low-rank w2: scale alpha / rank(w2_b) = 1/2
    kc = torch.zeros(20, 20, 3, 3, dtype=torch.float64)
    for i in range(4):
        for j in range(4):
            kc[i * 5:(i + 1) * 5, j * 5:(j + 1) * 5] = w1_conv.double()[i, j] * w2_conv.double()
    close(out[CONV], base[CONV] + kc)  # no low-rank factor: scale 1 although alpha is stored


def test_ia3_on_output_and_input(sd1, base, tmp_path):
    wo, wi = rand((40,), 50), rand((40,), 51)
    out = bake(sd1, tmp_path, [({f"{Q_K}.weight": wo, f"{Q_K}.on_input": torch.tensor(0),
                                 f"{OUT6_K}.weight": wi, f"{OUT6_K}.on_input": torch.tensor(1)}, ":0.6")])
    close(out[Q], base[Q] + 0.6 * base[Q] * wo.double()[:, None])
    close(out[OUT6], base[OUT6] + 0.6 * base[OUT6] * wi.double()[None, :])


@pytest.mark.parametrize("orientation", ["columns", "rows"])
def test_dora(sd1, base, tmp_path, orientation):
    down, up = rand((4, 40), 60), rand((40, 4), 61)
    if orientation == "columns":  # the WebUI's [1, in]
        m = rand((1, 40), 62).abs() + 0.5
    else:  # LyCORIS wd_on_out [out, 1]
        m = rand((40, 1), 62).abs() + 0.5
    out = bake(sd1, tmp_path, [({f"{Q_K}.lora_down.weight": down, f"{Q_K}.lora_up.weight": up,
                                 f"{Q_K}.alpha": torch.tensor(4.0), f"{Q_K}.dora_scale": m}, ":0.9")])
    w1 = base[Q] + up.double() @ down.double()
    norm = w1.norm(dim=0, keepdim=True) if orientation == "columns" else w1.norm(dim=1, keepdim=True)
    close(out[Q], base[Q] + 0.9 * (w1 * m.double() / norm - base[Q]))


def test_full_diff_with_bias(sd1, base, tmp_path):
    diff, diff_b = rand((40, 40), 70), rand((40,), 71)
    key = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0"
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    out = bake(sd1, tmp_path, [({f"{name}.diff": diff, f"{name}.diff_b": diff_b}, ":0.25")])
    close(out[key + ".weight"], base[key + ".weight"] + 0.25 * diff.double())
    close(out[key + ".bias"], base[key + ".bias"] + 0.25 * diff_b.double())
    unchanged_except(out, base, {key + ".weight", key + ".bias"})


def test_peft_naming_and_two_loras_sum(sd1, base, tmp_path):
    a, b = rand((2, 40), 80), rand((40, 2), 81)
    down, up = rand((3, 40), 82), rand((40, 3), 83)
    peft = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": b}
    out = bake(sd1, tmp_path, [(peft, ":0.5"),
                               ({f"{Q_K}.lora_down.weight": down, f"{Q_K}.lora_up.weight": up}, ":2")])
    close(out[Q], base[Q] + 0.5 * b.double() @ a.double() + 2 * up.double() @ down.double())


@pytest.mark.parametrize("kernel_copy", ["copy_file_range", "refused (EXDEV)", "absent"])
def test_untouched_keys_are_copied_byte_for_byte_however_the_kernel_copies(sd1, base, tmp_path, monkeypatch,
                                                                           kernel_copy):
    """Keys no LoRA touches go file to file (os.copy_file_range); where the kernel refuses it between two files, or
    the platform has none, they are read and written instead: the output is the same either way."""
    import errno
    import os

    if kernel_copy == "refused (EXDEV)":
        def refuse(*args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    elif kernel_copy == "absent":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    down, up = rand((4, 40), 1), rand((40, 4), 2)
    out = bake(sd1, tmp_path, [({f"{Q_K}.lora_down.weight": down, f"{Q_K}.lora_up.weight": up}, ":0.5")],
               overwrite=True)
    assert sorted(out) == sorted(base)
    close(out[Q], base[Q] + 0.5 * (up.double() @ down.double()))
    unchanged_except(out, base, {Q})


def test_block_weights_preset_and_values(sd1, base, tmp_path):
    """OUTD (17 values: BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03..OUT11) keeps BASE and OUT03..OUT06."""
    d1, u1, d2, u2 = rand((2, 40), 90), rand((40, 2), 91), rand((2, 40), 92), rand((40, 2), 93)
    tensors = {f"{Q_K}.lora_down.weight": d1, f"{Q_K}.lora_up.weight": u1,
               f"{OUT6_K}.lora_down.weight": d2, f"{OUT6_K}.lora_up.weight": u2}
    out = bake(sd1, tmp_path, [(tensors, ":0.5:OUTD")])
    assert torch.equal(out[Q], base[Q].float())  # IN04 is 0 in OUTD
    close(out[OUT6], base[OUT6] + 0.5 * u2.double() @ d2.double())
    # 26 values: IN04 = 0.3, OUT06 = 0.1, times the ratio 2 (the seed ignores the ratio here: its #463)
    values = ["0"] * 26
    values[1 + 4], values[14 + 6] = "0.3", "0.1"
    out = bake(sd1, tmp_path / "..", [(tensors, ":2:" + ",".join(values))], overwrite=True)
    close(out[Q], base[Q] + 0.6 * u1.double() @ d1.double())
    close(out[OUT6], base[OUT6] + 0.2 * u2.double() @ d2.double())


def test_openclip_q_k_v_rows_sd2(tmp_path):
    """SD2's text encoder: the k delta lands in rows [64:128] of in_proj_weight only (the seed drops it)."""
    model = tiny_model(tmp_path / "sd2.safetensors", "sd2", seed=3)
    base = load_file(model)
    down, up = rand((2, 64), 100), rand((64, 2), 101)
    name = "lora_te_text_model_encoder_layers_5_self_attn_k_proj"
    out = bake(model, tmp_path, [({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}, ":1")])
    key = "cond_stage_model.model.transformer.resblocks.5.attn.in_proj_weight"
    expected = base[key].double().clone()
    expected[64:128] += up.double() @ down.double()
    close(out[key], expected)
    unchanged_except(out, {k: v for k, v in base.items()}, {key})


def test_sdxl_te2_rows_and_fp16_rounded_once(tmp_path):
    model = tiny_model(tmp_path / "xl.safetensors", "sdxl", factor=32, dtype=torch.float16, seed=4)
    base = load_file(model)
    down, up = rand((2, 40), 110), rand((40, 2), 111)
    name = "lora_te2_text_model_encoder_layers_0_self_attn_v_proj"
    out = bake(model, tmp_path, [({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}, ":0.5")])
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert out[key].dtype == torch.float16
    expected = base[key].double().clone()
    expected[80:120] += 0.5 * up.double() @ down.double()
    # one rounding of the fp32 result: within half an fp16 ulp of the exact value (plus fp32 noise)
    ulp = torch.finfo(torch.float16).eps * expected.abs().clamp_min(2 ** -14)
    assert ((out[key].double() - expected).abs() <= ulp / 2 + 1e-7).all()
    assert torch.equal(out[key][:80], base[key][:80])


def test_unmatched_modules_are_reported(sd1, tmp_path):
    down, up = rand((2, 40), 120), rand((40, 2), 121)
    tensors = {f"{Q_K}.lora_down.weight": down, f"{Q_K}.lora_up.weight": up,
               "lora_unet_nonexistent_layer.lora_down.weight": down,
               "lora_unet_nonexistent_layer.lora_up.weight": up}
    path = save_lora(tmp_path / "l.safetensors", tensors)
    result = bake_to_file(sd1, [parse_spec(f"{path}:1")], tmp_path / "o.safetensors", metadata=False)
    use = result.plan.uses[0]
    assert use.applied == 1 and use.unmatched == ["lora_unet_nonexistent_layer"]
    assert "lora_unet_nonexistent_layer" in use.summary()


def test_specs_and_presets(tmp_path):
    assert parse_spec("a.safetensors") == LoraSpec("a.safetensors", 1.0, "")
    assert parse_spec("C:\\x\\a.safetensors:0.5:OUTD") == LoraSpec("C:\\x\\a.safetensors", 0.5, "OUTD")
    user = tmp_path / "presets.txt"
    user.write_text("# comment:1,1\nMINE:" + ",".join(["0.5"] * 12) + "\nBAD:1,2,3\nOUTD:" + ",".join(["1"] * 20))
    presets = load_presets(user)
    slots = LoraSpec("x", 2.0, "MINE").slot_ratios(presets)
    assert slots["IN04"] == 1.0 and slots["OUT05"] == 1.0 and slots["OUT06"] == 0.0 and slots["IN01"] == 0.0
    assert presets.get("BAD") is None and presets.get("# comment") is None
    assert LoraSpec("x", 1.0, "OUTD").slot_ratios(presets)["OUT08"] == 1.0  # the user file wins
    assert LoraSpec("x", 1.0, "OUTD").slot_ratios(load_presets())["OUT06"] == 1.0  # shipped 17-value OUTD
    assert LoraSpec("x", 1.0, "OUTD").slot_ratios(load_presets())["OUT07"] == 0.0


@pytest.mark.parametrize("spec,message", [
    ("x:abc", "'abc' is not a number"),
    ("x:1:NOPE", "unknown block-weight preset 'NOPE'"),
    ("x:1:" + ",".join(["1"] * 18), "18 block weights given"),
])
def test_bad_specs_refused(spec, message, tmp_path):
    with pytest.raises(MergeError, match=message):
        parse_spec(spec).slot_ratios(load_presets())


@pytest.mark.parametrize("default", [2, 8])
def test_the_bakes_workers_share_torchs_threads_and_leave_the_callers(sd1, base, tmp_path, monkeypatch, default):
    """Two workers bake the touched keys, each with half of torch's threads (so a busy two-core machine runs two
    one-thread multiplies, not two-thread teams that wait for each other); the caller's count and the count new
    threads start from are unchanged after the bake; the values are those of the float64 formula."""
    from lib_merge.core.intraop import new_thread_default
    from lib_merge.io.output import FileSink

    seen: dict[str, tuple[str, int]] = {}
    real_put = FileSink.put

    def recording_put(self, key, tensor):
        seen[key] = (threading.current_thread().name, torch.get_num_threads())
        return real_put(self, key, tensor)

    monkeypatch.setattr(FileSink, "put", recording_put)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    before = torch.get_num_threads()
    torch.set_num_threads(default)
    try:
        up, down = rand((base[Q].shape[0], 4), 1), rand((4, base[Q].shape[1]), 2)
        out = bake(sd1, tmp_path, [({f"{Q_K}.lora_up.weight": up, f"{Q_K}.lora_down.weight": down,
                                     f"{Q_K}.alpha": torch.tensor(2.0)}, ":0.5")])
        assert torch.get_num_threads() == default and new_thread_default() == default
    finally:
        torch.set_num_threads(before)
    name, count = seen[Q]
    assert name.startswith("bake") and count == default // 2
    close(out[Q], base[Q] + 0.5 * (2.0 / 4) * (up.double() @ down.double()))
    unchanged_except(out, base, {Q})
