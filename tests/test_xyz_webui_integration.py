"""The [Block Merger] axes inside the (fake) WebUI: registered once at load and in on_before_ui, and a cell's
request merges in the txt2img hook on top of the user's own merge."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from test_xyz_webui import AxisOption
from webui_fixture import webui_fixture  # noqa: F401  (provides the `webui` fixture)

from lib_merge.core.recipe import Recipe
from lib_merge.hosts.webui_xyz import PREFIX

USER = Recipe("modelA.safetensors", "modelB.safetensors", alpha=0.3)


@pytest.fixture
def xyz(webui):
    """A stand-in for the built-in xyz_grid script, registered before extensions load (as the WebUI does)."""
    module = types.SimpleNamespace(AxisOption=AxisOption, axis_options=[AxisOption("Checkpoint name", str, None)])

    class XYZScript(webui.scripts.Script):
        __module__ = "xyz_grid.py"

        def title(self):
            return "X/Y/Z plot"

        def show(self, is_img2img):
            return False  # only its registry entry matters here

    webui.scripts.scripts_data.append(webui.scripts.ScriptClassData(XYZScript, "xyz_grid.py", ".", module))
    return module


@pytest.fixture
def entry(webui, xyz):
    module = webui.load_entry_script()
    webui.script_callbacks.ui_settings_callback()
    webui.runner.initialize_scripts(is_img2img=False)
    webui.runner.setup_ui()
    return module


def ours(xyz):
    return [o for o in xyz.axis_options if o.label.startswith(PREFIX)]


def test_axes_added_at_load_and_not_again_before_ui(webui, xyz, entry):
    assert len(ours(xyz)) == 23
    webui.script_callbacks.before_ui_callback()
    assert len(ours(xyz)) == 23
    model_a = next(o for o in ours(xyz) if o.label == PREFIX + "Model A")
    model_a.confirm(None, ["modelB.safetensors"])  # a real checkpoint name passes
    with pytest.raises(Exception, match="nosuchmodel"):
        model_a.confirm(None, ["nosuchmodel"])


def test_a_cell_request_merges_on_top_of_the_users_merge(webui, xyz, entry):
    webui.txt2img(script_args=[USER.to_json()])
    entry.EXTENSION.service().merge_and_load(USER)  # the user's own (committed) merge
    alpha = next(o for o in ours(xyz) if o.label == PREFIX + "Alpha")
    p = webui.processing.StableDiffusionProcessingTxt2Img(
        prompt="cat", seed=1, steps=20, sampler_name="Euler", do_not_save_samples=True,
        outpath_samples=str(webui.outputs), outpath_grids=str(webui.outputs))
    p.scripts = webui.runner
    p.script_args = [None, ""]
    alpha.apply(p, 0.8, [0.8])
    processed = webui.processing.process_images(p)
    loaded = Recipe.from_json(entry.EXTENSION.host.loaded_identity().recipe_json)
    assert (loaded.model_b, loaded.alpha) == ("modelB.safetensors", 0.8)
    assert "Merge recipe" in processed.infotexts[0]
    webui.txt2img(script_args=[""])  # a plain generation afterwards: the user's merge is back
    back = Recipe.from_json(entry.EXTENSION.host.loaded_identity().recipe_json)
    assert back.alpha == 0.3


def run_plot(webui, xyz, axes):
    """What xyz_grid.run does with our axes: every axis's confirm first, then per cell a shallow copy of p, each
    axis's apply (outside the try), and process_images (inside it: a failure leaves the cell empty)."""
    p = webui.processing.StableDiffusionProcessingTxt2Img(
        prompt="cat", seed=1, steps=20, sampler_name="Euler", do_not_save_samples=True,
        outpath_samples=str(webui.outputs), outpath_grids=str(webui.outputs))
    p.scripts = webui.runner
    p.script_args = [None, ""]
    options = [(next(o for o in ours(xyz) if o.label == PREFIX + label), values) for label, values in axes]
    for option, values in options:
        if option.confirm:
            option.confirm(p, values)
    images = []
    for cell in [[]] if not options else _product([values for _, values in options]):
        pc = copy.copy(p)
        for (option, values), value in zip(options, cell, strict=True):
            option.apply(pc, value, values)
        images.append(webui.processing.process_images(pc))
    return images


def _product(lists):
    import itertools

    return list(itertools.product(*lists))


def test_a_plot_with_no_merge_yet_is_refused_before_any_image(webui, xyz, entry):
    """Fresh start (or after a restore), X = Alpha only: there is no model B to merge with. The plot is refused with
    a message that says what to do, instead of a grid of identical base images."""
    from lib_merge.core.errors import MergeError

    before = webui.live()
    with pytest.raises(MergeError, match="No merge is made yet") as err:
        run_plot(webui, xyz, [("Alpha", [0.2, 0.8])])
    assert "Model B is required" in str(err.value) and "Block Merger tab" in str(err.value)
    assert entry.EXTENSION.host.loaded_identity() is None
    assert all(torch.equal(v, before[k]) for k, v in webui.live().items())


def test_a_plot_that_names_model_b_itself_runs_with_no_merge_yet(webui, xyz, entry):
    processed = run_plot(webui, xyz, [("Alpha", [0.2, 0.8]), ("Model B", ["modelB.safetensors"])])
    images = [p.images[0].tobytes() for p in processed]
    assert len(images) == 2 and images[0] != images[1]
    assert all("Merge recipe" in p.infotexts[0] for p in processed)
