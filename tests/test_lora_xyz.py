"""X/Y/Z cells while the user has LoRAs baked into the loaded model (issue 14): each cell is its own merge with the
same LoRAs baked again on top, in the WebUI's X/Y/Z axes and in the tab's plot; the infotext of each cell says so;
a LoRA that cannot go onto a cell's merge refuses the cell before the model is touched. Expectations: the cell's
Weight sum computed here in float64 from the files, rounded to the model's dtype (the merge is loaded first), then
+ ratio·scale·up·down in float64 (the bake, rounded once more).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_rounded, ulp
from safetensors.torch import load_file
from test_live_merge import assert_same
from test_lora_live import loras_fixture  # noqa: F401  (provides the `loras` fixture)
from test_xyz_webui_integration import USER, entry, ours, xyz  # noqa: F401 - fixtures used by name
from webui_fixture import webui_fixture  # noqa: F401  (provides the `webui` fixture)

from lib_merge.core.errors import MergeError
from lib_merge.core.recipe import Recipe
from lib_merge.hosts.base import GenerationRequest
from lib_merge.hosts.webui_xyz import PREFIX
from lib_merge.service.merge_service import INFOTEXT_FAILED
from lib_merge.ui.plot import run_plot

RATIO = 0.8


def cell_expected(webui, alpha: float, lora: dict, ratio: float, dtype_of: dict) -> dict[str, torch.Tensor]:
    """Every model key after a cell "Weight sum of A and B at `alpha`, then the LoRA at `ratio`", in float64:
    (1-alpha)·A + alpha·B (the merge), and on the LoRA's keys + ratio·scale·up·down."""
    a, b = load_file(str(webui.folder / "modelA.safetensors")), load_file(str(webui.folder / "modelB.safetensors"))
    merged = {k: (1 - alpha) * a[k].double() + alpha * b[k].double()
              for k in dtype_of if k in a and k in b and a[k].is_floating_point()}
    baked = {key: merged[key] + ratio * scale * (up.double() @ down.double())
             for key, (down, up, scale) in lora.items()}
    return merged, baked


def assert_cell(live: dict[str, torch.Tensor], wanted) -> None:
    """A merged key within 1 ulp of its float64 value; a baked key within 1 ulp of the merge's value (the merge is
    rounded to the model's dtype first) plus 1 ulp of its own (the bake's rounding)."""
    merged, baked = wanted
    for key, value in merged.items():
        if not key.startswith(("model.", "cond_stage_model.")):
            continue  # the fake's VAE keeps its own values under an external VAE setting; the U-Net and TE merge
        got, dtype = live[key], live[key].dtype
        if key not in baked:
            assert_rounded(got, value, dtype, what=key)
            continue
        err = (got.double() - baked[key]).abs()
        tol = ulp(value, dtype) + ulp(baked[key], dtype) + 1e-6
        assert got.dtype == dtype and bool((err <= tol).all()), f"{key}: off by {float((err - tol).max())} beyond"


def recipe_of(identity) -> dict:
    return json.loads(identity.recipe_json)


def xyz_cell(webui, entry, *axes):  # noqa: F811
    """One cell of the WebUI's X/Y/Z plot: each (axis, value, values) applied to a txt2img processing object, then
    process_images."""
    p = webui.processing.StableDiffusionProcessingTxt2Img(
        prompt="cat", seed=1, steps=20, sampler_name="Euler", do_not_save_samples=True,
        outpath_samples=str(webui.outputs), outpath_grids=str(webui.outputs))
    p.scripts = webui.runner
    p.script_args = [None, ""]
    for label, value, values in axes:
        next(o for o in ours(entry.xyz_module) if o.label == PREFIX + label).apply(p, value, values)
    return webui.processing.process_images(p)


@pytest.fixture(name="baked")
def baked_fixture(webui, xyz, entry, loras):  # noqa: F811
    """The user's choice: the merge USER (alpha 0.3), then `style` baked at RATIO through the LoRA tab's tools."""
    entry.xyz_module = xyz
    extension = entry.EXTENSION
    extension.service().merge_and_load(USER)
    extension.lora_tools().bake_loaded(f"style:{RATIO}")
    return extension


def test_webui_xyz_cells_are_their_merge_with_the_users_loras_baked_on_top(webui, entry, loras, baked):  # noqa: F811
    chosen = webui.live()
    dtypes = {k: v.dtype for k, v in chosen.items()}
    host = baked.host
    for alpha in (0.8, 0.2):  # the second cell re-merges over the first (the changed keys and the LoRA's)
        processed = xyz_cell(webui, entry, ("Alpha", alpha, [0.8, 0.2]))
        assert_cell(webui.live(), cell_expected(webui, alpha, loras["style"], RATIO, dtypes))
        identity = host.loaded_identity()
        record = recipe_of(identity)
        assert record["merge"]["alpha"] == alpha and record["merge"]["model_b"] == "modelB.safetensors"
        assert [(lora["ratio"], lora["path"].endswith("style.safetensors")) for lora in record["loras"]] == \
            [(RATIO, True)]
        info = processed.infotexts[0]
        assert identity.name.endswith(f" + style:{RATIO:g}") and identity.name in info
        assert INFOTEXT_FAILED not in info
    webui.txt2img(script_args=[""])  # a plain generation afterwards: the user's merge and LoRA, bit for bit
    assert_same(webui.live(), chosen)


def test_tab_plot_cells_are_their_merge_with_the_users_loras_baked_on_top(webui, entry, loras, baked, monkeypatch):  # noqa: F811
    service = baked.service()
    chosen = webui.live()
    dtypes = {k: v.dtype for k, v in chosen.items()}
    seen = []
    generate = service.host.generate

    def watched(request):
        seen.append((webui.live(), recipe_of(service.host.loaded_identity())))
        return generate(request)

    monkeypatch.setattr(service.host, "generate", watched)
    result = run_plot(service, USER, GenerationRequest(prompt="cat", seed=3, steps=2), [("alpha", "0.6,0.1")])
    assert (result.cells_done, result.merges) == (2, 2)
    assert [record["merge"]["alpha"] for _, record in seen] == [0.6, 0.1]
    for (live, record), alpha in zip(seen, (0.6, 0.1), strict=True):
        assert_cell(live, cell_expected(webui, alpha, loras["style"], RATIO, dtypes))
        assert [lora["ratio"] for lora in record["loras"]] == [RATIO]
    assert_same(webui.live(), chosen)  # the user's merge and LoRA are back after the plot


def test_a_cell_the_loras_cannot_go_onto_is_refused_and_the_model_is_unchanged(webui, entry, loras, baked):  # noqa: F811
    from lib_merge.cli import synth

    # SD1 models twice as wide as the loaded one: the user's LoRA has the loaded model's shapes
    wide = synth.make_checkpoint(webui.folder / "wideA.safetensors", "sd1", factor=8, seed=5)
    synth.make_checkpoint(webui.folder / "wideB.safetensors", "sd1", factor=8, seed=6, base=wide, noise=1.0)
    service = baked.service()
    chosen, identity = webui.live(), service.host.loaded_identity()
    with pytest.raises(MergeError, match="LoRAs baked into the loaded model cannot go onto the merge .*wideA.*"
                                         "does not fit this model") as e:
        service.reconcile(Recipe("wideA.safetensors", "wideB.safetensors", alpha=0.5))
    assert "\n" not in str(e.value)
    assert_same(webui.live(), chosen)
    assert service.host.loaded_identity() == identity
    # the WebUI's X/Y/Z cell: the generation goes on with the user's model, and its infotext says why
    processed = xyz_cell(webui, entry, ("Model A", "wideA.safetensors", ["wideA.safetensors"]),
                         ("Model B", "wideB.safetensors", ["wideB.safetensors"]))
    assert "cannot go onto the merge" in processed.infotexts[0]
    assert_same(webui.live(), chosen)
    # the tab's plot stops with the same line
    with pytest.raises(MergeError, match="cannot go onto the merge"):
        run_plot(service, USER, GenerationRequest(prompt="cat", seed=3, steps=2),
                 [("model_A", "wideA.safetensors"), ("model_B", "wideB.safetensors")])
    assert_same(webui.live(), chosen)
