"""The Merge tab's merge methods (issue 17) and Flux/fp8 editor (issue 16): widget values <-> method recipes, the
handlers merging a method recipe (checked against TIES computed here in float64 from its definition), plot, history
and Load settings; the default λ of a method recipe in JSON and on the CLI; Flux's 61-value block weights in the
chart, presets and plots; the fp8 note and warning.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_ui
import torch
from safetensors import safe_open
from test_ui import FakeHost

from lib_merge.cli import synth
from lib_merge.cli.main import main as cli_main
from lib_merge.core.arch import BLOCKS_FLUX
from lib_merge.core.errors import MergeError
from lib_merge.core.methods import METHODS
from lib_merge.core.recipe import Recipe
from lib_merge.core.weights import Presets
from lib_merge.io.checkpoint import open_checkpoint
from lib_merge.service.merge_service import MergeService
from lib_merge.ui import method_values as mv
from lib_merge.ui.chart import weights_svg
from lib_merge.ui.values import history_table, recipe_from_values, values_from_recipe

gr = pytest.importorskip("gradio")
from lib_merge.ui import methods_panel  # noqa: E402 - needs gradio
from lib_merge.ui.tab import Handlers, handler_values  # noqa: E402

PRESETS = Presets.load()
folder = test_ui.folder  # the fixture: hard links to this module's model_dir


# --------------------------------------------------------------------------------------------------------------
# widget values <-> recipe


def test_method_values_make_a_method_recipe():
    r = recipe_from_values(model_a="base.safetensors", model_b="ignored.safetensors", mode="Add difference",
                           calc="cosineA", alpha=0.8, method="ties", models=["m1.safetensors", "m2.safetensors"],
                           model_weights="1, 0.5", density=0.3, seed=7, presets=PRESETS)
    assert (r.method, r.model_a, r.models, r.model_weights) == ("ties", "base.safetensors",
                                                                 ("m1.safetensors", "m2.safetensors"), (1.0, 0.5))
    assert (r.alpha, r.density, r.seed, r.model_b, r.calc) == (0.8, 0.3, 7, "", "normal")  # B/calc do not apply
    assert not r.weights_alpha and not r.weights_density


def test_method_block_weights_follow_use_mbw_and_resolve_presets():
    common = dict(model_a="b.safetensors", method="della", models=["m.safetensors"], presets=PRESETS,
                  weights_density="GRAD_V", weights_alpha="")
    off = recipe_from_values(use_mbw=False, **common)
    assert off.weights_density == "" and off.weights_alpha == ""
    on = recipe_from_values(use_mbw=True, **common)
    assert on.weights_density == PRESETS.get("GRAD_V") and on.weights_alpha == ""
    with pytest.raises(MergeError, match="are empty"):
        recipe_from_values(use_mbw=True, **dict(common, weights_density=""))
    with pytest.raises(MergeError, match="25 values"):
        recipe_from_values(use_mbw=True, **dict(common, weights_density=",".join(["0.5"] * 25)))


@pytest.mark.parametrize("change, message", [
    (dict(models=[]), "pick them under \"Models\""),
    (dict(model_weights="1, x"), "Model weights: 'x' is not a number"),
    (dict(model_weights="1"), "one model weight per model"),
    (dict(density=0), r"density in \(0, 1\]"),
    (dict(method="nope"), "Unknown merge method"),
    (dict(method="perpendicular", models=["m1.safetensors"]), "exactly 2"),
    (dict(model_a=""), "needs a base model"),
])
def test_method_values_refused_with_the_reason(change, message):
    v = dict(model_a="b.safetensors", method="ties", models=["m1.safetensors", "m2.safetensors"], presets=PRESETS)
    v.update(change)
    with pytest.raises(MergeError, match=message):
        recipe_from_values(**v)


def test_off_is_the_classic_recipe():
    r = recipe_from_values(model_a="a", model_b="b", method=mv.OFF, models=["x"], density=0.7, presets=PRESETS)
    assert r.method == "" and r.models == () and json.loads(r.to_json()).keys() == json.loads(
        Recipe("a", "b").to_json()).keys()


def test_values_from_a_method_recipe_round_trip():
    r = Recipe("base", method="dare", models=("m1", "m2"), model_weights=(1.0, 0.5), alpha=0.7, drop=0.8,
               weights_drop=",".join(["0.5"] * 20), elemental_drop="OUT06:attn:0.3", seed=3)
    values = values_from_recipe(r.to_dict())
    assert (values["method"], values["models"], values["model_weights"]) == ("dare", ["m1", "m2"], "1, 0.5")
    assert values["use_mbw"] is True and values["block_type"] == "SDXL"
    assert recipe_from_values(**values, presets=PRESETS) == r.validate(PRESETS)
    classic = values_from_recipe(Recipe("a", "b").to_dict())
    assert classic["method"] == mv.OFF and classic["models"] == []


def test_method_info_and_controls_for_every_method():
    for name, m in METHODS.items():
        info = mv.method_info(name)
        assert m.formula in info and m.source in info and m.count_text() in info
        shown = mv.shown(name)
        assert shown["method"] and not shown["merge_modes"]
        assert [p for p in ("density", "drop", "epsilon") if shown[p]] == [p for p in m.params if p != "alpha"]
        assert shown["model_weights"] == m.weighted
        assert mv.default_alpha(name) == (0.5 if name == "slerp" else 1.0)
    assert mv.shown(mv.OFF)["merge_modes"] and not mv.shown(mv.OFF)["method"] and mv.default_alpha(mv.OFF) is None
    assert "Off" in mv.method_info(mv.OFF)


def test_history_table_shows_the_method_and_its_models():
    rows = [{"id": 1, "mode": "Weight sum", "model_a": "base", "model_b": "", "model_c": "",
             "recipe": Recipe("base", method="ties", models=("m1", "m2")).to_dict()}]
    table = history_table(rows)
    assert table[0][3] == "ties" and table[0][9] == "m1, m2"


# --------------------------------------------------------------------------------------------------------------
# the method's default λ in recipe JSON and on the CLI


def test_method_recipe_json_without_alpha_takes_the_methods_default():
    assert Recipe.from_json('{"model_a": "b", "method": "ties", "models": ["m"]}').alpha == 1.0
    assert Recipe.from_json('{"model_a": "b", "method": "slerp", "models": ["m"]}').alpha == 0.5
    assert Recipe.from_json('{"model_a": "b", "method": "ties", "models": ["m"], "alpha": 0.3}').alpha == 0.3
    assert Recipe.from_json('{"model_a": "a", "model_b": "b"}').alpha == 0.5  # merge modes unchanged


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("method_models")
    base = synth.make_checkpoint(path / "base.safetensors", "sd1", factor=16, seed=1)
    for i, name in enumerate(("m1", "m2", "m3")):
        synth.make_checkpoint(path / f"{name}.safetensors", "sd1", factor=16, seed=2 + i, base=base, noise=1.0)
    return path


def test_cli_method_without_alpha_uses_lambda_1(folder, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(folder))
    out = folder / "ta.safetensors"
    assert cli_main(["merge", "--method", "task_arithmetic", "--base", str(folder / "base.safetensors"),
                     "--model", str(folder / "m1.safetensors"), "--output", str(out), "--no-history"]) == 0
    with open_checkpoint(out) as o:
        assert json.loads(o.metadata["sd_merge_recipe"])["alpha"] == 1.0


# --------------------------------------------------------------------------------------------------------------
# the handlers with a method recipe


def ties64(base, *models, density, alpha):
    """TIES from its definition (Yadav et al. 2023, Algorithm 1), in float64: keep each task vector's
    k = max(1, round(density·n)) largest magnitudes (equal magnitudes: lower index first), elect the sign of the
    sum, average the entries agreeing with it."""
    taus = []
    for m in models:
        tau = (m - base).reshape(-1)
        k = max(1, round(density * tau.size))
        keep = np.argsort(-np.abs(tau), kind="stable")[:k]
        trimmed = np.zeros_like(tau)
        trimmed[keep] = tau[keep]
        taus.append(trimmed)
    taus = np.stack(taus)
    elected = np.sign(taus.sum(0))
    agree = (np.sign(taus) == elected) & (elected != 0)
    count = agree.sum(0)
    mean = np.where(count > 0, (taus * agree).sum(0) / np.maximum(count, 1), 0.0)
    return base + alpha * mean.reshape(base.shape)


def tensors(path):
    with safe_open(path, "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def method_values(**kw):
    return handler_values(model_a="base.safetensors", method="ties", models=["m1.safetensors", "m2.safetensors"],
                          alpha=0.9, density=0.3, **kw)


def test_ties_with_three_models_merge_generate_file_history_load(folder):
    host = FakeHost(folder)
    h = Handlers(MergeService(host, presets=PRESETS))
    v = method_values(custom_name="tiesmerge", prompt="a cat")
    result = h.merge(v)
    assert "Loaded tiesmerge" in result.message
    base, m1, m2 = (tensors(folder / f"{n}.safetensors") for n in ("base", "m1", "m2"))
    checked = 0
    for key, merged in host.state.items():
        if key not in base or not np.issubdtype(base[key].dtype, np.floating) or ".diffusion_model." not in key:
            continue
        expected = ties64(*(t[key].astype(np.float64) for t in (base, m1, m2)), density=0.3, alpha=0.9)
        got = merged.to(torch.float64).numpy()
        ulp = np.spacing(np.abs(expected).astype(base[key].dtype)).astype(np.float64)
        assert np.all(np.abs(got - expected) <= ulp), key  # one rounding to fp16
        checked += 1
    assert checked > 50

    gen = h.merge_and_generate(dict(v, alpha=0.5))
    assert len(gen.images) == 1 and host.requests[-1].prompt == "a cat"

    saved = h.save_to_file(dict(v, custom_name="tiesfile"))
    assert "Saved" in saved.message and (folder / "tiesfile.safetensors").is_file()
    with safe_open(folder / "tiesfile.safetensors", "pt") as f:
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
        key = next(k for k in f.keys() if k.endswith("middle_block.1.proj_in.weight"))
        expected = ties64(*(t[key].astype(np.float64) for t in (base, m1, m2)), density=0.3, alpha=0.9)
        assert np.allclose(f.get_tensor(key).double().numpy(), expected, rtol=1e-3, atol=1e-3)
    assert (recipe["method"], recipe["models"], recipe["density"]) == ("ties", ["m1.safetensors", "m2.safetensors"],
                                                                        0.3)

    rows = h.history_rows()
    assert rows[0][3] == "ties" and rows[0][9] == "m1.safetensors, m2.safetensors"
    merge_id, loaded = h.settings_from_id(-1)
    assert (loaded["method"], loaded["models"], loaded["density"], loaded["alpha"]) == (
        "ties", ["m1.safetensors", "m2.safetensors"], 0.3, 0.9)
    again = h.recipe(dict(handler_values(), **{k: loaded[k] for k in loaded}))
    assert again.to_json() == Recipe.from_dict(recipe).with_seed(again.seed).to_json()


def test_dare_merge_to_file_is_seeded_and_plot_takes_method_axes(folder):
    host = FakeHost(folder)
    h = Handlers(MergeService(host, presets=PRESETS))
    v = handler_values(model_a="base.safetensors", method="dare", models=["m1.safetensors", "m2.safetensors",
                       "m3.safetensors"], drop=0.5, seed=11)
    h.save_to_file(dict(v, custom_name="dare1"))
    h.save_to_file(dict(v, custom_name="dare2"))
    first, second = (tensors(folder / f"dare{i}.safetensors") for i in (1, 2))
    assert all(np.array_equal(first[k], second[k]) for k in first)  # the same seed, the same draws
    h.save_to_file(dict(v, custom_name="dare3", seed=12))
    third = tensors(folder / "dare3.safetensors")
    assert any(not np.array_equal(first[k], third[k]) for k in first if ".diffusion_model." in k)

    plot = h.plot(dict(v, x_type="drop", x_values="0.2, 0.6", y_type="method", y_values="dare, dare_ties"))
    assert len(plot.images) == 1 and "4 of 4 cells, 4 merges" in plot.message and len(host.requests) == 4
    assert "X: drop, Y: method" in plot.infotext


# --------------------------------------------------------------------------------------------------------------
# Flux and fp8


def test_flux_chart_presets_and_flat_conversion():
    flat = ",".join(["0.5"] * 61)
    svg = weights_svg(flat, "", "SD1", PRESETS)
    assert svg.count("<circle") == 61 and ">D00<" in svg and ">S37<" in svg and ">OUT<" in svg and ">IN11<" not in svg
    svg = weights_svg("FLUX_DOUBLE_B", "", "SD1", PRESETS)
    values = PRESETS.get("FLUX_DOUBLE_B").split(",")
    assert svg.count("<circle") == 61 and f"alpha D00: {values[BLOCKS_FLUX.index('D00')]}" in svg
    assert methods_panel.convert_flat(",".join(["0.3"] * 26), flux=True) == ",".join(["0.3"] * 61)
    assert methods_panel.convert_flat(",".join(["0.3"] * 61), flux=False) == ",".join(["0.3"] * 26)
    assert methods_panel.convert_flat("0.1," + ",".join(["0.3"] * 25), flux=True) is None  # not flat: kept
    names = methods_panel.preset_names(PRESETS, flux=True)
    assert "FLUX_DOUBLE_B" in names and all(n.startswith("FLUX_") for n in names)
    assert "GRAD_V" in methods_panel.preset_names(PRESETS, flux=False)


@pytest.fixture
def flux_folder(tmp_path):
    a = synth.make_checkpoint(tmp_path / "fa.safetensors", "flux-dev", 32, torch.bfloat16, seed=1,
                              components=["diffuser"])
    synth.make_checkpoint(tmp_path / "fb.safetensors", "flux-dev", 32, torch.bfloat16, seed=2, base=a, noise=0.5,
                          components=["diffuser"])
    synth.make_checkpoint(tmp_path / "f8.safetensors", "flux-dev", 32, torch.float8_e4m3fn, seed=3, base=a,
                          noise=0.5, components=["diffuser"])
    return tmp_path


def test_flux_models_are_recognised_and_fp8_is_noted(flux_folder, folder):
    host = FakeHost(flux_folder)
    assert methods_panel.model_facts(host, ["fa.safetensors", "fb.safetensors"]) == ({"flux"}, [])
    families, fp8 = methods_panel.model_facts(host, ["fa.safetensors", "f8.safetensors", "missing.safetensors"])
    assert families == {"flux"} and fp8 == ["f8.safetensors"]
    note = methods_panel.family_note(families, fp8, "keep")
    assert "61 values" in note and "fp8 input (f8.safetensors)" in note and "kept as fp8" in note
    assert "save dtype (fp8_e5m2)" in methods_panel.family_note({"sd1"}, [], "fp8_e5m2")
    assert methods_panel.family_note({"sd1"}, [], "fp16") == ""
    assert methods_panel.model_facts(FakeHost(folder), ["base.safetensors"]) == ({"sd1"}, [])


def test_flux_tab_merge_with_61_weights_plot_labels_and_fp8_warning(flux_folder):
    host = FakeHost(flux_folder)
    h = Handlers(MergeService(host, presets=PRESETS))
    v = handler_values(model_a="fa.safetensors", model_b="fb.safetensors", use_mbw=True,
                       weights_alpha="FLUX_DOUBLE_B", custom_name="fluxmix", save_dtype="fp8_e4m3fn")
    saved = h.save_to_file(v)
    assert "Flux" in saved.message and "Warning:" in saved.message and "fp8" in saved.message
    a, b, out = (tensors_pt(flux_folder / f"{n}.safetensors") for n in ("fa", "fb", "fluxmix"))
    key = "double_blocks.0.img_attn.qkv.weight"
    key = next(k for k in out if k.endswith(key))
    assert out[key].dtype == torch.float8_e4m3fn
    assert torch.equal(out[key], b[key].float().to(torch.float8_e4m3fn))  # D00 takes B (weight 1), rounded once
    single = next(k for k in out if ".single_blocks.0." in k and k.endswith("weight"))
    assert torch.equal(out[single], a[single].float().to(torch.float8_e4m3fn))  # S00 keeps A
    plot = h.plot(dict(v, save_dtype="keep", x_type="pinpoint blocks", x_values="D00, S05 S06",
                       y_type="alpha", y_values="0, 1"))
    assert len(plot.images) == 1 and "4 of 4 cells" in plot.message and "X: pinpoint blocks" in plot.infotext


def tensors_pt(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# --------------------------------------------------------------------------------------------------------------
# preset dropdowns for the method parameters


def _events(app, elem_id, trigger="change"):
    """The tab's handlers of one component's event, as (input ids, output ids, fn)."""
    by_id = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    found = [(d["inputs"], d["outputs"], app.fns[i].fn) for i, d in enumerate(app.dependencies)
             if d["trigger"] == trigger and by_id[elem_id]._id in d["targets"]]
    return by_id, found


def test_each_method_parameter_has_a_preset_dropdown_that_fills_its_block_weights(folder, flux_folder):
    from lib_merge.ui.app import build_app

    app = build_app(MergeService(FakeHost(folder), presets=PRESETS))
    by_id, _ = _events(app, "bm_method")
    for p in ("density", "drop", "epsilon"):
        dropdown = by_id[f"bm_preset_{p}"]
        assert dropdown.choices == PRESETS.names(26) and dropdown.value is None and dropdown.visible is False
        _, ((inputs, outputs, fn),) = _events(app, f"bm_preset_{p}")
        assert inputs == [dropdown._id] and outputs == [by_id[f"bm_weights_{p}"]._id, by_id["bm_use_mbw"]._id]
        text, mbw = fn("GRAD_V")
        assert text["value"] == PRESETS.get("GRAD_V") and mbw["value"] is True  # the preset's own 26 values
        assert [u.get("value", "unchanged") for u in fn(None)] == ["unchanged", "unchanged"]
        assert [u.get("value", "unchanged") for u in fn("NO_SUCH_PRESET")] == ["unchanged", "unchanged"]

    # each dropdown shows with its parameter's text: ties density, dare drop, della density and epsilon, Off none
    _, changed = _events(app, "bm_method")
    (_, outputs, fn), = [e for e in changed if by_id["bm_method_info"]._id in e[1]]
    for method, expected in (("ties", {"density"}), ("dare", {"drop"}), ("della", {"density", "epsilon"}),
                             (mv.OFF, set())):
        shown = dict(zip(outputs, fn(method), strict=True))
        assert {p for p in ("density", "drop", "epsilon")
                if shown[by_id[f"bm_preset_{p}"]._id]["visible"]} == expected, method
        assert all(shown[by_id[f"bm_preset_{p}"]._id]["visible"] == shown[by_id[f"bm_weights_{p}"]._id]["visible"]
                   for p in ("density", "drop", "epsilon"))

    # what a dropdown fills goes into the recipe as that parameter's block weights
    _, ((_, _, fill),) = _events(app, "bm_preset_drop")
    text, mbw = (u["value"] for u in fill("GRAD_A"))
    r = recipe_from_values(model_a="base.safetensors", method="dare", models=["a.safetensors"], use_mbw=mbw,
                           weights_alpha="", weights_drop=text, presets=PRESETS)
    assert r.weights_drop == PRESETS.get("GRAD_A") and r.weights_alpha == "" and r.weights_density == ""

    # Flux models: the dropdowns list the 61-value FLUX_* presets, as alpha's does
    flux_app = build_app(MergeService(FakeHost(flux_folder), presets=PRESETS))
    fby, family = _events(flux_app, "bm_model_a")
    (inputs, outputs, fn), = [e for e in family if fby["bm_preset_density"]._id in e[1]]
    args = {fby["bm_model_a"]._id: "fa.safetensors", fby["bm_model_b"]._id: "fb.safetensors",
            fby["bm_model_c"]._id: None, fby["bm_models"]._id: [], fby["bm_method"]._id: mv.OFF,
            fby["bm_save_dtype"]._id: "keep", fby["bm_weights_alpha"]._id: ""}
    shown = dict(zip(outputs, fn(*(args[i] for i in inputs)), strict=True))
    flux_names = methods_panel.preset_names(PRESETS, flux=True)
    for p in ("density", "drop", "epsilon"):
        assert shown[fby[f"bm_preset_{p}"]._id]["choices"] == flux_names
    assert shown[fby["bm_preset"]._id]["choices"] == flux_names

